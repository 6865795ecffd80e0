r"""One decoder layer for one new token, in one compiled call: the decoding step llama2.c writes.

When decoding, every layer multiplies a single vector by its matrices, and the rest of the layer
(RMSNorm, RoPE, one row of attention, SwiGLU, the residual additions) is a few thousand numbers.
Composed in Python from the kernels of the other files, that rest is some twenty calls per
layer, each converting and checking its arguments for microseconds of work: a fifth of a
decoding step of the default model (``docs/performance.md``). :func:`decode_layer` runs the same steps in one call per
layer, as llama2.c's ``forward`` does, with the same building blocks:

.. math::
    h = \mathrm{RMSNorm}(x),\quad [q; k; v] = h\, [W_q; W_k; W_v]^\top,\quad
    q, k \leftarrow \mathrm{RoPE}(q, k),\quad K_{:,t}, V_{:,t} \leftarrow k, v

    o_h = \sum_{s \le t} \mathrm{softmax}_s\!\Big(\frac{q_h \cdot K_{g(h), s}}{\sqrt{d_h}}\Big)
    V_{g(h), s},\qquad x \leftarrow x + o\, W_o^\top

    x \leftarrow x + \big(\mathrm{silu}(h' W_g^\top) \odot h' W_u^\top\big) W_d^\top,
    \quad h' = \mathrm{RMSNorm}(x)

with :math:`g(h) = \lfloor h / (H / K) \rfloor` the key/value head of query head h. The matrices
are read from their GGUF blocks by the parallel drivers of :mod:`npllm.kernels.quantized`; the
row functions are those of ``norm.py``, ``position.py``, ``attention.py`` and ``mlp.py``, so
every number is the one the composed step gives, except the attention's two sums, which the
composed step leaves to BLAS: here :math:`q_h \cdot K_s` is added in 32 lanes and a fixed tree,
and :math:`\sum_s p_s V_s` one position after another (``tests/test_decode.py`` compares both with
the readable equations).
"""
import numba
import numpy as np

from npllm.kernels.attention import _softmax_row
from npllm.kernels.mlp import _swiglu_row
from npllm.kernels.norm import _rms_norm_row
from npllm.kernels.position import rope_row
from npllm.kernels.quantized import _fma, _lane_sum, _lanes, one_input_product

# decode_layer calls parallel functions (the packed drivers) from compiled code. Numba starts its
# thread pool when a parallel function is called from Python or compiled, but not when the
# caller is loaded from its on-disk cache: the first decode_layer of a process whose first
# parallel work it is then crashed (a one-token prompt on a fresh cache). Starting it here, once:
numba.get_num_threads()


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _dot(a, b, acc):
    """a . b for float32 vectors [n]: 32 running sums (lane j adds a[32 i + j] b[32 i + j]), then
    a fixed tree (LLVM turns the lanes into SIMD instructions without reordering a sum)."""
    n = a.shape[0]
    full = n - n % 32
    for j in range(32):
        acc[j] = 0
    for i in range(0, full, 32):
        for j in range(32):
            acc[j] = _fma(a[i + j], b[i + j], acc[j])
    result = _lane_sum(acc, 0)
    for i in range(full, n):
        result = _fma(a[i], b[i], result)
    return result


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _attend(q, k_cache, v_cache, length, out):
    """One new token's attention: q [H, Dh] against the first ``length`` positions of k_cache,
    v_cache [K, S_max, Dh] -> out [H, Dh], without a mask (it may see every cached position)."""
    H, Dh = q.shape
    G = H // k_cache.shape[0]
    scale = np.float32(Dh ** -0.5)  # as the equations: (q k^T) * Dh ** -0.5
    scores = np.empty(length, np.float32)
    no_mask = np.zeros(length, np.float32)
    acc = numba.carray(_lanes(), 64)
    for h in range(H):
        kv = h // G
        for s in range(length):
            scores[s] = _dot(q[h], k_cache[kv, s], acc)
        _softmax_row(scores, no_mask, scale)
        o = out[h]
        o[:] = 0
        for s in range(length):
            p = scores[s]
            for d in range(Dh):
                o[d] += p * v_cache[kv, s, d]


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def decode_layer(x, attn_norm, qkv, qkv_kind, o_proj, o_kind, mlp_norm, gate_up, gate_up_kind,
                 down, down_kind, cos, sin, k_cache, v_cache, position, eps):
    """x [D] <- the decoder layer's output for one new token at ``position`` (in place).

    x: the residual stream [D]; attn_norm, mlp_norm [D]: the RMSNorm weights; qkv: the blocks
    of [W_q; W_k; W_v] (rows H Dh + 2 K Dh), o_proj [D, H Dh], gate_up: [W_gate; W_up] (rows
    2F), down [D, F], each with its block type (``KINDS``); cos, sin [Dh]: RoPE's angles at
    ``position``; k_cache, v_cache [K, S_max, Dh]: this layer's cache, whose row ``position``
    receives the new k and v (positions before it are filled).
    """
    D = x.shape[0]
    K, _, Dh = k_cache.shape
    H = (qkv.shape[0] - 2 * K * Dh) // Dh
    F = gate_up.shape[0] // 2
    h = np.empty((1, D), np.float32)
    _rms_norm_row(x, attn_norm, eps, h[0])
    projected = np.empty((1, qkv.shape[0]), np.float32)
    one_input_product(qkv, qkv_kind, h, projected)
    heads = projected[0, :H * Dh].reshape(H, Dh)
    q = np.empty((H, Dh), np.float32)
    for n in range(H):
        rope_row(heads[n], cos, sin, q[n])
    for n in range(K):
        k = projected[0, (H + n) * Dh:(H + n + 1) * Dh]
        rope_row(k, cos, sin, k_cache[n, position])
        v_cache[n, position] = projected[0, (H + K + n) * Dh:(H + K + n + 1) * Dh]
    attended = np.empty((1, H * Dh), np.float32)
    _attend(q, k_cache, v_cache, position + 1, attended[0].reshape(H, Dh))
    a = np.empty((1, D), np.float32)
    one_input_product(o_proj, o_kind, attended, a)
    for d in range(D):
        x[d] = x[d] + a[0, d]
    _rms_norm_row(x, mlp_norm, eps, h[0])
    both = np.empty((1, 2 * F), np.float32)
    one_input_product(gate_up, gate_up_kind, h, both)
    act = np.empty((1, F), np.float32)
    _swiglu_row(both[0, :F], both[0, F:], act[0])
    one_input_product(down, down_kind, act, a)
    for d in range(D):
        x[d] = x[d] + a[0, d]
