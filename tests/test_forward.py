"""The whole forward pass against transformers, on tiny random Llama models (issue 3).

Each tiny model is built and saved by transformers (tests/tiny_models.py), loaded by npllm from
the saved folder, and both run the same token ids. Tolerance: 1e-4 absolute on logits; the tiny
models' logits are O(1), and two float32 implementations of 2 layers differ by summation order
only (about 1e-6), so 1e-4 leaves room without hiding a wrong formula (a wrong eps, RoPE layout
or mask changes logits by 1e-2 or more).
"""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import npllm
from npllm.model.llama import KVCache
from tiny_models import make_tiny_llama, load_reference

VARIANTS = {
    "gqa-untied-fp32": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha-tied-fp32": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-theta500k-bf16": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                               dtype="bfloat16"),
    "mha-untied-bf16-theta10k": dict(num_attention_heads=2, num_key_value_heads=2,
                                     dtype="bfloat16", seed=3),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    return npllm.load(str(path)), load_reference(path)


def reference_logits(ref, ids, attention_mask=None):
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask)
        return ref(torch.tensor(ids), **kwargs).logits.float().numpy()


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_logits_equal_transformers(tiny, backend):
    model, ref = tiny
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 37))
    np.testing.assert_allclose(model(ids, backend=backend), reference_logits(ref, ids),
                               atol=1e-4, rtol=0)


def test_single_sequence_and_single_token(tiny):
    model, ref = tiny
    for T in (1, 5):
        ids = np.arange(T) + 3
        np.testing.assert_allclose(model(ids), reference_logits(ref, ids[None])[0], atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_kv_cache_decode_equals_full_recompute(tiny, backend):
    model, _ = tiny
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=40)
    full = model(ids, backend=backend)
    cache = model.new_cache(capacity=8)  # small, so the cache must grow while decoding
    steps = [model(ids[:13], cache=cache, backend=backend)]
    steps += [model(ids[t:t + 1], cache=cache, backend=backend) for t in range(13, 40)]
    assert cache.length == 40 and cache.capacity >= 40
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(tiny, side):
    model, _ = tiny
    rng = np.random.default_rng(2)
    lengths = [9, 3, 14, 1]
    seqs = [rng.integers(0, model.config.vocab_size, size=n) for n in lengths]
    T = max(lengths)
    ids = np.zeros((len(seqs), T), np.int64)
    mask = np.zeros((len(seqs), T), np.int64)
    for b, s in enumerate(seqs):
        where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, where], mask[b, where] = s, 1
    batched = model(ids, attention_mask=mask)
    for b, s in enumerate(seqs):
        where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        # 1e-5 absolute and relative: the same float32 operations on the same rows; only BLAS
        # blocking differs with the batch shape (logits reach ~5, so relative noise ~4e-6).
        np.testing.assert_allclose(batched[b, where], model(s), atol=1e-5, rtol=1e-5)
    assert np.isfinite(batched).all(), "a padded row must not produce NaN (float32-min mask)"


def test_right_padded_batch_equals_transformers(tiny):
    model, ref = tiny
    ids = np.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ours, theirs = model(ids, attention_mask=mask), reference_logits(ref, ids, mask)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[1, :3], theirs[1, :3], atol=1e-4, rtol=0)


def test_parameter_count_equals_transformers(tiny):
    model, ref = tiny
    assert model.num_parameters() == ref.num_parameters()
    assert f"{ref.num_parameters():,} parameters" in repr(model)


def test_bad_input_ids_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, "):
        model(np.array([0, model.config.vocab_size]))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="integers of shape"):
        model(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(np.zeros((2, 3), np.int64), attention_mask=np.ones((2, 4)))


def test_wrong_rope_layout_is_detected(tiny, monkeypatch):
    """The parity test can fail: swapping RoPE's halves changes the logits well beyond 1e-4."""
    model, ref = tiny
    import npllm.model.llama as llama

    def swapped(x, cos, sin, be):
        half = x.shape[-1] // 2
        x = np.concatenate([x[..., half:], x[..., :half]], axis=-1)
        return np.stack([be.apply_rope(x[b], cos[b], sin[b]) for b in range(x.shape[0])])

    monkeypatch.setattr(llama, "rope", swapped)
    ids = np.arange(20)[None] % model.config.vocab_size
    assert np.abs(model(ids) - reference_logits(ref, ids)).max() > 1e-3


def test_cache_repr_and_growth():
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_key_value_heads=2, head_dim=4, num_hidden_layers=3)
    cache = KVCache.empty(cfg, batch_size=1, capacity=2)
    cache.reserve(5)
    assert cache.capacity == 5 and "length=0" in repr(cache)


