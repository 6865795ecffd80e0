"""Throughput of `npllm score` on a local Dask cluster beside one process (issue 19).

    python scripts/bench_distributed.py [--workers 2] [--repeat 25] [--model NAME]

The corpus is the 40 sentences of docs/scoring.md's appendix, repeated (``--repeat``). One
process scores it with npllm's defaults (BLAS on every core, two batches at a time on two
threads); the cluster has ``--workers`` processes of one thread each (Dask sets one BLAS thread
per worker). Model loading and cluster start-up are timed apart: the rate is scored tokens per
second of scoring. The machine's load average is printed too: on a shared machine the numbers
move with it.
"""
import argparse
import os
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sentences():
    page = (ROOT / "docs" / "scoring.md").read_text(encoding="utf-8")
    block = re.search(r"<summary>sentences\.txt.*?```text\n(.*?)```", page, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    import npllm
    from npllm import distributed
    from npllm.score import iter_scores

    texts = sentences() * args.repeat
    print(f"{len(texts)} sentences, model {args.model or 'default'}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    t = time.perf_counter()
    model = npllm.load(args.model)
    loaded = time.perf_counter() - t
    t = time.perf_counter()
    single = [r for _, r in iter_scores(model, texts)]
    seconds = time.perf_counter() - t
    tokens = sum(r.n_scored for r in single)
    print(f"one process : {tokens / seconds:7.1f} tokens/s ({tokens} tokens in {seconds:.1f} s; "
          f"model loaded in {loaded:.1f} s)")

    t = time.perf_counter()
    with distributed.local_cluster(args.workers) as client:
        distributed.load_on_workers(client, args.model)
        started = time.perf_counter() - t
        t = time.perf_counter()
        spread = [r for _, r in distributed.iter_scores(args.model, texts, client=client)]
        seconds_d = time.perf_counter() - t
    assert [r.token_ids for r in spread] == [r.token_ids for r in single]
    print(f"{args.workers} workers   : {tokens / seconds_d:7.1f} tokens/s ({seconds_d:.1f} s; "
          f"cluster started and model loaded on every worker in {started:.1f} s)")
    print(f"speed-up    : {seconds / seconds_d:.2f}x; load average now "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
