"""scripts/bench.py runs end to end and both sides compute the same things (issue 6).

Not a timing test: speed is read from `make bench`'s table, never asserted. `--smoke` makes
every measurement once on tiny work (16 sentences, 4 new tokens); this checks that the script
has not rotted and that npllm and transformers score and decode the same way in it.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.real_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def test_bench_smoke_runs_and_both_sides_agree(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--threads", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["measure"].strip(): r for r in report["rows"]}
    for name in ("score 512 tokens", "decode 4 tokens, KV cache", "decode 4 tokens, no cache",
                 "score 16 sentences, batches of 16"):
        assert rows[name]["npllm"] > 0 and rows[name]["ratio"] > 0, name
    peak = rows["peak RSS, all of it (fresh process)"]
    assert 0 < peak["fraction_of_weights"]
    anonymous = rows["anonymous RSS at peak: load + score 512 tokens"]
    # The anonymous memory is part of the total, and the scoring allocates some of it.
    assert 0 < anonymous["npllm"] < peak["npllm"] and anonymous["target"] == "<= 0.25x weights"
    assert anonymous["npllm"] > report["memory"]["anonymous_before_mib"]
    # Scoring reads every weight (the LM head is the whole embedding matrix), so all of the
    # memory-mapped float32 weights are resident, and the parts cannot exceed the peak.
    parts = [r["npllm"] for name, r in rows.items() if name.startswith("resident at the end")]
    weights = rows["resident at the end: the memory-mapped weights"]["npllm"]
    assert len(parts) == 4 and weights >= 0.99 * peak["npllm"] / peak["fraction_of_weights"]
    assert sum(parts) <= peak["npllm"] * 1.001
    assert "score 512 tokens" in run.stdout  # the table
    checks = report["checks"]
    assert checks["decode_same_tokens"] == {"cache": True, "no_cache": True}
    assert checks["npllm_cache_equals_recompute"]
    # Per-token log-probs agree within 1e-4 (tests/test_score_default_model.py), so totals of
    # 511 tokens within 511e-4 and of a short sentence (< 30 tokens) within 3e-3.
    total = checks["score512_total_logprob"]
    assert abs(total["npllm"] - total["transformers"]) < 511e-4
    assert checks["batch_max_abs_diff_nats"] < 3e-3


def test_transformers_gets_the_batches_npllm_score_makes(default_model, monkeypatch):
    """The batch comparison is between engines: the transformers loop is handed the batches
    npllm.score forms (sorted by length within its chunks), read here from npllm's own forward
    passes on 300 of the benchmark's sentences (three chunks)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import bench
    import npllm
    from npllm.score import resolve_bos

    texts = bench.sentences(300)
    bos = resolve_bos(default_model).id
    rows = [[bos] + default_model.tokenizer.encode(t) for t in texts]
    seen = []
    real = type(default_model).forward

    def spy(self, ids, *args, **kwargs):
        seen.append([tuple(int(t) for t in row if t) for row in np.asarray(ids)])
        return real(self, ids, *args, **kwargs)
    monkeypatch.setattr(type(default_model), "forward", spy)
    monkeypatch.setattr(type(default_model), "__call__", spy)
    npllm.score(default_model, texts, batch_size=bench.BATCH_SIZE)
    planned = bench.score_batches(texts, rows)
    assert len(planned) == len(seen) and sum(map(len, planned)) == len(texts)
    for batch, ids in zip(planned, seen):
        # A row's last token is only a target, never an input. Padding is id 0 (also
        # <|endoftext|>, the BOS): compare the rows without zeros.
        assert [tuple(t for t in rows[i][:-1] if t) for i in batch] == ids
