"""Measure ``OUTSIDE_BLAS`` (npllm/engine/threads.py): the share of a forward pass on one thread
spent outside BLAS's weight products.

On one thread (BLAS and Numba), interleaved rounds of:
- a T-token pass of the default model to the log-probabilities (``model(ids[:-1], targets=)``);
- its weight products alone: every layer's fused products (q|k|v, o, gate|up, down, as the
  engine stores them) and the LM head, on inputs of the same shapes.

The share is 1 - products / pass (medians). ``Parallel.parts`` uses it in Amdahl's law: in one
pass on t threads BLAS's products spread over every thread and the rest runs on one.

    python scripts/outside_blas.py --reps 9 --tokens 512
"""
import argparse
import statistics
import time

import numba
import numpy as np
from threadpoolctl import threadpool_limits

import npllm
from npllm.engine.packed import matmul


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per pass (default 512)")
    parser.add_argument("--model", default=None, help="default: npllm's default model")
    args = parser.parse_args()

    numba.set_num_threads(1)
    model = npllm.load(args.model, threads=1)
    engine = model.engine
    matrices = [W for layer in engine.layers
                for p in (layer.qkv, layer.o, layer.gate_up, layer.down) for W, _ in p.groups]
    rng = np.random.default_rng(0)
    T = args.tokens - 1
    inputs = {d: rng.standard_normal((1, T, d), dtype=np.float32)
              for d in {W.shape[1] for W in matrices}}
    head, D = engine.lm_head, engine.lm_head.shape[1]
    ids = rng.integers(0, model.config.vocab_size, size=args.tokens)

    def products():
        start = time.perf_counter()
        for W in matrices:
            matmul(inputs[W.shape[1]], W)
        for v0 in range(0, head.shape[0], 2048):  # in blocks, as the fused LM head computes it
            matmul(inputs[D], head[v0:v0 + 2048])
        return time.perf_counter() - start

    def forward_pass():
        start = time.perf_counter()
        model(ids[:-1], targets=ids[1:])
        return time.perf_counter() - start

    with threadpool_limits(1, "blas"):
        products(), forward_pass()  # warm up
        rounds = [(products(), forward_pass()) for _ in range(args.reps)]
    blas = statistics.median(r[0] for r in rounds)
    whole = statistics.median(r[1] for r in rounds)
    print(f"{args.tokens} tokens on one thread: the pass {whole * 1e3:.0f} ms, its weight "
          f"products {blas * 1e3:.0f} ms (medians of {args.reps}) -> outside BLAS "
          f"{1 - blas / whole:.1%}")


if __name__ == "__main__":
    main()
