r"""Every core on every step: one long sequence in parts, or several batches at once.

Why. Over many tokens BLAS runs the matrix products on every core, but everything between them
(attention's softmax, SwiGLU, RoPE, RMSNorm, the log-softmax: about a third of a forward pass
over 512 tokens of the default model) runs on one core, and cannot use the others: OpenBLAS's
worker threads keep them busy spinning after each product, ready for the next. So the engine
runs n forward passes at once instead, one per core, each on a part of the work, with BLAS on
one thread per call: every core then does everything.

One sequence (:meth:`Parallel.forward_in_parts`): part j takes tokens [b_j, b_{j+1}) as a
continuation with a KV cache (lecture 002) whose earlier positions the parts before it write,
layer by layer (:class:`PartCache`): at layer l, part j writes its keys and values, waits until
every earlier part has written theirs, then attends to all of them. Every row is computed by the
same functions as in one pass, on fewer rows, so the numbers are those of one pass up to the
order of BLAS's sums. The boundaries give each part the same work (:func:`part_bounds`).

Several batches (:meth:`Parallel.map`): ``npllm.score`` makes many independent forward passes,
one per batch; they run n at a time, each keeping all its rows.

How many. At most t, the machine's thread count as the caller configured it (BLAS's and
Numba's, e.g. ``OMP_NUM_THREADS``, or ``threads=`` when the engine is made), and a part gets at
least :data:`MIN_PART_TOKENS` tokens: a matrix product of fewer rows on one thread runs well
below BLAS's rate, and loses more than running the rest in parallel gains. A text too short for
t parts may still make a few (2 parts of 512 tokens on 16 cores), and so may a few batches;
they would leave the other cores idle, and one pass after another with BLAS on all t threads
may be faster: :func:`side_by_side_is_faster` weighs the two by Amdahl's law. While parts or
batches run, BLAS runs on one thread (threadpoolctl's context manager, restored on exit). Its
thread count is the process's, so one such run at a time; a forward pass called from inside a
part is not split again.
"""
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import numpy as np

from npllm.equations.counting import attention_parameters, mlp_parameters
from npllm.model.cache import KVCache

# A part's fewest tokens: half of the length from which two parts beat one pass on two cores
# (docs/performance.md); a property of single-threaded matrix products on few rows, so it
# holds for any number of cores.
MIN_PART_TOKENS = 192
# Attention's time per FLOP against the weight products': its products are small (Dh wide)
# and the softmax comes with them (docs/performance.md).
ATTENTION_COST = 1.5
# The share of a forward pass on one thread spent outside BLAS's weight products: the kernels
# between them, which one pass on t threads runs on one (scripts/outside_blas.py measures it;
# docs/performance.md).
OUTSIDE_BLAS = 0.2

_blas_controller = []  # threadpoolctl's view of the BLAS libraries (made once: it scans the process)
_one_run_at_a_time = threading.Lock()  # BLAS's thread count is process-wide
_inside = threading.local()  # set on the threads of a run: what they call is not split again


def _blas():
    if not _blas_controller:
        from threadpoolctl import ThreadpoolController
        _blas_controller.append(ThreadpoolController().select(user_api="blas"))
    return _blas_controller[0]


def blas_threads():
    """The threads NumPy's BLAS uses now (``OPENBLAS_NUM_THREADS``, threadpoolctl limits)."""
    threads = [lib.num_threads for lib in _blas().lib_controllers]
    return min(threads) if threads else 1


def machine_threads():
    """The threads the caller gives npllm: the larger of BLAS's and Numba's thread counts (both
    default to the machine's cores; ``OMP_NUM_THREADS``, ``NUMBA_NUM_THREADS`` and
    threadpoolctl lower them)."""
    import numba
    return max(blas_threads(), numba.get_num_threads())


@contextmanager
def blas_on_one_thread():
    """BLAS on one thread inside the ``with`` (for runs whose threads each call BLAS), restored
    on exit. One such run at a time in the process."""
    with _one_run_at_a_time, _blas().limit(limits=1):
        yield


