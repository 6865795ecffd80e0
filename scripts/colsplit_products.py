"""Micro-benchmark: a long pass's weight products split by rows (today's parts) or by columns.

For every layer of the default model, the four products of a T-token pass (q|k|v, o, gate|up,
down, the engine's fused layouts), run on n threads with BLAS on one thread per call, two ways:

- rows: thread j multiplies its T/n rows by every matrix, layer after layer, no waiting (what
  ``Parallel.forward_in_parts`` does for the products);
- columns: every product is split by the output's columns (W's rows) between the threads, each
  with all T rows into an output of its own, and every thread waits for the others after each
  product (a barrier); "+3 waits": three more barriers per layer (a layer split this way waits
  about 7 times: the norms, attention and SwiGLU in between); "one aligned output": the threads
  write their columns into one shared [T, N] array (``np.matmul(..., out=y[:, a:b])``).

Interleaved rounds (the order alternates); per round, the process's CPU time (every thread's)
and the wall time. On a machine shared with other work, the CPU time is the main measure.

    python scripts/colsplit_products.py --reps 15 --tokens 512
"""
import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import npllm
from npllm.engine.threads import blas_on_one_thread, machine_threads


def matrices(engine):
    """Per layer: the float32 matrices [out, in] of its products as the engine stores them."""
    return [[W for p in (layer.qkv, layer.o, layer.gate_up, layer.down) for W, _ in p.groups]
            for layer in engine.layers]


def by_rows(pool, n, layers, inputs, T):
    bounds = [T * j // n for j in range(n + 1)]

    def part(j):
        lo, hi = bounds[j], bounds[j + 1]
        for ws in layers:
            for W in ws:
                inputs[W.shape[1]][lo:hi] @ W.T
    futures = [pool.submit(part, j) for j in range(1, n)]
    part(0)
    for f in futures:
        f.result()


def aligned_empty(shape, align=64):
    """A float32 array starting on a cache line (NumPy's own start 16 bytes into a page), so
    that column ranges of a multiple of 16 share no cache line between threads."""
    raw = np.empty(int(np.prod(shape)) * 4 + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + int(np.prod(shape)) * 4].view(np.float32).reshape(shape)


def by_columns(pool, n, layers, inputs, T, barrier, shared_output=False, extra_waits=0):
    """Each product split by W's rows, the threads waiting for each other after it;
    ``shared_output``: they write into one [T, N] array (its column ranges), else each into
    its own [T, N / n]; ``extra_waits``: more barriers per layer (for the element-wise steps
    between the products, which a layer split this way would wait for too)."""
    outs = {id(W): aligned_empty((T, W.shape[0])) for ws in layers for W in ws} \
        if shared_output else None

    def part(j):
        for ws in layers:
            for W in ws:
                N = W.shape[0]
                a, b = N * j // n, N * (j + 1) // n
                x = inputs[W.shape[1]]
                if shared_output:
                    np.matmul(x, W[a:b].T, out=outs[id(W)][:, a:b])
                else:
                    x @ W[a:b].T
                barrier.wait()
            for _ in range(extra_waits):
                barrier.wait()
    futures = [pool.submit(part, j) for j in range(1, n)]
    part(0)
    for f in futures:
        f.result()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    model = npllm.load(engine="numba")
    n = max(2, args.threads or machine_threads())  # the split needs two threads at least
    layers = matrices(model.engine)
    rng = np.random.default_rng(0)
    widths = {W.shape[1] for ws in layers for W in ws}
    inputs = {d: rng.standard_normal((args.tokens, d)).astype(np.float32) for d in widths}
    flops = 2 * args.tokens * sum(W.size for ws in layers for W in ws)
    pool = ThreadPoolExecutor(n - 1)
    barrier = threading.Barrier(n)
    T = args.tokens
    runs = {"rows": lambda: by_rows(pool, n, layers, inputs, T),
            "columns": lambda: by_columns(pool, n, layers, inputs, T, barrier),
            "columns, +3 waits": lambda: by_columns(pool, n, layers, inputs, T, barrier,
                                                    extra_waits=3),
            "columns, one aligned output": lambda: by_columns(pool, n, layers, inputs, T,
                                                              barrier, True)}
    times = {k: ([], []) for k in runs}
    with blas_on_one_thread():
        for k in runs:  # warm up
            runs[k]()
        for r in range(args.reps):
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                c0, w0 = time.process_time(), time.perf_counter()
                runs[k]()
                times[k][0].append(time.process_time() - c0)
                times[k][1].append(time.perf_counter() - w0)
    print(f"{n} threads, {args.tokens} tokens, {len(layers)} layers, {flops / 1e9:.1f} GFLOP, "
          f"{args.reps} interleaved rounds")
    for k, (cpu, wall) in times.items():
        print(f"{k:27s} CPU median {statistics.median(cpu):.4f} s (min {min(cpu):.4f}, max "
              f"{max(cpu):.4f}) = {flops / statistics.median(cpu) / 1e9:.1f} GFLOP/s per core; "
              f"wall median {statistics.median(wall):.4f} s (min {min(wall):.4f}, max "
              f"{max(wall):.4f})")
    cpu = {k: statistics.median(v[0]) for k, v in times.items()}
    wall = {k: statistics.median(v[1]) for k, v in times.items()}
    for k in list(runs)[1:]:
        print(f"{k} / rows: CPU {cpu[k] / cpu['rows']:.3f}, wall {wall[k] / wall['rows']:.3f}")


if __name__ == "__main__":
    main()
