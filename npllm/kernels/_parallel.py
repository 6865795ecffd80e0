"""When a kernel runs on one thread and when on all of them.

Every kernel has a function for one row (or one block of rows) and two drivers that loop over
the rows: ``numba.prange`` in the parallel one, ``range`` in the serial one. In a forward pass
the wrappers choose the serial driver:

- NumPy's matrix products already use every core (OpenBLAS's threads), and OpenBLAS keeps its
  worker threads spinning, ready for the next product, for a while after each one
  (``OPENBLAS_THREAD_TIMEOUT``). A Numba parallel loop between two products then gets no free
  core: its threads fight the spinning ones, and Numba's own threads spin after a loop,
  stealing the cores from BLAS's next product. (The engine uses every core another way: it
  runs whole forward passes in parallel, ``npllm/engine/threads.py``.)
- The kernels do little work per call (a layer's RMSNorm is 0.3 M numbers): waking a thread
  pool costs more than it saves, and on a busy machine a parallel loop waits for the slowest
  of its threads.

So the parallel drivers run only for inputs far larger than a forward pass of a small model
makes (tests force them to check that both drivers give the same numbers).
"""

# Inputs with fewer elements than this run on one thread (2^24: 64 MB of float32).
SERIAL_BELOW = 1 << 24
# Attention with fewer multiply-adds in q k^T than this (B * H * T * S * Dh) runs its softmax
# on one thread (2^34: SmolLM2 over 8,192 tokens is 2^35).
SERIAL_ATTENTION_BELOW = 1 << 34
# Products with packed weights (kernels/quantized.py) with fewer multiply-adds than this run on
# one thread. They are used when decoding, where no BLAS product runs: the threads are free,
# and even the smallest projection of a small model (576 x 576) is worth several. (Right after
# BLAS products, while BLAS's threads still spin, the engine asks for one thread whatever their
# size: npllm.engine.fast.BlasSpin.)
SERIAL_MATVEC_BELOW = 1 << 16
