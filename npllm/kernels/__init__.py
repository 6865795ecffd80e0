"""Numba twins of the hot equations: the same names, signatures and numbers, only faster.

``npllm.equations`` says what the model computes, one readable NumPy function per lecture
equation. Running a model spends nearly all its time outside the big matrix products in a few
of them: RMSNorm, RoPE, softmax, the SwiGLU gate and, above all, attention. This package holds a
Numba-compiled twin of each, written as loops with the structure of the formula:

- ``rms_norm``: :func:`npllm.equations.rms_norm` (``norm.py``)
- ``apply_rope``: :func:`npllm.equations.apply_rope` (``position.py``)
- ``softmax``, ``log_softmax``: :func:`npllm.equations.softmax`, :func:`npllm.equations.log_softmax`
  (``softmax.py``)
- ``swiglu``: :func:`npllm.equations.swiglu` (``mlp.py``)
- ``grouped_query_attention``, ``decode_attention``: their namesakes in
  :mod:`npllm.equations.attention` (``attention.py``): BLAS for q k^T and p v (the query heads
  of a key/value head as the rows of one product, causal blocks skipped), a Numba pass for
  the scaled, masked softmax in between
- ``lm_head_log_probs``: the composition ``token_log_probs(lm_head(c, W), targets)``
  (:func:`npllm.equations.lm_head_log_probs`) in one pass over blocks of the vocabulary, so the
  [T, V] logits are never held at once (``softmax.py``)

And one family that is not a twin of an equation: ``quantized.py`` computes ``x W^T`` straight
from the blocks a GGUF file stores W in (Q4_1, Q8_0), with weights bit-identical to the float32
ones ``gguf.quants.dequantize`` gives; the forward pass uses it when decoding
(:mod:`npllm.kernels.quantized`, tested in ``tests/test_quantized.py``). It is imported as
``npllm.kernels.quantized``, not re-exported here. ``decode.py`` builds on it: a whole decoder
layer for one new token in one compiled call (``decode_layer``, what the forward pass runs per
layer when it decodes from packed weights; tested in ``tests/test_decode.py``).

Two modules serve training, imported by name and not re-exported here either: ``training.py``,
the twins of the backward equations for the training engine (``tests/test_kernels_training.py``),
and ``optim.py``, the twin of :func:`npllm.equations.adamw_step` (the equation lives in
``equations/optim.py``; ``tests/test_equations_optim.py``).

Each public function is a thin Python wrapper (the equation's argument checks, leading axes
flattened, masks broadcast as views) around ``@numba.njit`` cores: a function for one row or
one block of rows, and a serial and a parallel loop over the rows (``_parallel.py`` says why a
forward pass runs the serial one). The cores are compiled with ``fastmath=False``, so the
compiler never approximates a function or reorders a float32 sum (the two float64 sums of
``_math.py`` are the exception, and say why), with ``error_model="numpy"`` (a division by
zero gives inf or NaN as in NumPy, instead of a check before every division that would stop
LLVM from vectorising the loop), and with ``cache=True``, so the compiled code is kept on disk
(``__pycache__``) and later imports do not compile again. ``_math.py`` holds what the cores
share: an exponential LLVM can vectorise, a row's maximum and sum.

How they are proven equal: ``tests/test_kernels.py`` runs every kernel and its equation on
random shapes and values drawn by hypothesis (one token, one head, grouped-query ratios 1, 3, 9,
causal masks with a KV-cache offset, padding masks, values of +-1e4) and compares them within
float32 rounding; where the kernels add numbers in another order than NumPy (sums kept in
float64, attention's products and weighted sums, the exponential's last bit), the tolerance
says so. The equations in turn
are tested against torch and transformers, and the whole forward pass is run with both engines
(:mod:`npllm.engine`).
"""
from .attention import decode_attention, grouped_query_attention
from .mlp import swiglu
from .norm import rms_norm
from .position import apply_rope
from .softmax import lm_head_log_probs, log_softmax, softmax

__all__ = ["rms_norm", "apply_rope", "softmax", "log_softmax", "swiglu",
           "grouped_query_attention", "decode_attention", "lm_head_log_probs"]
