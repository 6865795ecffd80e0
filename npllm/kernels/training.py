r"""Numba twins of the training step's element-wise equations, for the training engine
(:mod:`npllm.engine.training`).

The engine keeps activations as matrices of rows, one row per token (``[N, width]``, N = B T),
and splits each step's rows between its threads; so every kernel here works on the rows
``[a, b)`` of its arrays, on the calling thread (``nogil``: the engine's threads run them at the
same time), and writes into arrays it is given, most of them in place. Each is the twin of an
equation, with the same float32 operations in the same order except where a comment says
otherwise (sums over a row kept in float64, the exponential of ``_math.py``):

- :func:`rope_rows`: :func:`npllm.equations.apply_rope` (and, given ``-sin``, its backward
  :func:`npllm.equations.apply_rope_backward`) on the query and key heads of each row, in place;
- :func:`causal_softmax_rows`: :func:`npllm.equations.attention_pattern`'s scaled, causally
  masked softmax, in place on the scores;
- :func:`cross_entropy_rows`: :func:`npllm.equations.token_log_probs` of the targets and
  :func:`npllm.equations.cross_entropy_backward` in one pass, the logits overwritten by their
  gradient;
- :func:`swiglu_backward_rows`: :func:`npllm.equations.swiglu_backward`, the gate/up halves of
  one array overwritten by their gradients;
- :func:`rms_norm_backward_rows`: :func:`npllm.equations.rms_norm_backward`, d_x added to a
  running gradient;
- :func:`softmax_backward_rows`: :func:`npllm.equations.softmax_backward` of the causal
  attention pattern, times the score scale, in place.

``tests/test_kernels_training.py`` proves each equal to its equation on hypothesis-drawn shapes.
"""
import numba
import numpy as np

from npllm.kernels._math import exp32, exp_inplace, row_max, sum_of_squares, total
from npllm.kernels.mlp import _swiglu_row
from npllm.kernels.norm import _rms_norm_row

JIT = dict(cache=True, nogil=True, fastmath=False, error_model="numpy")


@numba.njit(**JIT)
def rms_norm_rows(x, weight, eps, out, a, b):
    """:func:`npllm.kernels.rms_norm` (the twin of RMSNorm) on rows a..b of x [N, D] -> out."""
    for i in range(a, b):
        _rms_norm_row(x[i], weight, eps, out[i])


@numba.njit(**JIT)
def swiglu_rows(gate_up, out, a, b):
    """:func:`npllm.kernels.swiglu` on rows a..b: gate_up [N, 2F] (each row [gate, up]) -> out [N, F]."""
    F = out.shape[1]
    for i in range(a, b):
        _swiglu_row(gate_up[i, :F], gate_up[i, F:], out[i])


@numba.njit(**JIT)
def rope_rows(y, cos, sin, heads, Dh, T, a, b):
    """RoPE in place on the first ``heads`` heads (width Dh) of rows a..b of y [N, width]; row i
    is position i % T, whose angles are cos[i % T], sin[i % T] [Dh]. With ``-sin`` it is the
    backward (the rotation by the opposite angle). The same float32 products and sums as
    :func:`npllm.equations.apply_rope` (a + (-b) c equals a - b c exactly)."""
    half = Dh // 2
    for i in range(a, b):
        t = i % T
        for h in range(heads):
            o = h * Dh
            for j in range(half):
                x1 = y[i, o + j]
                x2 = y[i, o + j + half]
                y[i, o + j] = x1 * cos[t, j] - x2 * sin[t, j]
                y[i, o + j + half] = x2 * cos[t, j + half] + x1 * sin[t, j + half]


@numba.njit(**JIT)
def causal_softmax_rows(scores, scale, a, b):
    """The causal attention pattern in place: row t of scores [T, T] (q k^T of one head) becomes
    softmax(scores[t, :t + 1] * scale), followed by zeros (the masked future keys, e^{-inf}).
    The row's sum is kept in float64."""
    for t in range(a, b):
        row = scores[t, :t + 1]
        for j in range(t + 1):
            row[j] = row[j] * scale
        exp_inplace(row, row_max(row))
        row_total = np.float32(total(row))
        for j in range(t + 1):
            row[j] = row[j] / row_total
        for j in range(t + 1, scores.shape[1]):
            scores[t, j] = np.float32(0.0)


