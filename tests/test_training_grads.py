"""The whole model's gradients (npllm.training.loss_and_grads) against transformers'
``LlamaForCausalLM`` in float64, ``loss.backward()``, for every parameter, on tiny random models;
the loss against npllm's own forward pass; and a negative control (a transposed weight in the
reference) that the comparison rejects. llm.c's test_gpt2.c does the same for GPT-2 in C."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import npllm
from npllm.training import loss_and_grads
from tiny_models import tiny_llama

CONFIGS = {
    "gqa": dict(),  # H=4, K=2
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "mha-wide-heads": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=24,
                           rope_theta=500000.0, rms_norm_eps=1e-5),
    "mistral-3-layers": dict(model_type="mistral", num_hidden_layers=3),
}
_LOADED = {}


def models(name):
    """npllm's model and transformers' float64 model of the same tiny folder (built once)."""
    if name not in _LOADED:
        import transformers
        folder = tiny_llama(**CONFIGS[name])
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float64, attn_implementation="eager").eval()
        _LOADED[name] = npllm.load(str(folder)), reference
    return _LOADED[name]


def torch_loss_and_grads(reference, input_ids, targets):
    reference.zero_grad()
    logits = reference(torch.from_numpy(input_ids)).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).reshape(-1))
    loss.backward()
    return loss.item(), {name: p.grad.numpy().copy() for name, p in reference.named_parameters()}


def assert_grads_close(grads, expected, tol=1e-5):
    """float32 backward pass against float64: each gradient is sums over B*T positions and L
    layers of float32 products; its rounding error is relative to the size of the gradient
    tensor, not of each entry (which may be a cancelling sum). Measured: ~1e-6 of each tensor's
    largest entry; tol leaves a factor 10. A wrong gradient is off by order 1e-1 to 1 of it."""
    assert set(expected) <= set(grads)
    for name, g in expected.items():
        scale = np.max(np.abs(g))
        np.testing.assert_allclose(grads[name], g, rtol=tol, atol=tol * scale, err_msg=name)


def batch(seed, B, T, V, pad_token_id=2):
    """Random ids with the padding token among them: transformers never trains its row."""
    ids = np.random.default_rng(seed).integers(0, V, (B, T + 1))
    ids[0, 0] = pad_token_id
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_equal_transformers_for_every_parameter(name):
    model, reference = models(name)
    input_ids, targets = batch(0, 2, 11, model.config.vocab_size)
    loss, grads = loss_and_grads(model.weights, model.config, input_ids, targets,
                                 padding_idx=reference.config.pad_token_id)
    expected_loss, expected = torch_loss_and_grads(reference, input_ids, targets)
    assert len(expected) == len({id(g) for g in grads.values()})  # one gradient per parameter
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)  # one float32 mean of log-probs
    assert_grads_close(grads, expected)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(1, 3), T=st.integers(1, 24))
def test_gradients_equal_transformers_over_batch_shapes(seed, B, T):
    model, reference = models("gqa")
    input_ids, targets = batch(seed, B, T, model.config.vocab_size)
    loss, grads = loss_and_grads(model.weights, model.config, input_ids, targets,
                                 padding_idx=reference.config.pad_token_id)
    expected_loss, expected = torch_loss_and_grads(reference, input_ids, targets)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert_grads_close(grads, expected)


@pytest.mark.parametrize("name", ["gqa", "mqa-tied"])
def test_loss_equals_npllm_forward_mean_negative_log_prob(name):
    model, _ = models(name)
    input_ids, targets = batch(1, 3, 9, model.config.vocab_size)
    loss, _ = loss_and_grads(model.weights, model.config, input_ids, targets)
    # Two float32 computations of the same mean: the Numba backend sums in another order.
    np.testing.assert_allclose(loss, -np.mean(model(input_ids, targets=targets)), rtol=2e-6)
    one, _ = loss_and_grads(model.weights, model.config, input_ids[0], targets[0])  # [T] works too
    np.testing.assert_allclose(one, -np.mean(model(input_ids[0], targets=targets[0])), rtol=2e-6)


def test_a_transposed_weight_is_caught():
    """Negative control: the reference with layer 0's (square) o_proj transposed gives other
    gradients, and the comparison above says so."""
    model, reference = models("gqa")
    input_ids, targets = batch(2, 1, 8, model.config.vocab_size)
    _, grads = loss_and_grads(model.weights, model.config, input_ids, targets,
                              padding_idx=reference.config.pad_token_id)
    o_proj = reference.model.layers[0].self_attn.o_proj.weight
    original = o_proj.detach().clone()
    try:
        with torch.no_grad():
            o_proj.copy_(original.T)
        _, wrong = torch_loss_and_grads(reference, input_ids, targets)
    finally:
        with torch.no_grad():
            o_proj.copy_(original)
    with pytest.raises(AssertionError):
        assert_grads_close(grads, wrong)


def test_mismatched_targets_are_refused():
    model, _ = models("gqa")
    with pytest.raises(ValueError, match="targets must have input_ids' shape"):
        loss_and_grads(model.weights, model.config, np.zeros((1, 4), int), np.zeros((1, 3), int))
