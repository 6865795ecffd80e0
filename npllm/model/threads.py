"""One forward pass over a long sequence on two threads, each on its own part of the tokens.

Why. Over many tokens, BLAS runs the matrix products on both cores, but everything between
them (attention's softmax, SwiGLU, RoPE, RMSNorm, the log-softmax: about a third of a forward
pass over 512 tokens of the default model) runs on one core, and cannot use the other:
OpenBLAS's worker thread keeps it busy spinning after each product, ready for the next
(``npllm/kernels/_parallel.py``). So instead, on the Numba backend, the forward pass runs twice
at once, each on a part of the tokens, with BLAS on one thread per call: both cores do everything.
The readable loop of :func:`npllm.model.llama.forward` is the one both threads run.

How: the first thread takes the first 55% of the tokens; the second takes the rest as a
continuation with a KV cache (lecture 002), whose keys and values are the first part's, handed
over layer by layer (:class:`HandOffCache`): at layer l the second thread waits until the first
has written layer l's keys and values, then attends to them. (55%: the second part's tokens
attend to more keys, causal attention, so it gets fewer of them; on the default model over 511
tokens 50%, 55%, 60%, 65% took 0.75, 0.72 to 0.74, 0.79 to 0.83, 0.82 to 0.87 s.) Every row is
computed by the same functions as in a single pass, on fewer rows, so the numbers are those of
the single pass up to the order of BLAS's sums.

While a split runs, NumPy's BLAS runs on one thread for the whole process (its thread count is
process-wide): products that other threads of the program make meanwhile run on one thread too.

When: one sequence (no padding mask, no cache, all logits or log-probabilities) of at least
``MIN_TOKENS`` tokens, on the Numba backend, when NumPy's BLAS has two threads or more. Measured
on this 2-core machine, default model, median of 7, one pass against two threads: 128 tokens
0.25 against 0.29 s (worse: the products, on fewer rows, lose more than the rest gains), 256
tokens 0.42 against 0.42 s, 511 tokens 0.78 to 0.85 against 0.72 to 0.76 s, 1,023 tokens 1.91
against 1.59 s (attention grows with the square of the length). Batches of short sentences
are not split: two halves of a batch of 16 sentences ran 3 to 6% slower than one pass.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from npllm.model.llama import KVCache

MIN_TOKENS = 384  # shorter sequences: one pass (see above)
SPLIT = 0.55  # the first thread's share of the tokens

_made = {}  # made at first use: threadpoolctl's BLAS controller, the worker thread
# BLAS's thread count is the process's: two splits at once (forward passes called from two
# threads) would restore it in the wrong order. They take turns; each uses both cores anyway.
_one_at_a_time = threading.Lock()


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


def pays(B, T):
    """Whether a forward pass over B sequences of T new tokens should run on two threads."""
    return B == 1 and T >= MIN_TOKENS and blas_threads() >= 2


class HandOffCache(KVCache):
    """A KV cache shared by the two threads that run one sequence's tokens in two parts.

    The first part's thread (``waits=False``) writes positions [0, h) of each layer and then
    says so; the second's (``waits=True``, ``length=h``) waits for that before it writes
    positions [h, T) and reads all of them. A layer's storage, all T positions, is allocated
    when the first part reaches it and dropped when the second part is done with it, so the
    pair holds about one layer at a time (all 30 of the default model over 511 tokens would
    be 24 MB).
    """

    @classmethod
    def pair(cls, config, T, h):
        layers = config.num_hidden_layers
        first = cls([None] * layers, [None] * layers, 0)
        second = cls(first.keys, first.values, h)
        ready = [threading.Event() for _ in range(layers)]
        for cache, waits in ((first, False), (second, True)):
            cache.shape = (1, config.num_key_value_heads, T, config.head_dim)
            cache.ready, cache.waits = ready, waits
        return first, second

    def reserve(self, n_new):
        """Nothing to do: every layer is allocated for all T positions."""

    def update(self, layer, k, v):
        if self.waits:
            self.ready[layer].wait()
            out = super().update(layer, k, v)
            if layer:  # both parts are past the layer before: free it
                self.keys[layer - 1] = self.values[layer - 1] = None
            return out
        self.keys[layer] = np.empty(self.shape, np.float32)
        self.values[layer] = np.empty(self.shape, np.float32)
        out = super().update(layer, k, v)
        self.ready[layer].set()
        return out

    def release(self):
        """Let the waiting thread go on (when the first part stopped early, with an error)."""
        for event in self.ready:
            event.set()


def forward_on_two_threads(run, config, ids, targets=None):
    """``run(ids, cache=, targets=)`` (the forward pass) on the two parts of one sequence's
    tokens at once, BLAS on one thread per call; the two results joined as one pass gives them.

    ids, targets [1, T] -> logits [1, T, V] or log P [1, T].
    """
    T = ids.shape[1]
    if "worker" not in _made:
        _made["worker"] = ThreadPoolExecutor(1, thread_name_prefix="npllm-forward")

    def part(tokens, cache):
        try:
            return run(ids[:, tokens], cache=cache,
                       targets=None if targets is None else targets[:, tokens])
        finally:
            if not cache.waits:
                cache.release()

    h = max(1, min(T - 1, round(SPLIT * T)))
    first, second = HandOffCache.pair(config, T, h)
    with _one_at_a_time, _controller().limit(limits=1):
        other = _made["worker"].submit(part, slice(h, T), second)
        mine = part(slice(0, h), first)
        return np.concatenate([mine, other.result()], axis=1)
