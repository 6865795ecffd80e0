"""The whole forward pass against transformers, on tiny random Llama models, on both engines.

Each tiny model is built and saved by transformers (tests/tiny_models.py), loaded by npllm from
the saved folder with each engine (the reference, npllm/model/llama.py, and the Numba engine),
and both run the same token ids. Tolerance: 1e-4 absolute on logits; the tiny
models' logits are O(1), and two float32 implementations of 2 layers differ by summation order
only (about 1e-6), so 1e-4 leaves room without hiding a wrong formula (a wrong eps, RoPE layout
or mask changes logits by 1e-2 or more).
"""
import numpy as np
import pytest
import torch

import npllm
from npllm.model import KVCache, Model
from tiny_models import make_tiny_llama, load_reference

VARIANTS = {
    "gqa-untied-fp32": dict(num_attention_heads=4, num_key_value_heads=2),
    "mha-tied-fp32": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-theta500k-bf16": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                               dtype="bfloat16"),
    "mha-untied-bf16-theta10k": dict(num_attention_heads=2, num_key_value_heads=2,
                                     dtype="bfloat16", seed=3),
}


ENGINES = ["reference", "numba"]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    """(npllm's model on the suite's engine, transformers' model) of one variant."""
    path = make_tiny_llama(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    return npllm.load(str(path)), load_reference(path)


def on(model, engine):
    """The same weights on another engine."""
    return Model(model.config, model.weights, model.tokenizer, engine=engine)


def reference_logits(ref, ids, attention_mask=None):
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask)
        return ref(torch.tensor(ids), **kwargs).logits.float().numpy()


@pytest.mark.parametrize("engine", ENGINES)
def test_logits_equal_transformers(tiny, engine):
    model, ref = tiny
    model = on(model, engine)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 37))
    np.testing.assert_allclose(model(ids), reference_logits(ref, ids),
                               atol=1e-4, rtol=0)


def test_single_sequence_and_single_token(tiny):
    model, ref = tiny
    for T in (1, 5):
        ids = np.arange(T) + 3
        np.testing.assert_allclose(model(ids), reference_logits(ref, ids[None])[0], atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_kv_cache_decode_equals_full_recompute(tiny, engine):
    model, _ = tiny
    model = on(model, engine)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=40)
    full = model(ids)
    cache = model.new_cache(capacity=8)  # small, so the cache must grow while decoding
    steps = [model(ids[:13], cache=cache)]
    steps += [model(ids[t:t + 1], cache=cache) for t in range(13, 40)]
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
    n = model.config.context_length
    with pytest.raises(ValueError, match=f"exceed the model's context of {n}"):
        model(np.zeros(n + 1, np.int64))
    cache = model.new_cache()
    model(np.zeros(n - 1, np.int64), cache=cache)
    with pytest.raises(ValueError, match=rf"{n + 1} positions \({n - 1} cached \+ 2 new\)"):
        model(np.zeros(2, np.int64), cache=cache)


def test_wrong_rope_layout_is_detected(tiny):
    """The parity test can fail: q and k rows in the interleaved layout (each head's two halves
    of coordinates interleaved, as GGUF files store them) change the logits well beyond 1e-4."""
    from npllm.equations import interleaved_to_half_rows
    model, ref = tiny
    c = model.config
    weights = dict(model.weights)
    for i in range(c.num_hidden_layers):
        for name, heads in (("q_proj", c.num_attention_heads), ("k_proj", c.num_key_value_heads)):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            weights[key] = interleaved_to_half_rows(weights[key], heads)
    wrong = Model(c, weights, engine=model.engine.name)
    ids = np.arange(20)[None] % c.vocab_size
    assert np.abs(wrong(ids) - reference_logits(ref, ids)).max() > 1e-3


def test_cache_repr_and_growth():
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_key_value_heads=2, head_dim=4, num_hidden_layers=3)
    cache = KVCache.empty(cfg, batch_size=1, capacity=2)
    cache.reserve(5)
    assert cache.capacity == 5 and "length=0" in repr(cache)


# --- the fast path's choices: fused projections, log-probs instead of logits, the last logits ----

@pytest.mark.parametrize("engine", ENGINES)
def test_targets_give_the_log_probs_of_the_logits(tiny, engine):
    """forward(..., targets=) equals token_log_probs of the logits (one sequence, a padded
    batch, and only the kept positions)."""
    from npllm.equations import token_log_probs
    model, _ = tiny
    model = on(model, engine)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, model.config.vocab_size, size=(3, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    logits = model(ids, attention_mask=mask)
    targets = rng.integers(0, model.config.vocab_size, size=ids.shape)
    lp = model(ids, attention_mask=mask, targets=targets)
    real = mask == 1
    np.testing.assert_allclose(lp[real], token_log_probs(logits, targets)[real], atol=2e-5,
                               rtol=1e-5)
    assert (lp[~real] == 0).all()  # padding: not computed
    one = model(ids[0], targets=targets[0])
    np.testing.assert_allclose(one, lp[0], atol=2e-5, rtol=1e-5)
    last = model(ids, attention_mask=mask, targets=targets[:, -3:], logits_to_keep=3)
    np.testing.assert_allclose(last, lp[:, -3:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_logits_to_keep_gives_the_last_positions(tiny, engine):
    model, _ = tiny
    model = on(model, engine)
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, size=(2, 9))
    full = model(ids)
    np.testing.assert_array_equal(model(ids, logits_to_keep=9), full)
    # The same numbers up to BLAS's blocking, which depends on how many rows the LM head gets
    # (as in test_padded_batch_equals_each_sequence_alone).
    np.testing.assert_allclose(model(ids, logits_to_keep=2), full[:, -2:],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(model(ids[0], logits_to_keep=1), full[0, -1:],
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


def test_numba_engine_fuses_adjacent_projections(tiny):
    """Weights stored one after another (gate/up, q/v in the files transformers writes) are
    one matrix product on the Numba engine; bfloat16 files are widened into separate arrays."""
    from npllm.engine import NumbaEngine
    from npllm.engine.packed import stack_adjacent
    model, _ = tiny
    engine = NumbaEngine(model.config, model.weights)
    products = sum(p.products for layer in engine.layers
                   for p in (layer.qkv, layer.o, layer.gate_up, layer.down))
    p = "model.layers.0."
    gate, up = model.weights[p + "mlp.gate_proj.weight"], model.weights[p + "mlp.up_proj.weight"]
    if len(stack_adjacent([gate, up])) == 1:  # float32 file: memory-mapped, neighbours
        assert products < 7 * model.config.num_hidden_layers
    else:
        assert products == 7 * model.config.num_hidden_layers


def test_stack_adjacent_groups_only_neighbours_in_memory():
    from npllm.engine.packed import stack_adjacent
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


@pytest.mark.parametrize("engine", ENGINES)
def test_padded_batch_decoding_with_cache_equals_recompute(tiny, engine):
    """Left-padded batch, KV cache, one token per step: the mask path (not decode_attention)."""
    model, _ = tiny
    model = on(model, engine)
    rng = np.random.default_rng(6)
    ids = rng.integers(0, model.config.vocab_size, size=(2, 10))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    full = model(ids, attention_mask=mask)
    cache = model.new_cache(batch_size=2, capacity=4)
    steps = [model(ids[:, :6], cache=cache, attention_mask=mask[:, :6])]
    steps += [model(ids[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1])
              for t in range(6, 10)]
    got = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(got[0], full[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1, 4:], full[1, 4:], atol=1e-4, rtol=0)
