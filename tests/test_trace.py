"""The trace (issue 7): intermediate arrays under the lecture's names, equal to transformers'.

Hidden states are compared with ``output_hidden_states`` and attention patterns with eager
``output_attentions``, on tiny random models and on the default model. Tolerance 1e-4: absolute
on the tiny models (activations of order 1) and on attention weights (in [0, 1]); on the default
model's hidden states 1e-4 relative to the largest entry, because SmolLM2's residual stream
carries "massive activations" of ~2e4 in a few dimensions, where one float32 ulp is already 2e-3.
"""
import numpy as np
import pytest
import torch

import npllm
from npllm.equations import (apply_rope, causal_mask, merge_heads, repeat_kv, rms_norm,
                             rope_cos_sin, rope_inverse_frequencies, silu, softmax)
from npllm.inspect import hidden_state_name
from npllm.trace import NAMES, Trace, kv_head, names
from tiny_models import load_reference, tiny_llama

VARIANTS = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa-tied-bf16": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                          dtype="bfloat16", seed=5),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request):
    folder = tiny_llama(**VARIANTS[request.param])
    return npllm.load(str(folder)), load_reference(folder)


def reference(ref, ids):
    with torch.no_grad():
        out = ref(torch.tensor(ids), output_hidden_states=True, output_attentions=True)
    return [h.numpy() for h in out.hidden_states], [a.numpy() for a in out.attentions]


def ours(model, trace):
    L = model.config.num_hidden_layers
    hidden = [trace[hidden_state_name(model, i)] for i in range(L + 1)]
    return hidden, [trace[f"layers.{i}.pattern"] for i in range(L)]


@pytest.mark.parametrize("engine", ["reference", "numba"])
def test_hidden_states_and_patterns_equal_transformers_tiny(tiny, engine):
    model, ref = tiny
    model = npllm.model.Model(model.config, model.weights, engine=engine)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 19))
    trace = Trace("embeddings", "layers.*.output", "norm", "layers.*.pattern")
    model(ids, trace=trace)
    hidden, patterns = ours(model, trace)
    ref_hidden, ref_patterns = reference(ref, ids)
    assert len(hidden) == len(ref_hidden) and len(patterns) == len(ref_patterns)
    for i, (a, b) in enumerate(zip(hidden, ref_hidden)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(patterns, ref_patterns)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f"attentions[{i}]")


def test_a_wrong_trace_would_be_caught(tiny):
    """Negative control: the comparison tells one layer from the next and one head from another."""
    model, ref = tiny
    ids = np.arange(3, 15)[None]
    trace = Trace("layers.*.output", "layers.0.pattern")
    model(ids, trace=trace)
    ref_hidden, ref_patterns = reference(ref, ids)
    assert np.abs(trace["layers.0.output"] - ref_hidden[2]).max() > 1e-2  # off by one layer
    swapped = trace["layers.0.pattern"][:, ::-1]
    assert np.abs(swapped - ref_patterns[0]).max() > 1e-2  # heads in the wrong order


@pytest.mark.real_model
def test_hidden_states_and_patterns_equal_transformers_default_model(default_model,
                                                                     hf_gguf_model):
    ids = np.array(default_model.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. 2 + 2 = 4"))[None]
    trace = Trace("embeddings", "layers.*.output", "norm", "layers.*.pattern")
    default_model(ids, trace=trace)
    hidden, patterns = ours(default_model, trace)
    original = hf_gguf_model.config._attn_implementation
    hf_gguf_model.set_attn_implementation("eager")  # sdpa does not return attention weights
    try:
        ref_hidden, ref_patterns = reference(hf_gguf_model, ids)
    finally:  # the fixture is shared by the session: give it back as it was
        hf_gguf_model.set_attn_implementation(original)
    assert len(hidden) == len(ref_hidden) == 31 and len(patterns) == len(ref_patterns) == 30
    for i, (a, b) in enumerate(zip(hidden, ref_hidden)):
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=0,
                                   err_msg=f"hidden_states[{i}]")
    for i, (a, b) in enumerate(zip(patterns, ref_patterns)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=f"attentions[{i}]")


def _sizes(model, T, S):
    c = model.config
    return {"1": 1, "B": 2, "T": T, "S": S, "D": c.hidden_size, "H": c.num_attention_heads,
            "K": c.num_key_value_heads, "Dh": c.head_dim, "F": c.intermediate_size,
            "V": c.vocab_size}


def test_every_documented_name_is_kept_with_its_documented_shape(tiny):
    model, _ = tiny
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(2, 7))
    trace = Trace()
    model(ids, trace=trace)
    L = model.config.num_hidden_layers
    assert trace.names() == names(L)  # all of them, in forward order
    size = _sizes(model, 7, 7)
    for name in trace:
        template = name if name in NAMES else "layers.{i}." + name.split(".", 2)[2]
        shape = NAMES[template][0].strip("[]").split(", ")
        assert trace[name].shape == tuple(size[s] for s in shape), name
        assert trace[name].dtype == np.float32


