"""Choose between the readable NumPy equations and their Numba twins.

The forward pass asks :func:`get_backend` for its hot functions. Both backends expose the same
names with the same signatures and give the same numbers (``tests/test_kernels.py`` proves it).
Select with the environment variable ``NPLLM_BACKEND=numpy|numba`` or the ``backend`` argument
of the functions that run the model; the default is ``numba``.
"""
import os
from types import SimpleNamespace

BACKENDS = ("numba", "numpy")
# The functions the forward pass takes from a backend (see npllm/kernels/__init__.py).
HOT_FUNCTIONS = ("rms_norm", "apply_rope", "softmax", "log_softmax", "swiglu",
                 "grouped_query_attention")


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
    else:
        from npllm import equations as module
    return SimpleNamespace(name=name, **{f: getattr(module, f) for f in HOT_FUNCTIONS})