# --- the fast path's choices: fused projections, log-probs instead of logits, the last logits ----

@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_targets_give_the_log_probs_of_the_logits(tiny, backend):
    """forward(..., targets=) equals token_log_probs of the logits (one sequence, a padded
    batch, and only the kept positions)."""
    from npllm.equations import token_log_probs
    model, _ = tiny
    rng = np.random.default_rng(4)
    ids = rng.integers(0, model.config.vocab_size, size=(3, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    logits = model(ids, attention_mask=mask, backend=backend)
    targets = rng.integers(0, model.config.vocab_size, size=ids.shape)
    lp = model(ids, attention_mask=mask, targets=targets, backend=backend)
    real = mask == 1
    np.testing.assert_allclose(lp[real], token_log_probs(logits, targets)[real], atol=2e-5,
                               rtol=1e-5)
    assert (lp[~real] == 0).all()  # padding: not computed
    one = model(ids[0], targets=targets[0], backend=backend)
    np.testing.assert_allclose(one, lp[0], atol=2e-5, rtol=1e-5)
    last = model(ids, attention_mask=mask, targets=targets[:, -3:], logits_to_keep=3,
                 backend=backend)
    np.testing.assert_allclose(last, lp[:, -3:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_logits_to_keep_gives_the_last_positions(tiny, backend):
    model, _ = tiny
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, size=(2, 9))
    full = model(ids, backend=backend)
    np.testing.assert_array_equal(model(ids, logits_to_keep=9, backend=backend), full)
    # The same numbers up to BLAS's blocking, which depends on how many rows the LM head gets
    # (as in test_padded_batch_equals_each_sequence_alone).
    np.testing.assert_allclose(model(ids, logits_to_keep=2, backend=backend), full[:, -2:],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(model(ids[0], logits_to_keep=1, backend=backend), full[0, -1:],
                               atol=1e-5, rtol=1e-5)


def test_logits_to_keep_and_targets_are_checked(tiny):
    model, _ = tiny
    ids = np.arange(6) % model.config.vocab_size
    with pytest.raises(ValueError, match="logits_to_keep must be between 1 and"):
        model(ids, logits_to_keep=7)
    with pytest.raises(ValueError, match="targets must be integers shaped like"):
        model(ids, targets=ids[:-1])
    with pytest.raises(ValueError, match="targets must be integers shaped like"):
        model(ids, targets=ids.astype(float))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, "):
        model(ids, targets=ids + model.config.vocab_size)


def test_numba_backend_fuses_adjacent_projections(tiny):
    """Weights stored one after another (gate/up, q/v in the files transformers writes) are
    one matrix product with the Numba backend; the NumPy backend keeps one per projection."""
    import npllm.model.llama as llama
    model, _ = tiny
    calls = []
    real = llama.linear

    def counting(x, w):
        calls.append(w.shape)
        return real(x, w)

    ids = np.arange(5) % model.config.vocab_size
    counts = {}
    for backend in ("numpy", "numba"):
        calls.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llama, "linear", counting)
            model(ids, backend=backend)
        counts[backend] = len(calls) // model.config.num_hidden_layers
    assert counts["numpy"] == 7  # q, k, v, o, gate, up, down
    p = "model.layers.0."
    gate, up = model.weights[p + "mlp.gate_proj.weight"], model.weights[p + "mlp.up_proj.weight"]
    mapped = gate.base is not None and not gate.flags.owndata
    if mapped and len(llama.stack_adjacent([gate, up])) == 1:  # float32 file: memory-mapped
        assert counts["numba"] < 7
    else:  # bfloat16 file: widened into separate arrays, nothing to fuse
        assert counts["numba"] == 7


def test_stack_adjacent_groups_only_neighbours_in_memory():
    from npllm.model.weights import stack_adjacent
    buf = np.arange(40, dtype=np.float32).reshape(10, 4)
    buf.flags.writeable = False
    a, b, c = buf[0:2], buf[2:5], buf[7:10]
    groups = stack_adjacent([c, b, a])
    assert [g for _, g in groups] == [[2, 1], [0]]  # memory order: a, b | c
    (ab, _), (alone, _) = groups
    np.testing.assert_array_equal(ab, buf[0:5])
    assert np.shares_memory(ab, buf) and not ab.flags.writeable and alone is c
    other = np.arange(8, dtype=np.float32).reshape(2, 4)  # another buffer: never stacked
    assert [g for _, g in stack_adjacent([a, other])] in ([[0], [1]], [[1], [0]])
    wide = np.zeros((2, 5), np.float32)
    assert len(stack_adjacent([buf[:1], wide])) == 2  # different widths


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_padded_batch_decoding_with_cache_equals_recompute(tiny, backend):
    """Left-padded batch, KV cache, one token per step: the mask path (not decode_attention)."""
    model, _ = tiny
    rng = np.random.default_rng(6)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    full = model(ids, attention_mask=mask, backend=backend)
    cache = model.new_cache(batch_size=2, capacity=4)
    steps = [model(ids[:, :6], cache=cache, attention_mask=mask[:, :6], backend=backend)]
    steps += [model(ids[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1], backend=backend)
              for t in range(6, 10)]
    got = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(got[0], full[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1, 4:], full[1, 4:], atol=1e-4, rtol=0)


# --- one long sequence on two threads (npllm/model/threads.py) --------------------------------

@pytest.fixture
def two_threads(monkeypatch):
    """Make the forward pass split every sequence of 8 tokens or more over two threads (the
    test session runs BLAS on one thread, where it never would), and count the splits."""
    from npllm.model import threads
    monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    monkeypatch.setattr(threads, "MIN_TOKENS", 8)
    splits = []
    real = threads.forward_on_two_threads

    def counting(run, config, ids, *args, **kwargs):
        splits.append(ids.shape)
        return real(run, config, ids, *args, **kwargs)
    monkeypatch.setattr(threads, "forward_on_two_threads", counting)
    return splits


@given(T=st.integers(2, 8192), past=st.integers(0, 8192),
       sizes=st.sampled_from([(30, 576, 9, 3, 64, 1536, 49152),   # SmolLM2-135M
                              (32, 4096, 32, 8, 128, 14336, 128256),  # Llama-3-8B
                              (2, 16, 4, 2, 4, 40, 384)]))  # a tiny model
def test_the_split_balances_the_two_threads_work(T, past, sizes):
    """first_part's h: token t costs 2P + b (past + t) (weights, then attention to the positions
    before it); no other split point gives two parts of closer cost."""
    from npllm.model.config import LlamaConfig
    from npllm.model.threads import ATTENTION_COST, first_part

    L, D, H, K, Dh, F, V = sizes
    config = LlamaConfig.from_dict(dict(
        model_type="llama", num_hidden_layers=L, hidden_size=D, num_attention_heads=H,
        num_key_value_heads=K, head_dim=Dh, intermediate_size=F, vocab_size=V))
    P = L * (D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F) + V * D
    b = ATTENTION_COST * 4 * L * H * Dh
    cost = 2 * P + b * (past + np.arange(T, dtype=np.float64))  # token by token
    total = cost.sum()

    def imbalance(h):
        return abs(2 * cost[:h].sum() - total)
    h = first_part(config, T, past)
    assert 1 <= h <= T - 1 and h >= T // 2  # later tokens cost more: the first part is larger
    # The formula integrates a continuous cost, so it may land one token beside the best one.
    best = min(range(max(1, h - 2), min(T - 1, h + 2) + 1), key=imbalance)
    assert imbalance(h) <= imbalance(best) + cost[-1]


def test_two_threads_give_the_single_pass(tiny, two_threads):
    """The same rows through the same functions (the second part as a continuation with the
    first part's keys and values): logits and log-probabilities as one pass gives them, and as
    transformers does."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from npllm.model import threads

    def blas():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    model, ref = tiny
    rng = np.random.default_rng(5)
    ids = rng.integers(0, model.config.vocab_size, size=40)
    with threadpool_limits(2, user_api="blas"):  # the session runs BLAS on one thread
        split_logits = model(ids, backend="numba")
        split_log_p = model(ids[:-1], targets=ids[1:], backend="numba")
        assert blas() == [2] * len(blas())  # the split's one thread was given back
    assert two_threads == [(1, 40), (1, 39)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threads, "MIN_TOKENS", 10**9)
        one_logits = model(ids, backend="numba")
        one_log_p = model(ids[:-1], targets=ids[1:], backend="numba")
    assert len(two_threads) == 2
    # Two float32 orders of BLAS's sums: this file's tolerance (module docstring). A key or value
    # handed over at the wrong position moves logits by 1e-2 or more (next test).
    np.testing.assert_allclose(split_logits, one_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(split_log_p, one_log_p, atol=1e-4, rtol=0)
    np.testing.assert_allclose(split_logits, reference_logits(ref, ids[None])[0], atol=1e-4,
                               rtol=0)


def test_two_threads_catch_a_wrong_handoff(tiny, two_threads, monkeypatch):
    """Negative control for the tolerance above: the second part attending to the first part's
    keys one position off."""
    from npllm.model import threads

    model, _ = tiny
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, size=40)
    right = model(ids, backend="numba")
    real = threads.HandOffCache.update

    def shifted(self, layer, k, v):
        k_all, v_all = real(self, layer, k, v)
        if self.waits:
            k_all = np.concatenate([k_all[:, :, 1:], k_all[:, :, -1:]], axis=2)
        return k_all, v_all
    monkeypatch.setattr(threads.HandOffCache, "update", shifted)
    assert np.abs(model(ids, backend="numba") - right).max() > 1e-2


def test_two_threads_only_where_they_pay(tiny, two_threads):
    """Batches, padding masks, traces, log-probabilities of kept positions, decoding steps and
    the NumPy backend: one pass."""
    from npllm.trace import Trace

    model, _ = tiny
    ids = np.arange(20) + 3
    model(np.stack([ids, ids]), backend="numba")
    model(ids[None], attention_mask=np.ones((1, 20), int), backend="numba")
    model(ids, logits_to_keep=2, targets=ids[-2:], backend="numba")
    model(ids, backend="numpy")
    model(ids, trace=Trace(), backend="numba")
    model(ids[:7], backend="numba")  # below MIN_TOKENS
    cache = model.new_cache()
    model(ids[:7], cache=cache, backend="numba")
    model(ids[7:8], cache=cache, backend="numba")
    assert two_threads == []


def test_two_threads_continue_a_cache(tiny, two_threads):
    """A long prompt with a KV cache (before generating) is split too: both parts write into
    the caller's cache (made room for), whose keys, values and length are then those of one
    pass, as are the kept logits (the second part's only, or both parts') and the decoding
    step after it; also after positions already cached."""
    from npllm.model import threads

    model, _ = tiny
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, size=50)

    def prompt_then_step():
        cache = model.new_cache(capacity=4)
        out = [model(ids[:5], cache=cache, backend="numba"),  # below MIN_TOKENS: one pass
               model(ids[5:40], cache=cache, logits_to_keep=3, backend="numba"),  # 3 of 16
               model(ids[40:49], cache=cache, logits_to_keep=6, backend="numba"),  # 2 + 4
               model(ids[49:], cache=cache, backend="numba")]  # a decoding step
        return out, cache

    split, split_cache = prompt_then_step()
    assert two_threads == [(1, 35), (1, 9)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(threads, "MIN_TOKENS", 10**9)
        one, one_cache = prompt_then_step()
    assert len(two_threads) == 2
    assert split_cache.length == one_cache.length == 50
    for a, b in zip(split, one):  # this file's tolerance (see the test above)
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    for a, b in zip(split_cache.keys + split_cache.values, one_cache.keys + one_cache.values):
        np.testing.assert_allclose(a[:, :, :50], b[:, :, :50], atol=1e-4, rtol=0)


def test_two_threads_pass_on_an_error_without_hanging(tiny, two_threads, monkeypatch):
    """If the first part fails, the second (waiting for its keys and values) is let go and the
    error reaches the caller."""
    import npllm.model.llama as llama

    model, _ = tiny
    real = llama.mlp_block
    calls = []

    def failing(x, *args, **kwargs):
        calls.append(x.shape)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(x, *args, **kwargs)
    monkeypatch.setattr(llama, "mlp_block", failing)
    with pytest.raises(RuntimeError, match="boom"):
        model(np.arange(30) + 3, backend="numba")
    monkeypatch.setattr(llama, "mlp_block", real)
    np.testing.assert_allclose(model(np.arange(30) + 3, backend="numba")[-1],
                               model(np.arange(30) + 3, backend="numpy")[-1], atol=1e-4, rtol=0)


def test_two_threads_called_from_two_threads(tiny, two_threads):
    """Two long forward passes called at once from two threads (the splits take turns: BLAS's
    thread count is process-wide) both split, and both give the single pass's numbers."""
    from concurrent.futures import ThreadPoolExecutor

    model, _ = tiny
    ids = [np.random.default_rng(s).integers(0, model.config.vocab_size, size=30) for s in (1, 2)]
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda x: model(x, backend="numba"), ids))
    assert len(two_threads) == 2
    for x, got in zip(ids, both):
        np.testing.assert_allclose(got, model(x, backend="numpy"), atol=1e-4, rtol=0)


# --- several batches two at a time (threads.map_on_two_threads, used by npllm.score) ----------

def test_map_on_two_threads_uses_both_with_blas_on_one_and_restores_it(monkeypatch):
    """Both threads take items, results come back in order, BLAS runs on one thread meanwhile
    and on two again after, and a forward pass called inside is not split again (its lock is
    taken: that would wait forever)."""
    import threading
    import time

    from threadpoolctl import threadpool_info, threadpool_limits

    from npllm.model import threads

    def blas():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    monkeypatch.setattr(threads, "blas_threads", lambda: 2)
    seen = []

    def square(x):
        seen.append((threading.current_thread().name, blas(), threads.pays(1, 10**6),
                     threads.batches_pay(2, "numba")))
        time.sleep(0.01)  # let the other thread take the next one
        return x * x

    with threadpool_limits(2, user_api="blas"):  # the session runs BLAS on one thread
        assert threads.map_on_two_threads(square, range(12)) == [x * x for x in range(12)]
        assert blas() == [2] * len(blas())
    assert len({name for name, *_ in seen}) == 2
    assert all(b == [1] * len(b) for _, b, _, _ in seen)
    assert not any(split or again for _, _, split, again in seen)
    assert threads.pays(1, 10**6) and threads.batches_pay(2, "numba")  # outside: again


def test_map_on_two_threads_stops_at_an_error():
    """An error in one call reaches the caller; no further item is started, and the next call
    runs (nothing is left locked)."""
    import time

    from npllm.model import threads
    started = []

    def fails_at_3(x):
        started.append(x)
        time.sleep(0.01)
        if x == 3:
            raise RuntimeError("boom")
        return x

    with pytest.raises(RuntimeError, match="boom"):
        threads.map_on_two_threads(fails_at_3, range(100))
    assert 3 in started and len(started) <= 6
    assert threads.map_on_two_threads(lambda x: -x, range(3)) == [0, -1, -2]


def test_a_split_leaves_no_blas_spin_window(tiny, two_threads):
    """A split's products run with BLAS on one thread, so no BLAS thread spins after it: the
    decoding steps that follow need not run on one thread (blas_threads_spinning stays as it
    was), while a pass with BLAS on its threads is noted."""
    from npllm import backend

    model, _ = tiny
    backend.note_blas_products(-np.inf)  # nothing noted yet
    model(np.arange(20) + 3, cache=model.new_cache(), backend="numba")
    assert len(two_threads) == 1 and not backend.blas_threads_spinning()
    model(np.arange(5) + 3, backend="numba")  # one pass
    assert backend.blas_threads_spinning()
