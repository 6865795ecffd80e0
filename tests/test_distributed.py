"""Scoring on a Dask cluster (issue 19): ``npllm score --local-cluster N`` / ``--scheduler`` writes
the records a single process writes, in input order, and an interrupted run resumes without
losing or duplicating a record: real worker processes, killed for real.

The corpus is 2,000 short random sentences scored by a tiny random Llama; the cluster is a
``LocalCluster`` of 2 worker processes owned by the test (so the test knows their process ids),
reached by the CLI through ``--scheduler``.
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed  # npllm[dask], installed by the Makefile: missing, the tests fail
import pytest

from tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
N_LINES = 2000
WORDS = ("the quick brown fox jumps over lazy dog a language model assigns probability to "
         "every sequence of tokens attention compares query with all keys").split()
# Records are compared field by field; log-probabilities within 1e-5 relative (1e-6 absolute):
# a text's numbers do not depend on its batch or process beyond float32 rounding (a worker's
# BLAS may run on another number of threads than the single process, which reorders sums).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(19)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))).capitalize() + "."
             for _ in range(N_LINES)]
    lines[7] = ""  # an empty line: an error record, in its place
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folder():
    return tiny_llama()


def npllm_score(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "npllm", "score", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, **kwargs)


def start_npllm_score(*args):
    return subprocess.Popen([sys.executable, "-m", "npllm", "score", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(folder, corpus, tmp_path_factory):
    """The single-process run's output (no cluster option)."""
    out = tmp_path_factory.mktemp("single") / "single.jsonl"
    result = npllm_score("-m", folder, "-f", corpus, "--format", "jsonl", "-o", out, "-q",
                         "--batch-size", 2)
    assert result.returncode == 1, result.stderr  # the empty line failed, the rest scored
    return records(out)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield cluster, client


