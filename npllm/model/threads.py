"""Forward passes on two threads: one long sequence in two parts, or several batches two at a time.

Why. Over many tokens, BLAS runs the matrix products on both cores, but everything between
them (attention's softmax, SwiGLU, RoPE, RMSNorm, the log-softmax: about a third of a forward
pass over 512 tokens of the default model) runs on one core, and cannot use the other:
OpenBLAS's worker thread keeps it busy spinning after each product, ready for the next
(``npllm/kernels/_parallel.py``). So instead, on the Numba backend, the forward pass runs twice
at once, each on a part of the tokens, with BLAS on one thread per call: both cores do everything.
The readable loop of :func:`npllm.model.llama.forward` is the one both threads run.

How, for one sequence: the first thread takes the first tokens, a little more than half of them
(:func:`first_part`); the second takes the rest as a continuation with a KV cache (lecture 002),
whose keys and values are the first part's, handed over layer by layer (:class:`HandOffCache`):
at layer l the second thread waits until the first has written layer l's keys and values, then
attends to them. Every row is computed by the same functions as in a single pass, on fewer
rows, so the numbers are those of the single pass up to the order of BLAS's sums.

While a split runs, NumPy's BLAS runs on one thread for the whole process (its thread count is
process-wide): products that other threads of the program make meanwhile run on one thread too.

When: one sequence of at least ``MIN_TOKENS`` new tokens (no padding mask, no trace; log-
probabilities only for all positions), on the Numba backend, when NumPy's BLAS has two
threads or more. With a KV cache (a long prompt before generating), both parts continue it
(:meth:`HandOffCache.continuing`). Measured
on this 2-core machine, default model, median of 7, one pass against two threads: 128 tokens
0.25 against 0.29 s (worse: the products, on fewer rows, lose more than the rest gains), 256
tokens 0.42 against 0.42 s, 511 tokens 0.78 to 0.85 against 0.72 to 0.76 s, 1,023 tokens 1.91
against 1.59 s (attention grows with the square of the length). A batch is not
split: two halves of a batch of 16 sentences ran 3 to 6% slower than one pass.

Several batches (:func:`map_on_two_threads`). Scoring many short texts makes many independent
forward passes, one per batch: ``npllm.score`` runs them two at a time, one per thread, BLAS on
one thread per call, for the same reason. Each batch keeps all its rows, so the products stay
as large as in one pass; 320 sentences in 20 batches of 16 took 5.0 to 5.3 s against 6.0 to 6.1
s one after another (default model, 2 cores).
"""
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

import numpy as np

from npllm.backend import blas_products_noted, note_blas_products
from npllm.equations.counting import attention_parameters, mlp_parameters
from npllm.model.llama import KVCache

MIN_TOKENS = 384  # shorter sequences: one pass (see above)
# Attention's work per FLOP against the weight products': its products are small (64 wide) and
# the softmax comes with them (measured on the default model, see first_part).
ATTENTION_COST = 1.5

_made = {}  # made at first use: threadpoolctl's BLAS controller, the worker thread
# BLAS's thread count is the process's: two splits at once (forward passes called from two
# threads) would restore it in the wrong order. They take turns; each uses both cores anyway.
_one_at_a_time = threading.Lock()
# True on the threads of a two-thread run: what they run is not split again (BLAS is already
# at one thread, and the lock above is taken).
_inside = threading.local()


def _controller():
    """threadpoolctl's view of the BLAS libraries loaded (made once: it scans the process)."""
    if "blas" not in _made:
        from threadpoolctl import ThreadpoolController
        _made["blas"] = ThreadpoolController().select(user_api="blas")
    return _made["blas"]


def blas_threads():
    """The number of threads NumPy's BLAS uses (``OPENBLAS_NUM_THREADS`` and the like)."""
    threads = [lib.num_threads for lib in _controller().lib_controllers]
    return min(threads) if threads else 1


def _in_a_run():
    """Whether this thread is one of a two-thread run's."""
    return getattr(_inside, "run", False)


def _worker():
    """The second thread (the caller's is the first), made at first use."""
    if "worker" not in _made:
        _made["worker"] = ThreadPoolExecutor(1, thread_name_prefix="npllm-forward")
    return _made["worker"]


@contextmanager
def _blas_on_one_thread():
    """For a run on two threads: BLAS on one thread meanwhile (its count is the process's, so
    one such run at a time). Its products then wake no BLAS thread, so afterwards they are not
    noted as leaving threads spinning (:func:`npllm.backend.blas_threads_spinning`): decoding
    steps that follow use every core at once."""
    with _one_at_a_time, _controller().limit(limits=1):
        noted = blas_products_noted()
        try:
            yield
        finally:
            note_blas_products(noted)


def pays(B, T):
    """Whether a forward pass over B sequences of T new tokens should run on two threads."""
    return B == 1 and T >= MIN_TOKENS and not _in_a_run() and blas_threads() >= 2


def batches_pay(n, backend):
    """Whether n independent forward passes (a chunk's batches, on ``backend``) should run two
    at a time (:func:`map_on_two_threads`)."""
    return n >= 2 and backend == "numba" and not _in_a_run() and blas_threads() >= 2


def map_on_two_threads(fn, items):
    """``[fn(item) for item in items]``, two at a time: the caller's thread and a worker each
    take the next item when done with one, BLAS on one thread meanwhile.

    ``fn`` runs forward passes (on the Numba backend: its kernels release the GIL). If a call
    raises, no further item is started, the other thread finishes its current one, and the
    error reaches the caller.
    """
    items = list(items)
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

    with _blas_on_one_thread():
        other = _worker().submit(drain)
        try:
            drain()
        finally:
            try:
                wait([other])
            finally:
                stop.set()
        other.result()  # the worker's error, if it had one
    return out


