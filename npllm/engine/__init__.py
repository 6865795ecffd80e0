"""Engines: what runs a model's forward pass, chosen once when the model is loaded.

The reference (:func:`npllm.model.llama.forward`) says what a model computes, for reading; an
engine says how fast. Two exist, both tested equal to the reference (``tests/test_engine.py``):

- ``"numba"`` (the default, :class:`~npllm.engine.fast.NumbaEngine`): Numba kernels, fused and
  packed matrices, threads (``docs/engine.md`` lists each speed path and the test that proves
  it equal);
- ``"reference"`` (:class:`~npllm.engine.reference.ReferenceEngine`): the reference as written.

The other families (StableLM, Phi-3, Qwen2, GPT-2) run under ``"numba"`` with the kernels where
they apply (:class:`~npllm.engine.generic.FamilyEngine`); Llama's packed decoding and parts on
threads are Llama's only.

Choose with ``npllm.load(name, engine=...)`` or the environment variable ``NPLLM_ENGINE``
(``NPLLM_BACKEND=numpy|numba``, its old name, is read too). An engine is called as
``engine(inputs, cache, attention_mask, trace)`` and offers ``engine.map(fn, items)`` for
independent forward passes (``npllm.score``'s batches).
"""
import os

from npllm.engine.fast import NumbaEngine, load_numba_engine
from npllm.engine.generic import FamilyEngine
from npllm.engine.packed import check_packed
from npllm.engine.reference import ReferenceEngine

ENGINES = ("numba", "reference")
ALIASES = {"numpy": "reference"}  # the readable backend's old name


def engine_name(name=None):
    """``name`` (or ``$NPLLM_ENGINE``, ``$NPLLM_BACKEND``, else ``numba``) as an engine name."""
    given = name or os.environ.get("NPLLM_ENGINE") or os.environ.get("NPLLM_BACKEND") or "numba"
    resolved = ALIASES.get(given.lower(), given.lower())
    if resolved not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {given!r} "
                         "(set NPLLM_ENGINE or pass engine=...)")
    return resolved


def make_engine(name, config, weights, folder=None, packed=True, threads=None):
    """The engine ``name`` (see :func:`engine_name`) for a model's config and weights; the Numba
    engine also maps the packed matrices of ``folder`` unless ``packed`` is false."""
    if engine_name(name) == "reference":
        if folder is not None:
            check_packed(folder)
        return ReferenceEngine(config, weights)
    if config.model_type not in ("llama", "mistral"):
        return FamilyEngine(config, weights, threads)
    return load_numba_engine(config, weights, folder, packed, threads)


__all__ = ["ENGINES", "FamilyEngine", "NumbaEngine", "ReferenceEngine", "engine_name", "make_engine"]
