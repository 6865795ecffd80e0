"""Scoring a corpus on a Dask cluster: ``npllm score --local-cluster N`` / ``--scheduler ADDRESS``.

A corpus too large for one machine (100 million tokens at about 750 tokens/s is 37 hours on two
cores) is cut into **partitions**: runs of consecutive items, each a whole number of
:func:`npllm.score.chunks` (the units ``iter_scores`` sorts and batches), so every item is
scored in exactly the batches a single-process run would use and its numbers are the same.
Each partition is one Dask task; a worker loads the model once (the first task it runs) and
keeps it for the next ones. The client yields the results **in input order** as the partitions
come back, so ``npllm score`` writes the same records, after the same metadata record, as a
single-process run.

**Resumable.** With ``parts_dir`` (the CLI uses ``FILE.parts/`` beside ``-o FILE``), each
partition's results are committed to a file of their own as soon as they arrive (written to a
temporary name, then renamed: a file is there whole or not at all); a resumed run loads the
partitions already there instead of scoring them again, and the folder is removed when the run
completes. A worker that dies mid-task loses only that task, which the scheduler gives to
another worker.

Dask is an optional extra (``pip install 'npllm[dask]'``); it is imported only here, and only
when a cluster is asked for.
"""
import contextlib
import functools
import hashlib
import os
import pickle
import shutil
import sys
import threading
from pathlib import Path

from npllm.errors import NpllmError

__all__ = ["score", "iter_scores", "partitions", "local_cluster", "connect", "load_on_workers",
           "DEFAULT_PARTITION_SIZE"]

# Items per partition (at least: a partition is a whole number of chunks). Small enough that a
# lost partition costs little and two workers share a few thousand sentences evenly; large
# enough that a task's overhead (a few milliseconds of scheduling, the items sent over) is
# negligible beside scoring it.
DEFAULT_PARTITION_SIZE = 256
PART_VERSION = 1


class ClusterError(NpllmError):
    """The Dask cluster cannot be reached or used."""


def _dask():
    try:
        import distributed
    except ImportError as e:
        raise ClusterError("scoring on a Dask cluster needs dask.distributed: pip install "
                           "'npllm[dask]'") from e
    return distributed


# -- partitions -----------------------------------------------------------------------------------

def partitions(items, batch_size, size=DEFAULT_PARTITION_SIZE):
    """The input's partitions, ``[range(start, stop), ...]``: consecutive chunks of
    :func:`npllm.score.chunks` gathered until they hold at least ``size`` items."""
    from npllm.score.windows import chunks

    out, start = [], None
    for chunk in chunks(items, batch_size):
        start = chunk.start if start is None else start
        if chunk.stop - start >= size:
            out.append(range(start, chunk.stop))
            start = None
    if start is not None:
        out.append(range(start, len(items)))
    return out


def _fingerprint(model, settings, items):
    """What a partition's results depend on: the model, the settings and its items."""
    h = hashlib.sha256()
    h.update(pickle.dumps((PART_VERSION, model, sorted(settings.items(), key=str)),
                          protocol=4))
    for text, context in items:
        h.update(pickle.dumps((text, context), protocol=4))
    return h.hexdigest()


def _part_path(parts_dir, part, fingerprint):
    return Path(parts_dir) / f"part-{part.start:010d}-{part.stop:010d}-{fingerprint[:16]}.pkl"


def _read_part(path, fingerprint):
    """A committed partition's results, or None when absent or from other settings."""
    try:
        with open(path, "rb") as f:
            found = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None
    if not isinstance(found, dict) or found.get("fingerprint") != fingerprint:
        return None
    return found["results"]


