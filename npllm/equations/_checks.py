"""Argument checks shared by the equations: one line at the top of a function, out of the formula's way.

User-facing mistakes (wrong rank, mismatched widths, out-of-range settings) raise ``ValueError``
with a message naming the argument and what was expected.
"""
import numpy as np


def require(condition, message):
    """Raise ``ValueError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)


def as_array(x, name, shape, dtype=np.float32):
    """``x`` as an array of ``dtype`` whose rank fits ``shape``, written as in the docstrings.

    ``shape`` is e.g. ``"[..., T, Dh]"`` (at least 2 axes) or ``"[V, D]"`` (exactly 2 axes).
    """
    x = np.asarray(x, dtype=dtype)
    axes = shape.strip("[]").split(", ") if shape != "[]" else []
    # `if`, not require(): this runs for every array of every call, and require's message would
    # be formatted each time.
    if "..." in axes:
        if x.ndim < len(axes) - 1:
            raise ValueError(f"{name} must have shape {shape} (at least {len(axes) - 1} axes), "
                             f"got shape {x.shape}")
    elif x.ndim != len(axes):
        raise ValueError(f"{name} must have shape {shape}, got shape {x.shape}")
    return x


def positive_int(n, name):
    """``n`` as an int, ValueError unless it is a whole number >= 1."""
    if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)