def records(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def records_ok(path):
    """The complete records of a file whose last line may be cut short."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines]


def assert_same(actual, expected, where="record"):
    if isinstance(expected, float) and isinstance(actual, float):
        assert math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL), \
            f"{where}: {actual} != {expected}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for k in expected:
            assert_same(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for k, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{k}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_same_records(actual, expected):
    ids = [r.get("id") for r in actual[1:]]
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert ids == [r.get("id") for r in expected[1:]], "records lost, duplicated or reordered"
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert_same(a, e, f"record {k}")


def wait_for_parts(parts, proc, n, timeout=300):
    """Wait until ``n`` partitions are committed, the run still going (else the test could not
    interrupt it mid-run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it could be interrupted: " \
                                    f"{proc.communicate()[1][-2000:]}"
        if parts.is_dir() and len(list(parts.glob("part-*.pkl"))) >= n:
            return sorted(parts.glob("part-*.pkl"))
        time.sleep(0.01)
    raise AssertionError("no partition was committed in time")


def test_local_cluster_of_two_processes_writes_the_single_process_records(
        folder, corpus, reference, tmp_path):
    out = tmp_path / "dask.jsonl"
    result = npllm_score("-m", folder, "-f", corpus, "--format", "jsonl", "-o", out,
                         "--batch-size", 2, "--local-cluster", 2)
    assert result.returncode == 1, result.stderr
    assert "on a Dask cluster" in result.stderr and "2 workers" in result.stderr
    assert_same_records(records(out), reference)
    assert records(out)[8]["type"] == "error"  # the empty line 8, in its place
    assert not Path(f"{out}.parts").exists()  # committed partitions are removed at the end


def test_a_killed_worker_loses_and_duplicates_nothing(folder, corpus, reference, cluster,
                                                      tmp_path):
    _, client = cluster
    out = tmp_path / "killed-worker.jsonl"
    proc = start_npllm_score("-m", folder, "-f", corpus, "--format", "jsonl", "-o", out, "-q",
                             "--batch-size", 2, "--partition-size", 16,
                             "--scheduler", client.scheduler.address)
    wait_for_parts(Path(f"{out}.parts"), proc, 1)
    victim = next(iter(client.run(os.getpid).values()))
    os.kill(victim, signal.SIGKILL)  # its tasks are lost; the scheduler gives them to another
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr
    assert_same_records(records(out), reference)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it, for the next test
    assert victim not in client.run(os.getpid).values()  # it was killed indeed


def test_a_killed_run_resumes_without_losing_or_duplicating(folder, corpus, reference, cluster,
                                                          tmp_path):
    _, client = cluster
    out = tmp_path / "resumed.jsonl"
    parts = Path(f"{out}.parts")
    common = ["-m", folder, "-f", corpus, "--format", "jsonl", "-o", out, "--batch-size", 2,
              "--partition-size", 16, "--scheduler", client.scheduler.address]
    proc = start_npllm_score(*common, "-q")
    wait_for_parts(parts, proc, 3)
    proc.send_signal(signal.SIGKILL)  # the client dies mid-run, a record perhaps half written
    proc.communicate(timeout=60)
    assert len(records_ok(out)) - 1 < N_LINES, "the run was not interrupted"

    result = npllm_score(*common, "--resume", "-q")
    assert result.returncode == 1, result.stderr
    assert_same_records(records(out), reference)
    assert not parts.exists()


def test_resumed_partitions_are_loaded_not_scored_again(folder, corpus, reference, cluster,
                                                        tmp_path):
    """A resumed run finds every committed partition: kill the run, then make the output file
    hold only the metadata record, so that every committed partition is needed again."""
    _, client = cluster
    out = tmp_path / "parts-only.jsonl"
    parts = Path(f"{out}.parts")
    common = ["-m", folder, "-f", corpus, "--format", "jsonl", "-o", out, "--batch-size", 2,
              "--partition-size", 16, "--scheduler", client.scheduler.address]
    proc = start_npllm_score(*common, "-q")
    wait_for_parts(parts, proc, 4)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    committed = sorted(parts.glob("part-*.pkl"))
    stamps = {p.name: p.stat().st_mtime_ns for p in committed}
    meta = Path(out).read_text(encoding="utf-8").splitlines()[0]
    Path(out).write_text(meta + "\n", encoding="utf-8")

    # Resume with a single process would redo everything; on the cluster the committed
    # partitions come back from their files (the log line counts them).
    result = npllm_score(*common, "--resume")
    assert result.returncode == 1, result.stderr
    line = next(x for x in result.stderr.splitlines() if "on a Dask cluster" in x)
    assert f"{len(stamps)} of them already done" in line, line
    assert_same_records(records(out), reference)


def test_python_api_equals_npllm_score(folder, cluster):
    import npllm
    from npllm import distributed as nd
    from npllm.score import ScoreError

    _, client = cluster
    texts = [" ".join(random.Random(k).choices(WORDS, k=5 + k % 17)) for k in range(300)]
    texts[3] = ""
    model = npllm.load(str(folder))
    expected = npllm.score(model, texts, with_rank=True, return_errors=True)
    by_name = nd.score(str(folder), texts, client=client, with_rank=True, return_errors=True,
                       partition_size=40)
    by_model = npllm.score(model, texts, client=client, with_rank=True, return_errors=True)
    assert len(by_name) == len(by_model) == len(expected)
    for g, e in [*zip(by_name, expected), *zip(by_model, expected)]:
        if isinstance(e, Exception):
            assert isinstance(g, Exception) and str(g) == str(e) and g.index == e.index
            continue
        assert g.index == e.index and g.token_ids == e.token_ids and g.ranks == e.ranks
        assert_same(g.log_probs, e.log_probs)
    with pytest.raises(ScoreError, match="^texts\\[3\\]: the text is empty"):
        npllm.score(model, texts, client=client)
    with pytest.raises(ScoreError, match="^the text is empty"):
        npllm.score(model, "", client=client)
    assert npllm.score(model, "He runs", client=client).token_ids == \
        npllm.score(model, "He runs").token_ids


def test_cluster_options_are_checked(folder, corpus, tmp_path):
    result = npllm_score("-m", folder, "-f", corpus, "--local-cluster", 0, "-q")
    assert result.returncode == 2 and "at least 1 worker" in result.stderr
    assert "Traceback" not in result.stderr
    result = npllm_score("-m", folder, "-f", corpus, "--local-cluster", 1, "--scheduler",
                         "tcp://127.0.0.1:1", "-q")
    assert result.returncode == 2 and "not allowed with" in result.stderr


def test_scheduler_file_and_texts_as_arguments(folder, cluster, tmp_path):
    """``--scheduler`` also takes a scheduler file (dask scheduler --scheduler-file, Slurm);
    texts given as arguments go to the cluster too, output on stdout."""
    _, client = cluster
    scheduler_file = tmp_path / "scheduler.json"
    # What `dask scheduler --scheduler-file` writes, the part clients read (the whole
    # client.write_scheduler_file can fail to serialise the scheduler's state after a worker
    # was restarted: tuple keys in its JSON).
    scheduler_file.write_text(json.dumps({"type": "Scheduler",
                                          "address": client.scheduler.address}))
    texts = ["He runs fast.", "The keys to the cabinet are on the table.", ""]
    alone = npllm_score("-m", folder, *texts, "--format", "jsonl", "--rank")
    spread = npllm_score("-m", folder, *texts, "--format", "jsonl", "--rank", "-q",
                         "--scheduler", scheduler_file)
    assert spread.returncode == alone.returncode == 1, spread.stderr
    assert_same_records([json.loads(x) for x in spread.stdout.splitlines()],
                        [json.loads(x) for x in alone.stdout.splitlines()])