def part_bounds(config, T, past, n, head=True):
    r"""Where to cut T new tokens (after ``past`` cached ones) into n parts of equal work:
    ``[0, b_1, ..., b_{n-1}, T]``.

    Token t costs its products with the weights, 2P FLOPs (P: the weight matrices' parameters,
    the LM head's included when the parts run it, ``head``), and its attention to the past + t
    positions before it, 4 L H D_h (past + t) FLOPs that run ``ATTENTION_COST`` times slower:
    cost(t) = a + b t with a = 2P + b past. The first h tokens cost
    :math:`C(h) = a h + b h^2 / 2`; boundary j solves C(b_j) = (j / n) C(T):

    .. math::
        b_j = \frac{2 c_j}{a + \sqrt{a^2 + 2 b c_j}}, \qquad c_j = \frac{j}{n} C(T)
    """
    c = config
    P = c.num_hidden_layers * (
        attention_parameters(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                             c.head_dim) + mlp_parameters(c.hidden_size, c.intermediate_size)
    ) + (c.vocab_size * c.hidden_size if head else 0)
    b = ATTENTION_COST * 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    a = 2 * P + b * past
    total = a * T + b * T * T / 2
    bounds = [0]
    for j in range(1, n):
        share = j / n * total
        cut = round(2 * share / (a + np.sqrt(a * a + 2 * b * share)))
        bounds.append(min(max(cut, bounds[-1] + 1), T - (n - j)))
    return bounds + [T]


def side_by_side_is_faster(n, t):
    r"""Whether n pieces of work (parts of a pass, or batches) run faster at once, one per thread
    with BLAS on one thread each, than one after another with BLAS on all t threads.

    At once they take 1/n of their time on one thread. One after another they take at least
    :math:`s + (1 - s) / t` of it, by Amdahl's law: BLAS's products spread over the t threads,
    and the kernels between them (the share s = :data:`OUTSIDE_BLAS`) run on one. So 2 pieces
    run at once on 2 threads, but not on 3 or more; on 16 threads, from 5 pieces on.
    """
    return n > 1 and 1 / n < OUTSIDE_BLAS + (1 - OUTSIDE_BLAS) / t


def drain_together(pool, drain, n):
    """``drain()`` on the caller's thread and on n - 1 threads of ``pool``, each taking work
    until none is left; once every one has returned, the first error raised reaches the
    caller."""
    others = [pool.submit(drain) for _ in range(n - 1)]
    try:
        drain()
    finally:
        errors = [f.exception() for f in others]  # waits for each
    for error in errors:
        if error is not None:
            raise error


