"""Choose between the readable NumPy equations and their Numba twins.

The forward pass asks :func:`get_backend` for its hot functions. Both backends expose the same
names with the same signatures and give the same numbers (``tests/test_kernels.py`` proves it).
Select with the environment variable ``NPLLM_BACKEND=numpy|numba`` or the ``backend`` argument
of the functions that run the model; the default is ``numba``.
"""
import math
import os
import sys
import time
from types import SimpleNamespace

BACKENDS = ("numba", "numpy")
# The functions the forward pass takes from a backend (see npllm/kernels/__init__.py).
HOT_FUNCTIONS = ("rms_norm", "apply_rope", "softmax", "log_softmax", "swiglu",
                 "grouped_query_attention", "decode_attention")
# Compositions of equations that the kernels compute in one pass: the NumPy backend composes
# the equations (below), the Numba backend has a kernel of the same name and signature.
FUSED_FUNCTIONS = ("lm_head_log_probs",)


def lm_head_log_probs(c, W, targets):
    r"""log P(targets | c): the LM head, then the log-softmax read at the targets (lecture 000).

    .. math::
        \log P(y_t \mid c_t) = \log\mathrm{softmax}(W c_t)_{y_t}

    c [..., T, D], W [V, D], targets int [..., T] -> [..., T]. The readable composition of
    :func:`~npllm.equations.lm_head` and :func:`~npllm.equations.token_log_probs`; the Numba
    twin (:func:`npllm.kernels.lm_head_log_probs`) gives the same numbers without ever holding
    the [..., T, V] logits.
    """
    from npllm.equations import lm_head, token_log_probs
    return token_log_probs(lm_head(c, W), targets)


def backend_name(name=None):
    """Resolve ``name`` (or ``$NPLLM_BACKEND``, or the default ``numba``) to a valid backend name."""
    name = (name or os.environ.get("NPLLM_BACKEND") or "numba").lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r} "
                         "(set NPLLM_BACKEND or pass backend=...)")
    return name


def get_backend(name=None):
    """Return a namespace with the hot functions of the chosen backend."""
    name = backend_name(name)
    if name == "numba":
        from npllm import kernels as module
        fused = module
    else:
        from npllm import equations as module
        fused = sys.modules[__name__]  # the compositions above
    return SimpleNamespace(name=name, **{f: getattr(module, f) for f in HOT_FUNCTIONS},
                           **{f: getattr(fused, f) for f in FUSED_FUNCTIONS})


# OpenBLAS's worker threads keep spinning for about 0.1 s after each matrix product, ready for
# the next one (OPENBLAS_THREAD_TIMEOUT). A Numba parallel loop started meanwhile shares a core
# with a spinning thread and waits for it: the first decoding step after a prompt's forward pass
# took 60 to 110 ms instead of 10 (2 cores). So the forward pass notes when it ran BLAS
# products, and the products with packed weights run on one thread until BLAS_SPIN_SECONDS
# later (see npllm.kernels._parallel).
BLAS_SPIN_SECONDS = 0.12
_blas = {"last": -math.inf}


def note_blas_products(when=None):
    """Record that BLAS products (with its thread pool) ran just now, or at ``when`` (a time
    :func:`blas_products_noted` gave)."""
    _blas["last"] = time.monotonic() if when is None else when


def blas_products_noted():
    """When BLAS products were last noted (``time.monotonic()``; -inf if never)."""
    return _blas["last"]


def blas_threads_spinning():
    """Whether BLAS's threads may still be spinning after the last noted products."""
    return time.monotonic() - _blas["last"] < BLAS_SPIN_SECONDS
