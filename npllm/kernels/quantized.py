r"""Linear layers read from GGUF blocks: :math:`y = x W^\top` with W stored as Q4_1 or Q8_0.

Decoding one token multiplies one vector by every weight matrix of the model, once. That is
memory-bound: in float32 the default model is 538 MB to read per token. The GGUF file stores
the same matrices in blocks of 32 weights that share a scale (96 MB for the default model);
these kernels read the blocks as they are stored and expand each weight to float32 in a
register, where it is used at once, as llama.cpp does. Unlike llama.cpp, nothing else is
quantized: x stays float32, every product and sum is float32, and each weight is expanded with
the same float32 operations as ``gguf.quants.dequantize`` (which made the float32 weights
npllm uses everywhere else), so the weights are **bit-identical** to those float32 weights.
Only the order of the additions differs from a BLAS product.

Block layouts (little-endian; a row of W of width D is D / 32 blocks, one after another):

- **Q4_1**, 20 bytes per 32 weights: f16 scale d, f16 minimum m, 16 bytes ``qs`` of 4-bit
  integers. Weight j of the block is ``qs[j] & 15`` and weight j + 16 is ``qs[j] >> 4``
  (j < 16), each worth

  .. math:: w = \mathrm{float32}(d)\, q + \mathrm{float32}(m)

  which ``gguf`` computes as a float32 product, rounded, then a float32 sum, rounded. The
  product of a float16 and a 4-bit integer is always exact in float32, so the kernel's one
  fused multiply-add rounds exactly as those two steps (:func:`_q4_1_weight`).
- **Q8_0**, 34 bytes per 32 weights: f16 scale d, 32 int8 ``qs``; :math:`w_j =
  \mathrm{float32}(qs_j)\, \mathrm{float32}(d)`.

Shapes: ``blocks`` uint8 [N, D / 32 * bytes per block] is W [N, D] (rows in the model's order,
as ``torch.nn.Linear`` stores them); x [..., D] float32 -> y [..., N] = x W^T.

How the loops are built (read with ``_q4_1_pair``): a row's 32 weights of a block are 32
*lanes*; 32 running sums, one per lane, each add one product per block
(:math:`\mathrm{acc}_j \mathrel{+}= w_{32b+j}\, x_{32b+j}`), so the 32 lanes are independent
and LLVM turns them into SIMD instructions without reordering any float32 sum. The running
sums live in a small array on the stack (:func:`_lanes`), which LLVM keeps in registers. At the
end of a row the lanes are added in a fixed tree (:func:`_lane_sum`). Each step of a lane is
one fused multiply-add ``acc + w x`` rounded once (:func:`_fma`), as BLAS's own kernels do; the
weight w itself is rounded exactly as ``gguf`` rounds it. Two rows are computed at a time
(for several inputs: one row against two inputs), which shares the loads and gives LLVM a loop
body large enough to vectorise instead of unrolling it into scalar code (Numba runs LLVM's loop
vectoriser, not its SLP vectoriser).

The drivers, ``numba.prange`` over the tasks (``_q4_1_one_input``: pairs of rows; ``_inputs``
for several inputs: rows), are what a decoding step runs: it makes no BLAS product, so Numba's
threads have the cores (``_parallel.py``). Small products, and those asked for one thread (the
engine asks while BLAS's threads still spin after a prompt's forward pass,
:class:`npllm.engine.fast.BlasSpin`), run the same driver on the calling thread only
(:func:`_one_thread`): each driver takes one to two seconds to compile (once: Numba's cache
keeps them), so there is no serial twin. While a block is used, the bytes
:data:`PREFETCH_AHEAD` further on are requested (:func:`_prefetch`), so the next blocks are on
their way from memory: the hardware prefetcher stops at every 4 KiB page and restarts slowly
(what this buys is in ``docs/performance.md``).
"""
import platform
from contextlib import contextmanager

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from npllm.ggml_blocks import BLOCK, BLOCK_BYTES, aligned
from npllm.kernels._args import float32_array
from npllm.kernels._math import bits_to_float32
from npllm.kernels._parallel import SERIAL_MATVEC_BELOW

TWO_112 = np.float32(2.0 ** 112)
# Software prefetch: while a block is used, ask for the bytes this far ahead in the same stream
# (the rows of a task follow each other; past a matrix's end lies the next one in the packed
# file, in the order a decoding step reads them). The hardware prefetcher stops at every 4 KiB
# page and restarts slowly. 4 KiB is one page.
PREFETCH_AHEAD = 4096
PREFETCH_LOCALITY = 3  # into every cache level (the non-temporal hint, 0, was 30% slower)