class HandOffCache(KVCache):
    """A KV cache shared by the two threads that run one sequence's tokens in two parts.

    The first part's thread (``waits=False``) writes positions [past, past + h) of each layer
    and then says so; the second's (``waits=True``, ``length=past + h``) waits for that before
    it writes positions [past + h, past + T) and reads all of them.

    Without a cache of the caller's (:meth:`pair`, past = 0), a layer's storage, all T
    positions, is allocated when the first part reaches it and dropped when the second part
    is done with it, so the pair holds about one layer at a time (all 30 of the default model
    over 511 tokens would be 24 MB). Continuing the caller's cache (:meth:`continuing`, a
    prompt), both parts write into its storage.
    """

    @classmethod
    def pair(cls, config, T, h):
        layers = config.num_hidden_layers
        shape = (1, config.num_key_value_heads, T, config.head_dim)
        return cls._pair([None] * layers, [None] * layers, 0, h, shape)

    @classmethod
    def continuing(cls, cache, T, h):
        """The pair that appends T new positions to ``cache`` (made room for here)."""
        cache.reserve(T)
        return cls._pair(cache.keys, cache.values, cache.length, h, None)

    @classmethod
    def _pair(cls, keys, values, past, h, shape):
        first, second = cls(keys, values, past), cls(keys, values, past + h)
        ready = [threading.Event() for _ in keys]
        for cache, waits in ((first, False), (second, True)):
            cache.shape = shape  # of the storage to allocate per layer; None: it exists
            cache.ready, cache.waits = ready, waits
        return first, second

    def reserve(self, n_new):
        """Nothing to do: every layer has room for all T positions."""

    def update(self, layer, k, v):
        if self.waits:
            self.ready[layer].wait()
            out = super().update(layer, k, v)
            if layer and self.shape is not None:  # both parts are past the layer before
                self.keys[layer - 1] = self.values[layer - 1] = None
            return out
        if self.shape is not None:
            self.keys[layer] = np.empty(self.shape, np.float32)
            self.values[layer] = np.empty(self.shape, np.float32)
        out = super().update(layer, k, v)
        self.ready[layer].set()
        return out

    def release(self):
        """Let the waiting thread go on (when the first part stopped early, with an error)."""
        for event in self.ready:
            event.set()


def first_part(config, T, past=0):
    r"""How many of T new tokens (after ``past`` cached ones) the first thread takes, so that both
    threads have the same work.

    Token t costs its products with the weights, 2P FLOPs (P: the weight matrices' parameters,
    the LM head's included), and its attention to the past + t positions before it,
    4 L H D_h (past + t) FLOPs that run ``ATTENTION_COST`` times slower: cost(t) = a + b t, with
    a = 2P + b past. Equal work, a h + b h^2 / 2 = a (T - h) + b (T^2 - h^2) / 2, gives

    .. math::
        h = rac{\sqrt{1 + r T + r^2 T^2 / 2} - 1}{r}, \qquad r = rac{b}{a}

    Default model, no past: 52.3% of 511 tokens, 54.1% of 1,024. Measured (medians of 10 to 20,
    one process, alternating, 2026-12-05), 511 tokens: 50% 0.73 s, 52% 0.72, 55% 0.745, 57%
    0.77; 400 tokens: 50% and 55% 0.59 s, 52% 0.57; 1,024 tokens: 50% 1.55 s, 52% 1.49, 55% 1.48.
    """
    c = config
    P = c.num_hidden_layers * (
        attention_parameters(c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                             c.head_dim) + mlp_parameters(c.hidden_size, c.intermediate_size)
    ) + c.vocab_size * c.hidden_size
    b = ATTENTION_COST * 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim
    r = b / (2 * P + b * past)
    h = (np.sqrt(1 + r * T + r * r * T * T / 2) - 1) / r
    return max(1, min(T - 1, round(h)))


def forward_on_two_threads(run, config, ids, targets=None, cache=None, logits_to_keep=None):
    """``run(ids, cache=, targets=, logits_to_keep=)`` (the forward pass) on the two parts of
    one sequence's tokens at once, BLAS on one thread per call; the two results joined as one
    pass gives them.

    ids, targets [1, T] -> logits [1, T or logits_to_keep, V] or log P [1, T]. With a
    ``cache`` (a prompt), the parts continue it and its length advances by T.
    """
    T = ids.shape[1]
    h = first_part(config, T, 0 if cache is None else cache.length)
    first, second = (HandOffCache.pair(config, T, h) if cache is None
                     else HandOffCache.continuing(cache, T, h))
    kept = logits_to_keep or T
    # The kept positions are the last ones: the second part's, and the first part's last
    # kept - (T - h) if there are more (if none, the first part keeps one, not used).
    keep = (None, None) if logits_to_keep is None else (max(1, kept - (T - h)), min(kept, T - h))

    def part(tokens, cache, keep):
        _inside.run = True  # what runs in a part is not split again
        try:
            return run(ids[:, tokens], cache=cache, logits_to_keep=keep,
                       targets=None if targets is None else targets[:, tokens])
        finally:
            _inside.run = False
            if not cache.waits:
                cache.release()

    with _blas_on_one_thread():
        other = _worker().submit(part, slice(h, T), second, keep[1])
        mine = part(slice(0, h), first, keep[0])
        theirs = other.result()
    if cache is not None:
        cache.length += T
    return theirs if kept <= T - h else np.concatenate([mine, theirs], axis=1)
