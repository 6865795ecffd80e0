"""``npllm score`` and ``npllm perplexity`` (issue 4): inputs, outputs, error records, exit
status, --resume. Most tests call ``npllm.cli.main`` on a tiny model and parse what it wrote
(JSON, TSV), never hard-coded printed numbers; a few run the real command in a subprocess.
"""
import io
import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import CORPUS, tiny_llama

import npllm
from npllm.cli import main
from npllm.score import score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder():
    return str(tiny_llama())


@pytest.fixture(scope="module")
def model(folder):
    return npllm.load(folder)


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``npllm *argv``."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def jsonl(text):
    return [json.loads(line) for line in text.splitlines()]


def assert_same_scores(got, expected):
    """Per-token log-probs of a record against the Python API (scored in another batch: 1e-5)."""
    assert [g is None for g in got] == [e is None for e in expected]
    np.testing.assert_allclose([g for g in got if g is not None],
                               [e for e in expected if e is not None], atol=1e-5, rtol=0)


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


# -- the readable table ---------------------------------------------------------------------------

@pytest.mark.real_model
def test_he_runs_fast_prints_the_three_factors_and_the_total(capsys):
    status, out, _ = run_cli(capsys, "score", "He runs fast")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "P(He runs fast) = P(He) x P( runs | He) x P( fast | He runs)"
    rows = [line.split() for line in lines if re.match(r"\s+\d+\s+P\(", line)]
    assert [r[1] for r in rows] == ["P(He)", "P(", "P("] and len(rows) == 3
    logs = [float(r[-1]) for r in rows]
    total_row = next(line for line in lines if line.strip().startswith("product"))
    assert float(total_row.split()[-1]) == pytest.approx(sum(logs), abs=2e-4)
    assert "<|endoftext|>" in out and "nats" in out


def test_table_for_several_texts_and_a_context(capsys, folder, model):
    status, out, _ = run_cli(capsys, "score", "-m", folder, "-c", "The capital is", " Paris",
                             " Lyon", "--words")
    assert status == 0
    assert "[text 1]" in out and "[text 2]" in out and "words:" in out
    assert "P( Paris | The capital is) = " in out
    expected = score(model, [" Paris", " Lyon"], context="The capital is")
    assert f"{expected[0].total:.4f} nats" in out and f"{expected[1].total:.4f} nats" in out