def _write_part(path, fingerprint, results):
    """Commit a partition's results atomically: a temporary file, flushed, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"fingerprint": fingerprint, "results": results}, f, protocol=4)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- on the workers -------------------------------------------------------------------------------

_LOADING = threading.Lock()  # a worker with several threads loads the model once, not per thread


def _worker_model(name, backend):
    """The model, loaded once per worker process (later tasks find it here)."""
    with _LOADING:
        return _load(name, backend)


@functools.lru_cache(maxsize=2)
def _load(name, backend):
    import npllm

    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        return npllm.load(name, backend=backend)


def load_on_workers(client, model=None, backend=None):
    """Load ``model`` on every worker of ``client`` now (it stays loaded for the scoring tasks),
    e.g. before timing a run; returns {worker address: the model's source}."""
    return client.run(lambda: _worker_model(model, backend).source)


def _score_partition(model, backend, start, items, settings):
    """Score one partition on a worker: ``[(index in the input, TextScore or ScoreError)]``."""
    from npllm.score.api import iter_scores

    out = []
    for i, result in iter_scores(_worker_model(model, backend), items, **settings):
        result.index = start + i
        out.append((start + i, result))
    return out


# -- on the client --------------------------------------------------------------------------------

def connect(scheduler=None, n_workers=None):
    """A ``distributed.Client`` (and the LocalCluster it owns, or None): to ``scheduler`` (an
    address such as ``tcp://10.0.0.1:8786`` or a scheduler file ``*.json``), or to a new local
    cluster of ``n_workers`` worker processes with one thread each."""
    distributed = _dask()
    if (scheduler is None) == (n_workers is None):
        raise ClusterError("give a scheduler address or a number of local workers, not both")
    if scheduler is not None:
        try:
            if str(scheduler).endswith(".json"):
                return distributed.Client(scheduler_file=str(scheduler), timeout="30s"), None
            return distributed.Client(str(scheduler), timeout="30s"), None
        except (OSError, TimeoutError) as e:
            raise ClusterError(f"cannot reach the Dask scheduler at {scheduler}: {e}; start "
                               "one (dask scheduler / dask-ssh / dask-jobqueue) or use "
                               "--local-cluster N") from None
    if int(n_workers) < 1:
        raise ClusterError(f"a local cluster needs at least 1 worker, got {n_workers}")
    cluster = distributed.LocalCluster(n_workers=int(n_workers), threads_per_worker=1,
                                       processes=True, dashboard_address=None)
    return distributed.Client(cluster), cluster


@contextlib.contextmanager
def local_cluster(n_workers=2):
    """``with local_cluster(2) as client:`` a LocalCluster of ``n_workers`` processes, closed
    on exit."""
    client, cluster = connect(n_workers=n_workers)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _model_spec(model, backend):
    """(name, backend) for the workers to load: a name or path as given, or a loaded model's
    folder and backend."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return (None if model is None else str(model)), backend
    folder = getattr(model, "folder", None)
    if folder is None:
        raise ClusterError("this model was not loaded from a folder the workers could load: "
                           "give its name or path instead")
    return str(folder), backend if backend is not None else getattr(model, "backend", None)


def iter_scores(model, items, *, client, parts_dir=None, partition_size=DEFAULT_PARTITION_SIZE,
                skip=(), log=None, progress=False, **settings):
    """Like :func:`npllm.score.iter_scores`, on the workers of ``client``: ``(index, result)``
    in input order, ``result`` a :class:`~npllm.score.TextScore` or the
    :class:`~npllm.score.ScoreError` the item raised.

    ``model``: what ``npllm.load`` accepts on the workers (a name, or a path they can all
    read; None: the default model), or a loaded model (its folder is loaded on the workers);
    ``backend=`` may be among ``settings``, the rest are
    ``iter_scores``'s (``bos``, ``base``, ``window``, ``stride``, ``slide``, ``batch_size``,
    ``with_rank``, ``with_entropy``, ``with_greedy``). ``skip``: indices left out of the output
    (a partition made only of them is not scored). ``parts_dir``: where finished partitions
    are committed and found again by a resumed run. ``log``: a callable given one line about
    the plan.
    """
    distributed = _dask()
    model, backend = _model_spec(model, settings.pop("backend", None))
    settings.setdefault("batch_size", 16)
    items = [(it, None) if isinstance(it, str) or it is None else tuple(it) for it in items]
    skip = set(skip)
    parts = [p for p in partitions(items, settings["batch_size"], partition_size)
             if not all(i in skip for i in p)]
    if parts_dir is not None:
        Path(parts_dir).mkdir(parents=True, exist_ok=True)
    prints = {p.start: _fingerprint((model, backend), settings, items[p.start:p.stop])
              for p in parts}
    # Committed partitions are read when their turn comes, not all at once.
    on_disk = {p.start for p in parts
               if parts_dir is not None and _part_path(parts_dir, p, prints[p.start]).exists()}
    n_workers = len(client.scheduler_info().get("workers", {}))
    if log is not None:
        log(f"{len(parts)} partitions of about {max(partition_size, 1)} texts on a Dask cluster "
            f"({client.scheduler_info().get('address')}, {n_workers} workers)"
            + (f"; {len(on_disk)} of them already done in {parts_dir}" if on_disk else ""))
    # Partitions running or finished but not yet yielded: enough to keep every worker busy
    # while an earlier one is still running, few enough to bound the client's memory.
    ahead = max(8, 3 * n_workers)
    pending = [p for p in parts if p.start not in on_disk]
    futures, owner = distributed.as_completed(), {}  # owner: future key -> (partition, future)
    done, next_submit = {}, 0

    def submit(p):
        future = client.submit(_score_partition, model, backend, p.start, items[p.start:p.stop],
                               settings, pure=False)
        owner[future.key] = (p, future)
        futures.add(future)

    def submit_more():
        nonlocal next_submit
        while next_submit < len(pending) and len(owner) + len(done) < ahead:
            submit(pending[next_submit])
            next_submit += 1

    submit_more()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(1 for p in parts for i in p if i not in skip), unit="text",
                   desc="scoring", disable=None)
    try:
        for p in parts:
            if p.start in on_disk:
                found = _read_part(_part_path(parts_dir, p, prints[p.start]), prints[p.start])
                if found is None:  # unreadable after all: score it again
                    submit(p)
                else:
                    done[p.start] = found
            while p.start not in done:
                future = next(futures)
                q, _ = owner.pop(future.key)
                results = future.result()
                future.release()
                if parts_dir is not None:
                    _write_part(_part_path(parts_dir, q, prints[q.start]), prints[q.start],
                                results)
                done[q.start] = results
                submit_more()
            for i, result in done.pop(p.start):
                if i not in skip:
                    yield i, result
                    if bar is not None:
                        bar.update(1)
            submit_more()
    finally:
        if bar is not None:
            bar.close()
        for _, future in owner.values():
            future.cancel()
    if parts_dir is not None:
        shutil.rmtree(parts_dir, ignore_errors=True)


def score(model, texts, context=None, *, client, partition_size=DEFAULT_PARTITION_SIZE,
          parts_dir=None, return_errors=False, **settings):
    """:func:`npllm.score` on a Dask cluster (``npllm.score(..., client=client)`` comes here): a
    :class:`~npllm.score.TextScore` per text, in order, or one for a single string. ``model``:
    a name the workers load, or a loaded model (see :func:`iter_scores`).

    >>> with local_cluster(2) as client:                             # doctest: +SKIP
    ...     scores = score(None, sentences, client=client)
    """
    from npllm.errors import ScoreError
    from npllm.score.windows import normalise_items

    single, items = normalise_items(texts, context)
    out = []
    for i, r in iter_scores(model, items, client=client, partition_size=partition_size,
                            parts_dir=parts_dir, **settings):
        if isinstance(r, ScoreError) and not return_errors:
            raise ScoreError(f"{'' if single else f'texts[{i}]: '}{r}", i)
        out.append(r)
    return out[0] if single else out


# -- the CLI's part (npllm score --scheduler / --local-cluster) -----------------------------------

def add_arguments(parser):
    """The ``cluster`` options of ``npllm score``."""
    group = parser.add_argument_group(
        "cluster", "score on a Dask cluster (pip install 'npllm[dask]'): each worker loads the\n"
                   "model once and scores partitions of the input; the output is the one a single\n"
                   "process writes, in input order. With -o FILE, finished partitions are kept in\n"
                   "FILE.parts/ until the run completes, and --resume reuses them.")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="a running Dask scheduler: tcp://HOST:8786, or a scheduler file "
                            "(*.json, as `dask scheduler --scheduler-file` writes it); every "
                            "worker must be able to load --model")
    where.add_argument("--local-cluster", type=int, metavar="N",
                       help="start a Dask cluster of N worker processes on this machine")
    group.add_argument("--partition-size", type=int, default=DEFAULT_PARTITION_SIZE,
                       metavar="N",
                       help=f"texts per task (default {DEFAULT_PARTITION_SIZE}; rounded up to "
                            "whole batches of sorted texts)")


def wanted(args):
    return getattr(args, "scheduler", None) is not None or \
        getattr(args, "local_cluster", None) is not None


def cli_results(args, pairs, *, out_path, skip, **settings):
    """``(index, result)`` for ``npllm score``'s run loop, scored on the cluster the options
    name. Finished partitions go to ``FILE.parts/``; a run without ``--resume`` starts afresh."""
    if args.partition_size < 1:
        raise ValueError(f"--partition-size must be at least 1, got {args.partition_size}")
    parts_dir = None
    if out_path is not None:
        parts_dir = Path(f"{out_path}.parts")
        if not args.resume:
            shutil.rmtree(parts_dir, ignore_errors=True)
    client, cluster = connect(args.scheduler, args.local_cluster)
    log = None if args.quiet else (lambda line: print(f"npllm score: {line}", file=sys.stderr))
    try:
        yield from iter_scores(args.model, pairs, client=client, parts_dir=parts_dir,
                               partition_size=args.partition_size, skip=skip, log=log,
                               backend=args.backend, **settings)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
