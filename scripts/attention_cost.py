"""The n^2 cost of attention, measured (lecture 004: "n words -> n^2 relationships to compute
and store -> expensive!").

    python scripts/attention_cost.py                          # T = 64 ... 4096, default model
    python scripts/attention_cost.py --T 64 128 256 -o cost.png --json cost.json

For each sequence length T, on one decoder layer of the default model (SmolLM2-135M: D = 576,
H = 9 query heads, K = 3 key/value heads, Dh = 64, F = 1536; its real layer-0 weights), built
from npllm's equations (the readable NumPy reference, one thread):

- **attention**: the core, scores Q K^T / sqrt(Dh) + mask, softmax, weighted sum of V
  (``grouped_query_attention``) on the layer's own Q, K, V;
- **MLP**: the SwiGLU MLP (``swiglu_mlp``) on the same T tokens;
- **layer**: the whole block: RMSNorm, Q/K/V projections, RoPE, attention, o_proj, residual,
  RMSNorm, MLP, residual.

Time is the best of ``--repeats`` runs (``time.perf_counter``); memory is the peak of NumPy's
allocations during the call (``tracemalloc``, which NumPy reports to), measured in a separate
run. Slopes are least-squares fits of log(time) and log(memory) against log(T) over the
lengths >= ``--fit-from``: 2 means "doubling T quadruples it", 1 "doubles it". The crossover
is the T where attention's time reaches the MLP's (interpolated on the log-log lines).
Writes a log-log plot (``-o``), the numbers as JSON (``--json``) and prints a table.
Timings depend on the machine and on what else runs: re-run on a quiet machine to compare.
"""
import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npllm.equations import (apply_rope, causal_mask, grouped_query_attention,  # noqa: E402
                             merge_heads, rms_norm, rope_cos_sin, rope_inverse_frequencies,
                             split_heads, swiglu_mlp)

DEFAULT_T = [64, 128, 256, 512, 1024, 2048, 4096]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"
PARTS = ("attention", "MLP", "layer")


def layer_weights(model, layer=0):
    """The weights of one decoder layer, by short name, from ``model.weights`` (HF names)."""
    prefix = f"model.layers.{layer}."
    return {name[len(prefix):]: w for name, w in model.weights.items() if name.startswith(prefix)}