def test_help_explains_options_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["score", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in ("examples:", "--resume", "--text-field", "--bos", "--window", "--stride",
                   "exit status", 'npllm score "He runs fast"'):
        assert needle in out
    with pytest.raises(SystemExit):
        main(["perplexity", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "standard error" in out and "--split" in out


# -- machine formats ------------------------------------------------------------------------------

def test_jsonl_metadata_then_one_full_precision_record_per_line(capsys, tmp_path, folder, model):
    texts = ["He runs fast", "The quick brown fox", "café 東京 🙂"]
    path = write(tmp_path / "in.txt", "\n".join(texts) + "\n")
    status, out, err = run_cli(capsys, "score", "-m", folder, "-f", path, "--format", "jsonl",
                               "--base", "2", "--rank", "--entropy", "--greedy", "--words")
    assert status == 0
    meta, *records = jsonl(out)
    assert meta["type"] == "metadata" and meta["npllm_version"] == npllm.__version__
    assert meta["model"] == folder and meta["source"] == model.source
    assert meta["bos"]["token"] == "<|endoftext|>" and meta["base"] == "2"
    assert meta["unit"] == "bits" and meta["window"] == 256 and meta["stride"] == 128
    assert [r["id"] for r in records] == [1, 2, 3] and [r["line"] for r in records] == [1, 2, 3]
    expected = score(model, texts, base=2, with_rank=True, with_entropy=True, with_greedy=True)
    for r, s in zip(records, expected):
        assert r["type"] == "score" and r["text"] == s.text
        assert r["log_probs"] == s.log_probs  # full precision: equal, not approximately
        assert r["total"] == s.total and r["perplexity"] == s.perplexity
        assert r["ranks"] == s.ranks and r["entropies"] == s.entropies
        assert r["is_greedy"] == s.is_greedy
        assert r["tokens"] == s.tokens and r["offsets"] == [list(o) for o in s.offsets]
        assert math.fsum(w["log_prob"] for w in r["words"]) == pytest.approx(r["total"])
    assert "npllm score" in err  # the progress bar, on stderr


def test_tsv_one_row_per_token(capsys, tmp_path, folder, model):
    path = write(tmp_path / "in.txt", "He runs\n\nfast\ttab\n")
    status, out, _ = run_cli(capsys, "score", "-m", folder, "-f", path, "--format", "tsv", "-q",
                             "--bos", "none")
    assert status == 1  # the empty line failed
    header, *rows = [line.split("\t") for line in out.splitlines()]
    assert header[:8] == ["id", "line", "token_index", "token", "token_id", "start", "end",
                          "log_prob"] and header[-1] == "error"
    by_id = {}
    for row in rows:
        by_id.setdefault(row[0], []).append(dict(zip(header, row)))
    first = score(model, "He runs", bos=False)
    assert [r["token"] for r in by_id["1"]] == first.tokens
    assert by_id["1"][0]["log_prob"] == "NA"  # unscored first token, not 0
    assert_same_scores([float(r["log_prob"]) for r in by_id["1"][1:]], first.log_probs[1:])
    assert by_id["2"][0]["error"] == "line 2: the text is empty: there is nothing to score"
    assert "".join(r["token"] for r in by_id["3"]) == "fast\\ttab"  # escaped tab


def test_stdin_and_quiet(capsys, monkeypatch, folder):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one\ntwo\n")))
    status, out, err = run_cli(capsys, "score", "-m", folder, "--format", "jsonl", "-q")
    assert status == 0 and err == ""
    meta, *records = jsonl(out)
    assert meta["input"] == "stdin" and [r["text"] for r in records] == ["one", "two"]


# -- bad input: an error record, and the rest is still scored -------------------------------------

def test_text_file_bad_lines_become_error_records(capsys, tmp_path, folder, model):
    path = write(tmp_path / "in.txt", b"He runs fast\n\n\xff\xfe broken\nThe end\n")
    status, out, err = run_cli(capsys, "score", "-m", folder, "-f", path, "--format", "jsonl")
    assert status == 1
    assert "2 of 4 texts could not be scored" in err
    _, *records = jsonl(out)
    assert [r["type"] for r in records] == ["score", "error", "error", "score"]
    assert records[1]["error"] == "line 2: the text is empty: there is nothing to score"
    assert records[2]["error"] == ("line 3 is not valid UTF-8 (invalid start byte: byte 0xff at "
                                   "byte 0)")
    assert_same_scores(records[3]["log_probs"], score(model, "The end").log_probs)


def test_jsonl_fields_unknown_fields_and_malformed_lines(capsys, tmp_path, folder, model):
    lines = [
        {"item": "a", "sentence": " Paris", "prefix": "The capital is"},
        {"item": "b", "sentence": " Lyon", "prefix": "The capital is"},
        '{"item": "c", "sentence": "broken',                        # malformed JSON
        {"item": "d", "text": "no sentence field"},                  # unknown field name
        {"item": "e", "sentence": "", "prefix": "Just a context"},   # context, no continuation
        {"item": "f", "sentence": 42, "prefix": None},               # not a string
        [1, 2],                                                      # not an object
        {"item": "g", "sentence": "The end", "prefix": None},
    ]
    path = write(tmp_path / "in.jsonl", "\n".join(
        line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    status, out, _ = run_cli(capsys, "score", "-m", folder, "-f", path, "--format", "jsonl",
                             "--text-field", "sentence", "--context-field", "prefix",
                             "--id-field", "item", "-q")
    assert status == 1
    meta, *records = jsonl(out)
    assert meta["fields"] == {"text": "sentence", "context": "prefix", "id": "item"}
    assert meta["input_format"] == "jsonl"
    assert [r["type"] for r in records] == ["score", "score", "error", "error", "error", "error",
                                            "error", "score"]
    errors = {r["id"] if r["id"] is not None else r["line"]: r["error"] for r in records
              if r["type"] == "error"}
    # a line whose id cannot be read has none (null), never its line number (issue 18)
    assert [r["id"] for r in records if r["line"] in (3, 7)] == [None, None]
    assert errors[3].startswith("line 3 is not valid JSON: Unterminated string")
    assert errors["d"] == ("line 4 has no field 'sentence' for the text (its fields: item, "
                           "text)")
    assert "has no continuation" in errors["e"]
    assert errors["f"] == "line 6: field 'sentence' must be a string, got 42"
    assert errors[7] == "line 7 is not a JSON object: [1, 2]"
    expected = score(model, [" Paris", " Lyon", "The end"],
                     context=["The capital is", "The capital is", None])
    scored = [r for r in records if r["type"] == "score"]
    assert [r["id"] for r in scored] == ["a", "b", "g"]
    for r, s in zip(scored, expected):
        assert_same_scores(r["log_probs"], s.log_probs)
        assert r["context"] == s.context


def test_tsv_input_and_an_unknown_column(capsys, tmp_path, folder, model):
    path = write(tmp_path / "in.tsv", "id\ttext\nx1\tHe runs fast\nx2\tThe end\textra\n")
    status, out, _ = run_cli(capsys, "score", "-m", folder, "-f", path, "--format", "jsonl",
                             "--id-field", "id", "-q")
    assert status == 1
    _, good, bad = jsonl(out)
    assert good["id"] == "x1"
    assert_same_scores(good["log_probs"], score(model, "He runs fast").log_probs)
    assert bad["error"] == "line 3 has 3 tab-separated cells, the header has 2"
    status, _, err = run_cli(capsys, "score", "-m", folder, "-f", path, "--text-field", "body")
    assert status == 2
    assert "the TSV header has no column 'body' for the text (its columns: id, text)" in err


def test_text_longer_than_the_window(capsys, tmp_path, folder):
    long = CORPUS.replace("\n", " ")
    path = write(tmp_path / "in.txt", f"short one\n{long}\nanother short one\n")
    status, out, _ = run_cli(capsys, "score", "-m", folder, "-f", path, "--format", "jsonl",
                             "-q", "--window", "64", "--no-slide")
    assert status == 1
    _, first, middle, last = jsonl(out)
    assert first["type"] == last["type"] == "score"
    assert middle["type"] == "error" and "more than the window of 64" in middle["error"]
    assert "--no-slide" in middle["error"]
    status, out, _ = run_cli(capsys, "score", "-m", folder, "-f", path, "--format", "jsonl",
                             "-q", "--window", "64", "--stride", "16")
    assert status == 0
    _, _, slid, _ = jsonl(out)
    assert slid["slid"] and min(slid["context_lengths"][64:]) >= 64 - 16 + 1
    assert any("sliding window" in n for n in slid["notes"])


def test_duplicate_ids_are_errors(capsys, tmp_path, folder):
    path = write(tmp_path / "in.jsonl", '{"id": 1, "text": "a b"}\n{"id": 1, "text": "c d"}\n')
    status, out, _ = run_cli(capsys, "score", "-m", folder, "-f", path, "--format", "jsonl",
                             "--id-field", "id", "-q")
    assert status == 1
    assert "id 1 was already used at line 1" in jsonl(out)[2]["error"]


def test_usage_errors_exit_2(capsys, tmp_path, folder):
    out_file = write(tmp_path / "out.jsonl", "something\n")
    cases = [
        (["--resume", "x"], "--resume continues an output file"),
        (["-o", out_file, "x"], "exists: add --resume to continue it, --force to overwrite"),
        (["--text-field", "t", "x"], None),
        (["--bos", "<nope>", "x"], "'<nope>' is not a token"),
        (["--window", "100000", "x"], "longer than the model's context of 256"),
        (["-o", out_file, "--resume", "--format", "jsonl", "x"], "does not start with npllm's "
                                                                  "metadata"),
    ]
    for argv, message in cases:
        status, _, err = run_cli(capsys, "score", "-m", folder, *argv)
        assert status == 2, argv
        assert "npllm score: error: " in err
        if message:
            assert message in err


# -- resume ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_resume_after_a_truncated_write_equals_one_run(capsys, tmp_path, folder, fmt):
    texts = [CORPUS[i:i + 20 + i % 37] for i in range(0, 1200, 12)] + [""]
    path = write(tmp_path / "in.txt", "\n".join(t.replace("\n", " ") for t in texts) + "\n")
    common = ["score", "-m", folder, "-f", path, "--format", fmt, "-q", "--batch-size", "7",
              "--rank"]
    whole = tmp_path / f"whole.{fmt}"
    assert run_cli(capsys, *common, "-o", str(whole))[0] == 1  # the empty last line
    reference = whole.read_bytes()
    for cut in (0.1, 0.5, 0.93):  # kill half way: keep part of the file, half a line too
        partial = tmp_path / f"partial.{fmt}"
        partial.write_bytes(reference[:int(len(reference) * cut)])
        if fmt == "tsv":  # TSV's settings live beside it
            Path(f"{partial}.meta.json").write_bytes(Path(f"{whole}.meta.json").read_bytes())
        assert run_cli(capsys, *common, "-o", str(partial), "--resume")[0] == 1
        assert partial.read_bytes() == reference
    if fmt == "tsv":
        assert json.loads(Path(f"{whole}.meta.json").read_text())["base"] == "e"
    status, _, err = run_cli(capsys, *common, "-o", str(partial), "--resume", "--base", "2")
    assert status == 2 and "written with other settings" in err


# -- perplexity ------------------------------------------------------------------------------------

def test_perplexity_json_and_table(capsys, tmp_path, folder, model):
    docs = [CORPUS[i:i + 120].replace("\n", " ") for i in range(0, 1200, 120)]
    path = write(tmp_path / "corpus.txt", "\n".join(docs) + "\n\n")
    status, out, _ = run_cli(capsys, "perplexity", "-m", folder, path, "--format", "json", "-q")
    assert status == 0
    result = json.loads(out)
    scores = score(model, docs)
    n = sum(s.n_scored for s in scores)
    assert result["n_documents"] == len(docs) and result["n_tokens"] == n
    assert result["perplexity"] == pytest.approx(math.exp(-sum(s.total for s in scores) / n),
                                                 rel=1e-12)
    assert result["stderr_method"] == "documents" and result["stderr"] > 0
    assert result["bos"]["token"] == "<|endoftext|>" and result["source"] == model.source
    status, out, _ = run_cli(capsys, "perplexity", "-m", folder, path, "-q")
    assert status == 0 and "perplexity" in out and "±" in out and "95% CI" in out
    status, out, _ = run_cli(capsys, "perplexity", "-m", folder, path, "-q", "--split", "file",
                             "--format", "json", "--window", "64")
    assert status == 0 and json.loads(out)["n_documents"] == 1
    assert json.loads(out)["stderr_method"].startswith("tokens")


def test_perplexity_skips_bad_lines_and_says_so(capsys, tmp_path, folder):
    path = write(tmp_path / "corpus.txt", b"good text here\n\xff bad\nmore good text\n")
    status, out, err = run_cli(capsys, "perplexity", "-m", folder, path, "--format", "json",
                               "-q")
    assert status == 1
    result = json.loads(out)
    assert result["n_documents"] == 2 and result["n_failed"] == 1
    assert "line 2 is not valid UTF-8" in err


# -- the real command -----------------------------------------------------------------------------

def npllm_command(*argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "npllm", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_subprocess_exit_codes_and_progress_bar(tmp_path, folder):
    proc = npllm_command("score", "-m", folder, "--backend", "numpy", "He runs fast")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.decode().startswith("P(He runs fast) = ")

    path = write(tmp_path / "in.txt", "one\n\ntwo\n")
    proc = npllm_command("score", "-m", folder, "--backend", "numpy", "-f", path, "--format",
                         "jsonl")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert [r["type"] for r in jsonl(out.decode())] == ["metadata", "score", "error", "score"]
    assert "npllm score: 100%" in err.decode() and "1 of 3 texts could not be scored" in \
        err.decode()

    proc = npllm_command("score", "-m", folder, "--resume", "x")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and b"npllm score: error: --resume" in err


def test_kill_half_way_then_resume_equals_one_uninterrupted_run(tmp_path, folder):
    words = "the a fox dog runs quick brown lazy over model token probability sum log".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, rng.integers(1, 14))) for _ in range(1000)]
    path = write(tmp_path / "in.txt", "\n".join(lines) + "\n")
    common = ["score", "-m", folder, "--backend", "numpy", "-f", path, "--format", "jsonl",
              "--batch-size", "1", "--entropy"]
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    proc = npllm_command(*common, "-o", str(whole), "--quiet")
    assert proc.wait(timeout=300) == 0

    proc = npllm_command(*common, "-o", str(resumed))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if resumed.exists() and resumed.read_bytes().count(b"\n") >= 400:
            break
        time.sleep(0.001)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = resumed.read_bytes().count(b"\n")
    assert 400 <= done < 1001
    proc = npllm_command(*common, "-o", str(resumed), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert resumed.read_bytes() == whole.read_bytes()
    assert b"100%" in err
