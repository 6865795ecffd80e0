"""Numba twin of :func:`npllm.equations.adamw_step` (the optimizer's hot loop).

The equation makes about ten temporaries the size of each weight (m, v, their square root, the
quotient...): for the default model's 135 M weights, ten passes over 540 MB each step. The twin
reads each weight, its gradient and its two moments once and writes them back in place, doing
the same float32 operations in the same order (``tests/test_equations_optim.py`` checks that
they agree). It is not a Numba parallel loop: after the reference backward pass's BLAS products
(on several threads) BLAS's spinning threads would fight it for the cores (see
``npllm/kernels/_parallel.py``). After the training engine's step (BLAS on one thread per call)
the engine's own threads share each weight's update instead (``split``).
"""
import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _adamw(param, grad, m, v, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, eps, decay,
           step_size):
    for i in range(param.shape[0]):
        g = grad[i]
        m_i = m[i] + (g - m[i]) * one_minus_beta1
        v_i = v[i] * beta2 + one_minus_beta2 * g * g
        denom = np.sqrt(v_i) / bias2_sqrt + eps
        param[i] = param[i] * decay - step_size * m_i / denom
        m[i] = m_i
        v[i] = v_i


def adamw_step_(param, grad, m, v, step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                split=None):
    """:func:`npllm.equations.adamw_step` in place: param, m and v (contiguous float32 arrays)
    are overwritten with their new values. ``split``: None (one call on this thread), or a
    function ``split(fn, n)`` that calls ``fn(a, b)`` over ranges covering [0, n) (on several
    threads: :meth:`npllm.engine.training.Team.rows`); each element's update is the same either
    way."""
    assert param.dtype == m.dtype == v.dtype == np.float32
    assert param.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous
    assert param.shape == grad.shape == m.shape == v.shape
    beta1, beta2 = betas
    f32 = np.float32
    p, g = param.reshape(-1), np.ascontiguousarray(grad, np.float32).reshape(-1)
    m, v = m.reshape(-1), v.reshape(-1)
    constants = (f32(1 - beta1), f32(beta2), f32(1 - beta2), f32(math.sqrt(1 - beta2 ** step)),
                 f32(eps), f32(1 - lr * weight_decay), f32(lr / (1 - beta1 ** step)))
    if split is None:
        _adamw(p, g, m, v, *constants)
    else:
        split(lambda a, b: _adamw(p[a:b], g[a:b], m[a:b], v[a:b], *constants), p.size)