@numba.njit(**JIT)
def softmax_backward_rows(d_pattern, pattern, scale, a, b):
    """The gradient of the scores of a causal attention pattern, in place: d_pattern [T, T]
    (dL/dA) becomes pattern * (d_pattern - sum(d_pattern * pattern)) * scale
    (:func:`npllm.equations.softmax_backward`, then the score scale); the masked keys (zeros in
    pattern) get 0. The row's sum is kept in float64."""
    for t in range(a, b):
        dot = 0.0
        for j in range(t + 1):
            dot += d_pattern[t, j] * pattern[t, j]
        dot32 = np.float32(dot)
        for j in range(t + 1):
            d_pattern[t, j] = pattern[t, j] * (d_pattern[t, j] - dot32) * scale
        for j in range(t + 1, d_pattern.shape[1]):
            d_pattern[t, j] = np.float32(0.0)


@numba.njit(**JIT)
def cross_entropy_rows(logits, targets, count, log_probs, a, b):
    """Rows a..b of logits [N, V]: log P(target) (:func:`npllm.equations.token_log_probs`, the
    logsumexp form) into log_probs [N], and the logits overwritten by the gradient of the mean
    cross-entropy over ``count`` targets, (softmax - one_hot) / count
    (:func:`npllm.equations.cross_entropy_backward`). The sum of exponentials is kept in
    float64."""
    n = np.float32(count)
    for i in range(a, b):
        z = logits[i]
        top = row_max(z)
        picked = z[targets[i]]
        exp_inplace(z, top)  # z <- e^{z - max}
        sum_exp = np.float32(total(z))
        log_probs[i] = (picked - top) - np.log(sum_exp)
        for j in range(z.shape[0]):
            z[j] = z[j] / sum_exp
        z[targets[i]] = z[targets[i]] - np.float32(1.0)
        for j in range(z.shape[0]):
            z[j] = z[j] / n


@numba.njit(**JIT)
def swiglu_backward_rows(d_out, gate_up, a, b):
    """Rows a..b: gate_up [N, 2F] (each row [gate g, up u]) overwritten by [dL/dg, dL/du] from
    d_out [N, F] = dL/d(SiLU(g) u): dL/dg = d u sigma(g) (1 + g (1 - sigma(g))), dL/du =
    d g sigma(g) (:func:`npllm.equations.swiglu_backward`), sigma by :func:`exp32`."""
    F = d_out.shape[1]
    one = np.float32(1.0)
    for i in range(a, b):
        for j in range(F):
            g = gate_up[i, j]
            u = gate_up[i, F + j]
            d = d_out[i, j]
            sigma = one / (one + exp32(-g))
            gate_up[i, j] = d * u * sigma * (one + g * (one - sigma))
            gate_up[i, F + j] = d * g * sigma


@numba.njit(**JIT)
def rms_norm_backward_rows(d_y, x, weight, eps, d_x, d_weight, a, b):
    """Rows a..b of :func:`npllm.equations.rms_norm_backward`: d_x [N, D] += the gradient of x,
    d_weight [D] += this range's sum of d_y * x_hat. The row sums (of x^2 and of
    d_x_hat * x_hat) are kept in float64."""
    D = x.shape[1]
    for i in range(a, b):
        xi, dyi = x[i], d_y[i]
        r = np.float32(1.0) / np.sqrt(np.float32(sum_of_squares(xi) / D) + eps)
        dot = 0.0
        for d in range(D):
            x_hat = xi[d] * r
            d_weight[d] += dyi[d] * x_hat
            dot += (dyi[d] * weight[d]) * x_hat
        mean = np.float32(dot / D)
        for d in range(D):
            x_hat = xi[d] * r
            d_x[i, d] += r * (dyi[d] * weight[d] - x_hat * mean)
