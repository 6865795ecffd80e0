"""Argument conversion for the kernels' wrappers, cheap on the path the forward pass takes.

``npllm.equations._checks.as_array`` converts anything array-like to float32 and checks its
rank against a shape written as in the docstrings. Decoding one token calls the kernels a few
hundred times, where those checks would cost more than the kernels: :func:`float32_array`
returns a float32 ndarray of a valid rank as it is and hands everything else (conversion, the
error message) to ``as_array``.
"""
from functools import lru_cache

import numpy as np

from npllm.equations._checks import as_array


@lru_cache(maxsize=None)
def _rank(shape):
    """"[..., T, Dh]" -> (2, False): at least 2 axes; "[V, D]" -> (2, True): exactly 2."""
    axes = shape.strip("[]").split(", ") if shape != "[]" else []
    return (len(axes) - 1, False) if "..." in axes else (len(axes), True)


def float32_array(x, name, shape):
    """``as_array(x, name, shape)``, without a copy or a check for a float32 ndarray that fits."""
    if type(x) is np.ndarray and x.dtype == np.float32:
        n, exact = _rank(shape)
        if x.ndim == n or (not exact and x.ndim > n):
            return x
    return as_array(x, name, shape)