def test_names_mean_what_the_table_says(tiny):
    """Each kept array recomputed from its neighbours with the equations."""
    model, _ = tiny
    c, w = model.config, model.weights
    ids = np.random.default_rng(2).integers(0, c.vocab_size, size=(1, 9))
    trace = Trace()
    logits = model(ids, trace=trace)
    t = trace.arrays
    p = "model.layers.1."
    G = c.num_attention_heads // c.num_key_value_heads
    mask = causal_mask(9)
    np.testing.assert_array_equal(t["embeddings"], w["model.embed_tokens.weight"][ids])
    np.testing.assert_allclose(t["layers.1.attn_norm"],
                               rms_norm(t["layers.0.output"], w[p + "input_layernorm.weight"],
                                        c.rms_norm_eps), atol=1e-5)
    cos, sin = rope_cos_sin(np.arange(9), rope_inverse_frequencies(c.head_dim, c.rope_theta))
    np.testing.assert_allclose(t["layers.1.q_rope"], apply_rope(t["layers.1.q"], cos, sin),
                               atol=1e-5)
    np.testing.assert_allclose(t["layers.1.k_rope"], apply_rope(t["layers.1.k"], cos, sin),
                               atol=1e-5)
    np.testing.assert_allclose(t["layers.1.pattern"], softmax(t["layers.1.scores"] + mask),
                               atol=1e-6)
    for h in range(c.num_attention_heads):  # query head h reads K/V head h // G
        g = kv_head(h, c.num_attention_heads, c.num_key_value_heads)
        assert g == h // G
        q, k = t["layers.1.q_rope"][0, h], t["layers.1.k_rope"][0, g]
        np.testing.assert_allclose(t["layers.1.scores"][0, h], q @ k.T / np.sqrt(c.head_dim),
                                   atol=1e-5)
    np.testing.assert_allclose(t["layers.1.heads"],
                               t["layers.1.pattern"] @ repeat_kv(t["layers.1.v"], G), atol=1e-5)
    np.testing.assert_allclose(t["layers.1.attn_output"],
                               merge_heads(t["layers.1.heads"]) @ w[p + "self_attn.o_proj.weight"].T,
                               atol=1e-5)
    np.testing.assert_allclose(t["layers.1.residual"],
                               t["layers.0.output"] + t["layers.1.attn_output"], atol=1e-5)
    np.testing.assert_allclose(t["layers.1.act"], silu(t["layers.1.gate"]), atol=1e-6)
    np.testing.assert_allclose(t["layers.1.hidden"], t["layers.1.act"] * t["layers.1.up"],
                               atol=1e-6)
    np.testing.assert_allclose(t["layers.1.mlp_output"],
                               t["layers.1.hidden"] @ w[p + "mlp.down_proj.weight"].T, atol=1e-5)
    np.testing.assert_allclose(t["layers.1.output"],
                               t["layers.1.residual"] + t["layers.1.mlp_output"], atol=1e-5)
    np.testing.assert_array_equal(t["logits"], logits)


def test_only_what_is_asked_is_kept_or_computed(tiny, monkeypatch):
    model, _ = tiny
    ids = np.arange(2, 8)
    untraced = model(ids)
    calls = []
    import npllm.equations
    real = npllm.equations.attention_pattern
    monkeypatch.setattr(npllm.equations, "attention_pattern",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    trace = Trace("layers.1.output", "logits")
    np.testing.assert_array_equal(model(ids, trace=trace), untraced)
    assert trace.names() == ["layers.1.output", "logits"] and not calls
    trace = Trace("layers.0.pattern")
    model(ids, trace=trace)
    assert trace.names() == ["layers.0.pattern"] and len(calls) == 1


def test_kept_arrays_are_copies_and_stack_works(tiny):
    model, _ = tiny
    cache = model.new_cache()
    trace = Trace("layers.*.k_rope", "layers.*.output")
    model(np.arange(2, 8), cache=cache, trace=trace)
    kept = trace["layers.0.k_rope"].copy()
    cache.keys[0][...] = 0  # the model's own buffer changes; the trace's copy does not
    np.testing.assert_array_equal(trace["layers.0.k_rope"], kept)
    stacked = trace.stack("layers.*.output")
    assert stacked.shape == (model.config.num_hidden_layers, 1, 6, model.config.hidden_size)


def test_decode_step_with_cache_traces_all_key_positions(tiny):
    model, _ = tiny
    ids = np.arange(3, 13)
    full = Trace("layers.*.pattern")
    model(ids, trace=full)
    cache = model.new_cache()
    model(ids[:-1], cache=cache)
    step = Trace("layers.*.pattern", "layers.*.k_rope")
    model(ids[-1:], cache=cache, trace=step)
    H, K = model.config.num_attention_heads, model.config.num_key_value_heads
    assert step["layers.0.k_rope"].shape[1:3] == (K, 10)  # S = 9 cached + 1 new
    for i in range(model.config.num_hidden_layers):
        assert step[f"layers.{i}.pattern"].shape == (1, H, 1, 10)
        np.testing.assert_allclose(step[f"layers.{i}.pattern"][:, :, 0],
                                   full[f"layers.{i}.pattern"][:, :, -1], atol=1e-5)


def test_bad_patterns_and_names_say_what_is_wrong(tiny):
    with pytest.raises(ValueError, match="matches no name.*layers.{i}.pattern"):
        Trace("layers.0.patern")
    with pytest.raises(ValueError, match="must be strings"):
        Trace(3)
    model, _ = tiny
    trace = Trace("logits")
    with pytest.raises(KeyError, match="no forward pass ran"):
        trace["logits"]
    model(np.arange(4), trace=trace)
    with pytest.raises(KeyError, match="do not ask for it"):
        trace["layers.0.q"]
    with pytest.raises(KeyError, match="not a name"):
        trace["layers.0.query"]
    assert "logits" in trace and len(trace) == 1
    assert "[1, 4, " in repr(trace) and "LM head" in repr(trace)