def make_parts(config, w, T, seed=0):
    """Three closures over T tokens of random hidden states: attention core, MLP, whole layer."""
    D, H, K = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    Dh = getattr(config, "head_dim", None) or D // H
    x = np.random.default_rng(seed).standard_normal((T, D)).astype(np.float32)
    cos, sin = rope_cos_sin(np.arange(T), rope_inverse_frequencies(Dh, config.rope_theta))
    mask = causal_mask(T)

    def qkv(h):
        q = apply_rope(split_heads(h @ w["self_attn.q_proj.weight"].T, H), cos, sin)
        k = apply_rope(split_heads(h @ w["self_attn.k_proj.weight"].T, K), cos, sin)
        v = split_heads(h @ w["self_attn.v_proj.weight"].T, K)
        return q, k, v

    q, k, v = qkv(rms_norm(x, w["input_layernorm.weight"], config.rms_norm_eps))
    mlp_w = (w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"])

    def attention():
        return grouped_query_attention(q, k, v, mask)

    def mlp():
        return swiglu_mlp(x, *mlp_w)

    def layer():
        h = x + merge_heads(grouped_query_attention(
            *qkv(rms_norm(x, w["input_layernorm.weight"], config.rms_norm_eps)), mask)) \
            @ w["self_attn.o_proj.weight"].T
        return h + swiglu_mlp(rms_norm(h, w["post_attention_layernorm.weight"],
                                       config.rms_norm_eps), *mlp_w)

    return {"attention": attention, "MLP": mlp, "layer": layer}


def best_time(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bytes(run):
    """The peak of memory allocated (and traced) during ``run()``, above what existed before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        run()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def measure(config, weights, lengths, repeats=3, progress=True):
    """{"T": [...], "seconds": {part: [...]}, "bytes": {part: [...]}} for each length."""
    from tqdm import tqdm
    out = {"T": list(lengths), "seconds": {p: [] for p in PARTS}, "bytes": {p: [] for p in PARTS}}
    for T in tqdm(lengths, desc="lengths", unit="T", disable=not progress):
        parts = make_parts(config, weights, T)
        for name, run in parts.items():
            run()  # warm-up: first-touch page faults and BLAS setup out of the timing
            out["seconds"][name].append(best_time(run, repeats if T <= 1024 else 1))
            out["bytes"][name].append(peak_bytes(run))
    return out


def fit_slope(lengths, values, fit_from=0):
    """Least-squares slope and intercept of log(values) against log(T), for T >= fit_from."""
    T, y = np.asarray(lengths, float), np.asarray(values, float)
    keep = T >= fit_from
    if keep.sum() < 2:
        raise ValueError(f"need at least two lengths >= {fit_from} to fit a slope, got {T[keep]}")
    slope, intercept = np.polyfit(np.log(T[keep]), np.log(y[keep]), 1)
    return float(slope), float(intercept)


def crossover(lengths, a, b):
    """The first T at which ``a`` reaches ``b``, interpolated log-linearly between measured
    lengths; None if it never does in the range."""
    la, lb, lT = (np.log(np.asarray(v, float)) for v in (a, b, lengths))
    d = la - lb
    if d[0] >= 0:
        return float(lengths[0])
    for i in range(1, len(d)):
        if d[i] >= 0:
            f = -d[i - 1] / (d[i] - d[i - 1])
            return float(np.exp(lT[i - 1] + f * (lT[i] - lT[i - 1])))
    return None


def summarise(result, fit_from):
    fits = {kind: {p: fit_slope(result["T"], result[kind][p], fit_from)[0] for p in PARTS}
            for kind in ("seconds", "bytes")}
    return {"fit_from": fit_from, "slopes": fits,
            "crossover_T": crossover(result["T"], result["seconds"]["attention"],
                                     result["seconds"]["MLP"]),
            "attention_share_of_layer": [a / l for a, l in zip(result["seconds"]["attention"],
                                                               result["seconds"]["layer"])]}


def plot(result, summary, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.6), layout="constrained", dpi=100)
    T = np.asarray(result["T"], float)
    colors = {"attention": "C3", "MLP": "C0", "layer": "C2"}
    for ax, kind, unit, scale in zip(fig.subplots(1, 2), ("seconds", "bytes"),
                                     ("time (s)", "peak memory (MiB)"), (1.0, 2.0 ** -20)):
        for p in PARTS:
            y = np.asarray(result[kind][p], float) * scale
            slope, intercept = fit_slope(T, result[kind][p], summary["fit_from"])
            ax.plot(T, y, "o-", color=colors[p], label=f"{p}: slope {slope:.2f}")
            keep = T >= summary["fit_from"]
            ax.plot(T[keep], np.exp(intercept) * T[keep] ** slope * scale, ":", color="black",
                    lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        if kind == "seconds" and summary["crossover_T"]:
            ax.axvline(summary["crossover_T"], color="grey", ls="--", lw=1,
                       label=f"attention = MLP at T = {summary['crossover_T']:.0f}")
        ax.legend(fontsize=8)
        ax.set_title(f"one SmolLM2 layer, {unit.split(' (')[0]} against T "
                     f"(slopes fitted for T >= {summary['fit_from']})", fontsize=9)
    fig.savefig(path, dpi=110)
    return fig


def table(result, summary):
    lines = [f"{'T':>6} " + " ".join(f"{p + ' s':>13}" for p in PARTS)
             + " " + " ".join(f"{p + ' MiB':>15}" for p in PARTS) + f" {'attn/layer':>10}"]
    for i, T in enumerate(result["T"]):
        lines.append(f"{T:>6} " + " ".join(f"{result['seconds'][p][i]:>13.5f}" for p in PARTS)
                     + " " + " ".join(f"{result['bytes'][p][i] / 2**20:>15.1f}" for p in PARTS)
                     + f" {summary['attention_share_of_layer'][i]:>10.0%}")
    s = summary["slopes"]
    lines.append(f"slopes for T >= {summary['fit_from']}: time " + ", ".join(
        f"{p} {s['seconds'][p]:.2f}" for p in PARTS) + "; memory " + ", ".join(
        f"{p} {s['bytes'][p]:.2f}" for p in PARTS))
    c = summary["crossover_T"]
    lines.append("attention takes as long as the MLP at T = "
                 + (f"{c:.0f}" if c else "(not within the measured lengths)"))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=DEFAULT_T,
                        help=f"sequence lengths (default {' '.join(map(str, DEFAULT_T))})")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per length up to T = 1024, the best kept (default 3)")
    parser.add_argument("--fit-from", type=int, default=512,
                        help="fit the slopes on lengths >= this (default 512)")
    parser.add_argument("-m", "--model", default=None, help="model (default: the default model)")
    parser.add_argument("-o", "--output", default="attention_cost.png", help="the plot to write")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    lengths = sorted(set(args.T))
    if sum(T >= args.fit_from for T in lengths) < 2:
        parser.error(f"--fit-from {args.fit_from} leaves fewer than two lengths to fit: "
                     f"lower it or add longer --T")
    import npllm
    model = npllm.load(args.model)
    result = measure(model.config, layer_weights(model), lengths, args.repeats)
    summary = summarise(result, args.fit_from)
    print(table(result, summary))
    plot(result, summary, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    if args.json:
        command = "python scripts/attention_cost.py " + " ".join(
            argv if argv is not None else sys.argv[1:])
        run = {"command": command.strip(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "cpu": cpu_name(), "cpus": os.cpu_count(),
               "load_average": [round(x, 2) for x in os.getloadavg()],
               "threads": {k: os.environ.get(k) for k in THREAD_VARIABLES}}
        Path(args.json).write_text(json.dumps({**result, **summary, "run": run}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