# --- building blocks: single LLVM instructions Numba does not spell ---------------------------

@intrinsic
def _lanes(typingctx):
    """64 float32 on the stack (an ``alloca``): running sums LLVM can keep in registers, where
    a NumPy array (on the heap) would be loaded and stored at every step."""
    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, ir.FloatType(), size=64)
    return types.CPointer(types.float32)(), codegen


@intrinsic
def _prefetch(typingctx, array, offset):
    """Ask the CPU to start loading the cache line at byte ``offset`` of ``array``'s data (a
    hint: never faults, even past the end of the array)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [args[1]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [address, i32(0), i32(PREFETCH_LOCALITY), i32(1)])
        return context.get_dummy_value()
    return types.none(array, types.intp), codegen


@intrinsic
def _low_nibble(typingctx, byte):
    """float32(byte & 15) for a uint8, in 8-bit integer operations (Numba would widen the byte
    to int64 first, and int64 -> float32 has no fast SIMD conversion)."""
    def codegen(context, builder, signature, args):
        low = builder.and_(args[0], ir.Constant(ir.IntType(8), 15))
        return builder.uitofp(low, ir.FloatType())
    return types.float32(types.uint8), codegen


@intrinsic
def _high_nibble(typingctx, byte):
    """float32(byte >> 4) for a uint8."""
    def codegen(context, builder, signature, args):
        high = builder.lshr(args[0], ir.Constant(ir.IntType(8), 4))
        return builder.uitofp(high, ir.FloatType())
    return types.float32(types.uint8), codegen


@intrinsic
def _signed_byte(typingctx, byte):
    """float32 of a uint8 read as an int8 (two's complement): 255 -> -1.0."""
    def codegen(context, builder, signature, args):
        return builder.sitofp(args[0], ir.FloatType())
    return types.float32(types.uint8), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (``llvm.fma``): the running sums' step, one instruction."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _half_to_float32_hardware(typingctx, bits):
    """The float16 whose 16 bits are ``bits`` (uint16), as a float32 (exact): one instruction
    (x86 F16C ``vcvtph2ps``, ARM ``fcvt``)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _half_to_float32_bits(bits):
    """The same conversion from the bits, for CPUs without one (exact for every float16).

    A float16 is sign (1 bit), exponent (5, bias 15), fraction (10); a float32 is sign (1),
    exponent (8, bias 127), fraction (23). Shifting exponent and fraction 13 bits left gives
    the float32 with the same fields, that is the value times 2^(15 - 127); multiplying by
    2^112 corrects the bias exactly, for normal and subnormal float16 alike. Exponent 31 (inf
    and NaN) is set to float32's 255 instead.
    """
    h = np.int32(bits)
    shifted = (h & np.int32(0x7FFF)) << np.int32(13)
    value = bits_to_float32(shifted) * TWO_112
    if (h & np.int32(0x7C00)) == np.int32(0x7C00):
        value = bits_to_float32(shifted | np.int32(0x7F800000))
    return -value if h & np.int32(0x8000) else value


def _has_half_instructions():
    """Whether LLVM turns a float16 -> float32 conversion into one instruction for the CPU
    Numba compiles for (this one, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES choose another)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        name, features = numba.config.CPU_NAME, numba.config.CPU_FEATURES
        if (name and name != "host") or features:
            return "+f16c" in (features or "")
        return bool(llvm.get_host_cpu_features().get("f16c"))
    return machine in ("aarch64", "arm64")


_half = _half_to_float32_hardware if _has_half_instructions() else _half_to_float32_bits


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _lane_sum(acc, start):
    """acc[start] + ... + acc[start + 31], added in a fixed tree (halves, then quarters, ...)."""
    for j in range(16):
        acc[start + j] += acc[start + 16 + j]
    for j in range(8):
        acc[start + j] += acc[start + 8 + j]
    for j in range(4):
        acc[start + j] += acc[start + 4 + j]
    return (acc[start] + acc[start + 2]) + (acc[start + 1] + acc[start + 3])


# --- Q4_1 -------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _q4_1_weight(d, q, m):
    """w = d q + m as ``gguf.quants.dequantize`` rounds it, float32(float32(d q) + m), in one
    fused multiply-add (one instruction instead of two).

    The same float32, always: d is a float16 (11 significant bits) and q an integer below 16
    (4 bits), so d q has at most 15 significant bits and is a float32 *exactly* (no overflow:
    |d q| < 2^20; no underflow: the smallest nonzero |d| is 2^-24, a normal float32). Rounding
    the exact product first therefore changes nothing, and the only rounding left, that of the
    sum, is the one the fused operation makes. (The tests check the weights bit for bit.)
    """
    return _fma(d, q, m)


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _q4_1_pair(blocks, halves, x, r0, r1, acc):
    """Rows r0 and r1 of W times x [D]: lanes acc[0:32] and acc[32:64].

    Block b of row r: d = halves[r, 10 b], m = halves[r, 10 b + 1] (bytes 0-3),
    qs = blocks[r, 20 b + 4 : 20 b + 20].
    """
    for j in range(64):
        acc[j] = 0
    for b in range(blocks.shape[1] // 20):
        d0, m0 = _half(halves[r0, 10 * b]), _half(halves[r0, 10 * b + 1])
        d1, m1 = _half(halves[r1, 10 * b]), _half(halves[r1, 10 * b + 1])
        qs, xb = 20 * b + 4, 32 * b
        _prefetch(blocks, r0 * blocks.shape[1] + PREFETCH_AHEAD + 40 * b)  # both rows' bytes
        for j in range(16):
            q0, q1 = blocks[r0, qs + j], blocks[r1, qs + j]
            acc[j] = _fma(_q4_1_weight(d0, _low_nibble(q0), m0), x[xb + j], acc[j])
            acc[16 + j] = _fma(_q4_1_weight(d0, _high_nibble(q0), m0), x[xb + 16 + j], acc[16 + j])
            acc[32 + j] = _fma(_q4_1_weight(d1, _low_nibble(q1), m1), x[xb + j], acc[32 + j])
            acc[48 + j] = _fma(_q4_1_weight(d1, _high_nibble(q1), m1), x[xb + 16 + j], acc[48 + j])


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _q4_1_two_inputs(blocks, halves, x0, x1, r, acc):
    """Row r of W times x0 and x1 [D] (each weight expanded once, used twice): lanes acc[0:32]
    and acc[32:64]."""
    for j in range(64):
        acc[j] = 0
    for b in range(blocks.shape[1] // 20):
        d, m = _half(halves[r, 10 * b]), _half(halves[r, 10 * b + 1])
        qs, xb = 20 * b + 4, 32 * b
        _prefetch(blocks, r * blocks.shape[1] + PREFETCH_AHEAD + 20 * b)
        for j in range(16):
            q = blocks[r, qs + j]
            low, high = _q4_1_weight(d, _low_nibble(q), m), _q4_1_weight(d, _high_nibble(q), m)
            acc[j] = _fma(low, x0[xb + j], acc[j])
            acc[16 + j] = _fma(high, x0[xb + 16 + j], acc[16 + j])
            acc[32 + j] = _fma(low, x1[xb + j], acc[32 + j])
            acc[48 + j] = _fma(high, x1[xb + 16 + j], acc[48 + j])


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", parallel=True)
def _q4_1_one_input(blocks, x, y):
    """y [1, N] = x [1, D] W^T, two rows of W per task (the last row twice if N is odd), the
    tasks spread over Numba's threads (see :func:`_one_thread`)."""
    halves, N = blocks.view(np.uint16), blocks.shape[0]
    for task in numba.prange((N + 1) // 2):
        acc = numba.carray(_lanes(), 64)
        r0, r1 = 2 * task, min(2 * task + 1, N - 1)
        _q4_1_pair(blocks, halves, x[0], r0, r1, acc)
        y[0, r0], y[0, r1] = _lane_sum(acc, 0), _lane_sum(acc, 32)


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", parallel=True)
def _q4_1_inputs(blocks, x, y):
    """y [n, N] = x [n, D] W^T for n >= 2: one row of W per task, against two inputs at a time
    (the last input twice if n is odd). A separate driver: decoding one sequence never
    compiles it."""
    halves, n = blocks.view(np.uint16), x.shape[0]
    for r in numba.prange(blocks.shape[0]):
        acc = numba.carray(_lanes(), 64)
        for i in range(0, n, 2):
            i1 = min(i + 1, n - 1)
            _q4_1_two_inputs(blocks, halves, x[i], x[i1], r, acc)
            y[i, r], y[i1, r] = _lane_sum(acc, 0), _lane_sum(acc, 32)


# --- Q8_0 -------------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _q8_0_pair(blocks, halves, x, r0, r1, acc):
    """Rows r0 and r1 of W times x [D]: lanes acc[0:32] and acc[32:64].

    Block b of row r: d = halves[r, 17 b] (bytes 0-1), qs = blocks[r, 34 b + 2 : 34 b + 34].
    """
    for j in range(64):
        acc[j] = 0
    for b in range(blocks.shape[1] // 34):
        d0, d1 = _half(halves[r0, 17 * b]), _half(halves[r1, 17 * b])
        qs, xb = 34 * b + 2, 32 * b
        _prefetch(blocks, r0 * blocks.shape[1] + PREFETCH_AHEAD + 68 * b)
        for j in range(32):
            acc[j] = _fma(_signed_byte(blocks[r0, qs + j]) * d0, x[xb + j], acc[j])
            acc[32 + j] = _fma(_signed_byte(blocks[r1, qs + j]) * d1, x[xb + j], acc[32 + j])


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", inline="always")
def _q8_0_two_inputs(blocks, halves, x0, x1, r, acc):
    """Row r of W times x0 and x1 [D]: lanes acc[0:32] and acc[32:64]."""
    for j in range(64):
        acc[j] = 0
    for b in range(blocks.shape[1] // 34):
        d = _half(halves[r, 17 * b])
        qs, xb = 34 * b + 2, 32 * b
        _prefetch(blocks, r * blocks.shape[1] + PREFETCH_AHEAD + 34 * b)
        for j in range(32):
            w = _signed_byte(blocks[r, qs + j]) * d
            acc[j] = _fma(w, x0[xb + j], acc[j])
            acc[32 + j] = _fma(w, x1[xb + j], acc[32 + j])


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", parallel=True)
def _q8_0_one_input(blocks, x, y):
    """y [1, N] = x [1, D] W^T, two rows of W per task (the last row twice if N is odd), the
    tasks spread over Numba's threads (see :func:`_one_thread`)."""
    halves, N = blocks.view(np.uint16), blocks.shape[0]
    for task in numba.prange((N + 1) // 2):
        acc = numba.carray(_lanes(), 64)
        r0, r1 = 2 * task, min(2 * task + 1, N - 1)
        _q8_0_pair(blocks, halves, x[0], r0, r1, acc)
        y[0, r0], y[0, r1] = _lane_sum(acc, 0), _lane_sum(acc, 32)


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy", parallel=True)
def _q8_0_inputs(blocks, x, y):
    """y [n, N] = x [n, D] W^T for n >= 2: one row of W per task, against two inputs at a time
    (the last input twice if n is odd). A separate driver: decoding one sequence never
    compiles it."""
    halves, n = blocks.view(np.uint16), x.shape[0]
    for r in numba.prange(blocks.shape[0]):
        acc = numba.carray(_lanes(), 64)
        for i in range(0, n, 2):
            i1 = min(i + 1, n - 1)
            _q8_0_two_inputs(blocks, halves, x[i], x[i1], r, acc)
            y[i, r], y[i1, r] = _lane_sum(acc, 0), _lane_sum(acc, 32)


# One input, several inputs: the drivers of each block type. The Q4_1 and Q8_0 drivers are the
# same loops around different block readers (_q4_1_pair / _q8_0_pair, ...): written out per
# type so that each reader is a direct call LLVM inlines into the vectorised loop (a reader
# passed as an argument was not tried).
_DRIVERS = {"Q4_1": (_q4_1_one_input, _q4_1_inputs), "Q8_0": (_q8_0_one_input, _q8_0_inputs)}
# The block types as numbers, for compiled callers (the fused decoding layer, kernels/decode.py).
KINDS = {"Q4_1": 0, "Q8_0": 1}


@numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def one_input_product(blocks, kind, x, y):
    """y [1, N] = x [1, D] W^T for W in blocks of type ``kind`` (:data:`KINDS`), from compiled
    code: the parallel driver of that type, on Numba's threads."""
    if kind == 0:
        _q4_1_one_input(blocks, x, y)
    else:
        _q8_0_one_input(blocks, x, y)


@contextmanager
def _one_thread():
    """Run Numba's parallel loops on the calling thread only (for this thread, until the end of
    the ``with``). The same compiled driver serves both uses, where the other kernels compile a
    serial and a parallel one: these take seconds to compile."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(threads)


@contextmanager
def one_thread_while(condition):
    """:func:`_one_thread` if ``condition``, else nothing."""
    if condition:
        with _one_thread():
            yield
    else:
        yield


def _product(blocks, x, ggml_type):
    """The public functions' checks, then :func:`packed_product`."""
    if type(blocks) is not np.ndarray or blocks.dtype != np.uint8 or blocks.ndim != 2:
        raise ValueError(f"blocks must be a uint8 array [N, D / 32 * {BLOCK_BYTES[ggml_type]}] "
                         f"of {ggml_type} blocks, got {getattr(blocks, 'dtype', type(blocks))} "
                         f"{np.shape(blocks)}")
    x = float32_array(x, "x", "[..., D]")
    N, row_bytes = blocks.shape
    D = row_bytes // BLOCK_BYTES[ggml_type] * BLOCK
    if row_bytes % BLOCK_BYTES[ggml_type] or x.shape[-1] != D:
        raise ValueError(f"blocks [{N}, {row_bytes}] hold rows of {D} {ggml_type} weights "
                         f"({row_bytes % BLOCK_BYTES[ggml_type]} bytes left over); x must be "
                         f"[..., {D}], got {x.shape}")
    return packed_product(aligned(blocks), ggml_type, x)


def packed_product(blocks, ggml_type, x, parallel=None):
    """x W^T from checked blocks (see :func:`aligned`; :class:`npllm.model.weights.PackedWeight`
    checks them once, at load) and float32 x [..., D]: the decoding step's call, with only the
    checks that keep the kernel inside its arrays. ``parallel``: None chooses by size, False
    runs the serial loop."""
    N, D = blocks.shape[0], x.shape[-1]
    if blocks.shape[1] * BLOCK != D * BLOCK_BYTES[ggml_type] or x.dtype != np.float32:
        return _product(blocks, x, ggml_type)  # raises, or converts x
    rows = x.reshape(-1, D)
    if not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows)
    y = np.empty((rows.shape[0], N), np.float32)
    if N and rows.shape[0]:
        driver = _DRIVERS[ggml_type][rows.shape[0] > 1]
        with one_thread_while(parallel is False or rows.shape[0] * N * D < SERIAL_MATVEC_BELOW):
            driver(blocks, rows, y)
    return y.reshape(x.shape[:-1] + (N,))


def q4_1_matvec(blocks, x):
    r"""y = x W^T for W [N, D] stored as Q4_1 blocks, without expanding W in memory.

    blocks uint8 [N, D / 32 * 20] (a row's D / 32 blocks of 20 bytes: f16 d, f16 m, 16 bytes
    of 4-bit q), x float32 [..., D] -> y [..., N], :math:`y_{\dots n} = \sum_k W_{nk}
    x_{\dots k}` with :math:`W = \mathrm{dequantize}(\text{blocks})` exactly (see the module
    docstring); summed in float32, in another order than BLAS.
    """
    return _product(blocks, x, "Q4_1")


def q8_0_matvec(blocks, x):
    r"""y = x W^T for W [N, D] stored as Q8_0 blocks, without expanding W in memory.

    blocks uint8 [N, D / 32 * 34] (a row's D / 32 blocks of 34 bytes: f16 d, 32 int8 q),
    x float32 [..., D] -> y [..., N], as :func:`q4_1_matvec`.
    """
    return _product(blocks, x, "Q8_0")


MATVECS = {"Q4_1": q4_1_matvec, "Q8_0": q8_0_matvec}


def matvec(blocks, ggml_type, x):
    """y = x W^T for W stored as ``ggml_type`` blocks (a key of :data:`MATVECS`)."""
    return MATVECS[ggml_type](blocks, x)


def dequantize(blocks, ggml_type):
    r"""The readable reference: W [N, D] float32 from its blocks, by ``gguf.quants.dequantize``.

    The function that made the float32 weights of an imported GGUF model; the kernels above
    compute with exactly its numbers. ``dequantize(blocks, t) @ x`` equals ``matvec(blocks, t,
    x)`` up to the order of the float32 additions.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    blocks = np.asarray(blocks, dtype=np.uint8)
    w = gguf_dequantize(blocks, GGMLQuantizationType[ggml_type])
    return np.asarray(w, dtype=np.float32).reshape(blocks.shape[0], -1)
