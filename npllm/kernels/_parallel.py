"""When a kernel runs on one thread and when on all of them.

Every kernel has a function for one row (or one block of rows) and two drivers that loop over
the rows: ``numba.prange`` in the parallel one, ``range`` in the serial one. In a forward pass
the wrappers choose the serial driver, for two reasons measured on a 2-core machine:

- NumPy's matrix products already use every core (OpenBLAS's threads), and OpenBLAS keeps its
  worker threads spinning, ready for the next product, for a while after each one (~0.1 s by
  default, ``OPENBLAS_THREAD_TIMEOUT``). A Numba parallel loop between two products then gets
  no free core: its threads fight the spinning ones (and Numba's own OpenMP threads spin after
  a loop, stealing the core from OpenBLAS's next product). On SmolLM2 over 512 tokens the
  forward pass took 3.4 s with the parallel kernels and 0.9 s with the serial ones.
- The kernels do little work per call (a layer's RMSNorm is 0.3 M numbers): waking a thread
  pool costs more than it saves, and on a busy machine a parallel loop waits for the slowest
  of its threads.

So the parallel drivers run only for inputs far larger than a forward pass of the default
model makes (tests force them to check that both drivers give the same numbers).
"""

# Inputs with fewer elements than this run on one thread (2^24: 64 MB of float32).
SERIAL_BELOW = 1 << 24
# Attention with fewer multiply-adds in q k^T than this (B * H * T * S * Dh) runs its softmax
# on one thread (2^34: SmolLM2 over 8,192 tokens is 2^35).
SERIAL_ATTENTION_BELOW = 1 << 34
# Products with packed weights (kernels/quantized.py) with fewer multiply-adds than this run on
# one thread. They are used when decoding, where no BLAS product runs: the threads are free,
# and even the smallest projection of the default model (576 x 576, 15 us on one thread) is
# worth two. (Right after BLAS products, while BLAS's threads still spin, they run on one
# thread whatever their size: npllm.backend.blas_threads_spinning.)
SERIAL_MATVEC_BELOW = 1 << 16
