"""When a kernel runs on one thread and when on all of them.

Every kernel has a function for one row (or one block of rows) and two drivers that loop over
the rows: ``numba.prange`` in the parallel one, ``range`` in the serial one. The wrappers choose
the serial driver for small inputs, such as the single token of a decoding step: there, waking
the thread pool costs more than the work, and on a busy machine the parallel loop would wait
for a core to become free before it can finish.
"""

# Inputs with fewer elements than this run on one thread (~2^16 float32 operations: ~10 us).
SERIAL_BELOW = 1 << 16
# Attention with fewer multiply-adds in q k^T than this (B * H * T * S * Dh; ~4M, about half a
# millisecond on one core) runs on one thread. Decoding one token with SmolLM2's 9 heads of
# width 64 stays serial up to ~7000 cached positions.
SERIAL_ATTENTION_BELOW = 1 << 22