class Parallel:
    """How the engine spreads work over threads; ``threads`` None: :func:`machine_threads` at
    each call (so the caller's limits hold), else that many."""

    def __init__(self, threads=None, min_part_tokens=MIN_PART_TOKENS):
        self.fixed_threads, self.min_part_tokens = threads, min_part_tokens
        self._pool, self._pool_size = None, 0

    @property
    def threads(self):
        return self.fixed_threads or machine_threads()

    def parts(self, B, T):
        """Into how many parts a forward pass over B sequences of T new tokens is cut: batches
        and short sequences run as one pass, and so does what runs inside a part. At most one
        part per thread, each of at least ``min_part_tokens``, and only when the parts are
        faster than one pass with BLAS on every thread (:func:`side_by_side_is_faster`)."""
        if B != 1 or getattr(_inside, "run", False):
            return 1
        n = max(1, min(self.threads, T // self.min_part_tokens))
        return n if side_by_side_is_faster(n, self.threads) else 1

    def _workers(self, n):
        if self._pool is None or self._pool_size < n:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool, self._pool_size = ThreadPoolExecutor(n, thread_name_prefix="npllm"), n
        return self._pool

    def forward_in_parts(self, run, config, ids, n, cache=None, kept=None, head=True):
        """``run(ids, cache=, kept=)`` (one forward pass, to the logits or, ``head`` false, to the
        final states) on n parts of one sequence's tokens at once, BLAS on one thread per call,
        the results joined as one pass gives them.

        ids [1, T] -> [1, kept, ...] (e.g. the logits [1, kept, V]). ``cache``: the caller's (a
        prompt), which the parts continue and whose length advances by T.
        """
        T = ids.shape[1]
        kept = kept or T
        past = 0 if cache is None else cache.length
        bounds = part_bounds(config, T, past, n, head)
        shared = Handoff(config, bounds, past, cache)

        def part(j):
            lo, hi = bounds[j], bounds[j + 1]
            # The kept positions are the last ones; a part holding none keeps one, not used.
            keep = max(1, min(hi - lo, hi - (T - kept)))
            _inside.run = True
            try:
                return run(ids[:, lo:hi], cache=shared.part(j), kept=keep)
            except BaseException:
                shared.release(j)  # the parts waiting for its keys and values go on, to stop
                raise
            finally:
                _inside.run = False

        with blas_on_one_thread():
            others = [self._workers(n - 1).submit(part, j) for j in range(1, n)]
            try:
                results = [part(0)]
            finally:
                wait(others)  # every part has stopped before an error goes up
            results += [f.result() for f in others]
        if cache is not None:
            cache.length += T
        used = [r for j, r in enumerate(results) if bounds[j + 1] > T - kept]
        return np.concatenate(used, axis=1)[:, -kept:]

    def map(self, fn, items, at_once=None):
        """``[fn(item) for item in items]``, up to ``at_once`` (by default every thread) at a
        time, BLAS on one thread meanwhile; one after another, BLAS on every thread, when that
        is faster (:func:`side_by_side_is_faster`). ``fn`` runs forward passes, whose kernels
        release the GIL. If a call raises, no further item is started, the others finish
        theirs, and the error reaches the caller."""
        items = list(items)
        n = min(len(items), self.threads, at_once or len(items))
        if not side_by_side_is_faster(n, self.threads) or getattr(_inside, "run", False):
            return [fn(item) for item in items]  # BLAS on every thread
        out = [None] * len(items)
        order = iter(range(len(items)))
        take_turns = threading.Lock()
        stop = threading.Event()

        def drain():
            _inside.run = True
            try:
                while True:
                    with take_turns:
                        i = None if stop.is_set() else next(order, None)
                    if i is None:
                        return
                    out[i] = fn(items[i])
            except BaseException:
                stop.set()
                raise
            finally:
                _inside.run = False

        with blas_on_one_thread():
            drain_together(self._workers(n - 1), drain, n)
        return out


class Handoff:
    """The keys and values the parts of one sequence share: part j writes positions
    [past + b_j, past + b_{j+1}) of each layer, and reads them and every earlier part's.

    Without the caller's cache, a layer's storage is allocated when the first part reaches it and
    dropped when every part is past it, so the parts hold a few layers at a time, not all.
    Continuing the caller's cache, the parts write into its storage (made room for here).
    """

    def __init__(self, config, bounds, past, cache=None):
        self.bounds, self.past, self.n = bounds, past, len(bounds) - 1
        L, T = config.num_hidden_layers, bounds[-1]
        if cache is not None:
            cache.reserve(T)
            self.keys, self.values, self.shape = cache.keys, cache.values, None
        else:
            self.keys, self.values = [None] * L, [None] * L
            self.shape = (1, config.num_key_value_heads, T, config.head_dim)
        self.written = [[threading.Event() for _ in range(self.n)] for _ in range(L)]
        self.finished = [0] * L  # parts past each layer
        self.lock = threading.Lock()
        self.failed = self.n  # the first part that stopped with an error (none yet)

    def part(self, j):
        return PartCache(self, j)

    def storage(self, layer):
        with self.lock:
            if self.keys[layer] is None:
                self.keys[layer] = np.empty(self.shape, np.float32)
                self.values[layer] = np.empty(self.shape, np.float32)

    def past_layer(self, layer):
        with self.lock:
            self.finished[layer] += 1
            if self.finished[layer] == self.n and self.shape is not None:
                self.keys[layer] = self.values[layer] = None

    def release(self, j):
        """Part j stopped early, with an error: let every waiting part go on. Those after it
        then stop too, instead of attending to keys and values never written."""
        with self.lock:
            self.failed = min(self.failed, j)
        for events in self.written:
            for event in events:
                event.set()


class PartCache(KVCache):
    """Part j's view of a :class:`Handoff`: a KV cache whose earlier positions the earlier parts
    fill."""

    def __init__(self, shared, j):
        super().__init__(shared.keys, shared.values, shared.past + shared.bounds[j])
        self.shared, self.j = shared, j

    def reserve(self, n_new):
        """Nothing to do: the shared storage has room for every part."""

    def update(self, layer, k, v):
        shared = self.shared
        if shared.shape is not None:
            shared.storage(layer)
        out = super().update(layer, k, v)
        shared.written[layer][self.j].set()
        for i in range(self.j):
            shared.written[layer][i].wait()
        if shared.failed < self.j:  # the caller gets that part's error (forward_in_parts)
            raise RuntimeError(f"part {shared.failed} of this pass failed")
        if layer:
            shared.past_layer(layer - 1)
        if layer == len(self.keys) - 1:
            shared.past_layer(layer)
        return out
