"""The equations the other families add, against torch / transformers: linear with and without
bias, LayerNorm without bias, GPT-2's MLP, partial RoPE (StableLM, Phi-3) and learned positions."""
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from conftest import assert_close
from tolerances import absolute, assert_within_terms, layer_norm_rounding, product_terms
from npllm.equations import (apply_partial_rope, gelu_mlp, layer_norm, learned_positions, linear,
                             rope_cos_sin, rope_inverse_frequencies)


def data(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@given(seed=st.integers(0, 2**32 - 1), n_in=st.integers(1, 32), n_out=st.integers(1, 32),
       bias=st.booleans())
def test_linear_matches_torch(seed, n_in, n_out, bias):
    x, w, b = data(seed, (2, 3, n_in)), data(seed + 1, (n_out, n_in)), data(seed + 2, (n_out,))
    expected = F.linear(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                        torch.from_numpy(b).double() if bias else None).numpy()
    # A float32 sum of n_in products (+ b) may cancel: its error is at most gamma_{n_in + 1} of
    # the terms |x| |w|^T + |b| in any order (Higham 3.1), not relative to the output; gamma_n =
    # n u / (1 - n u) < (n + 1) u. (Measured: up to 0.8 of n u, for n_in = 1: one rounding.)
    terms = product_terms(x, w.T) + (absolute(b) if bias else 0.0)
    assert_within_terms(linear(x, w, b if bias else None), expected, terms, ulps=n_in + 2, rtol=0)


@given(seed=st.integers(0, 2**32 - 1), D=st.integers(2, 48))
def test_layer_norm_without_bias_matches_torch(seed, D):
    x, w = data(seed, (3, D)), data(seed + 1, (D,))
    exact = F.layer_norm(torch.from_numpy(x).double(), (D,), torch.from_numpy(w).double(), None,
                         1e-5).numpy()
    # x - mean cancels (D = 2 with two close values): its error is relative to max|x|, scaled by
    # 1 / sigma; the error model of test_equations_norm's LayerNorm, against float64.
    actual = layer_norm(x, w, None, 1e-5)
    assert np.all(np.abs(actual - exact) <= layer_norm_rounding(x, w, None, 1e-5, exact))


@given(seed=st.integers(0, 2**32 - 1), D=st.integers(1, 16), Fw=st.integers(1, 32),
       approximate=st.sampled_from(["none", "tanh"]))
def test_gelu_mlp_matches_gpt2_mlp(seed, D, Fw, approximate):
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    config = GPT2Config(n_embd=D, activation_function="gelu_new" if approximate == "tanh"
                        else "gelu")
    mlp = GPT2MLP(Fw, config).eval()
    with torch.no_grad():  # from the drawn seed, not torch's global generator (reproducible)
        for i, p in enumerate(mlp.parameters()):
            p.copy_(torch.from_numpy(data(seed + 1 + i, tuple(p.shape), 0.5)))
    x = data(seed, (2, 5, D))
    # GPT-2's Conv1D keeps [in, out]: gelu_mlp takes nn.Linear's [out, in], the transpose.
    w = {n: p.detach().numpy() for n, p in mlp.named_parameters()}
    with torch.no_grad():
        expected = mlp.double()(torch.from_numpy(x).double()).numpy()
    got = gelu_mlp(x, w["c_fc.weight"].T, w["c_fc.bias"], w["c_proj.weight"].T,
                   w["c_proj.bias"], approximate)
    # Two products that may cancel, GELU between (slope <= 1.13): the output's error is on the
    # scale of (|x| |W_fc| + |b_fc|) |W_proj| + |b_proj|, at most gamma_{D+1} + gamma_{F+1}
    # (+ GELU's few ulp) of it: D + F + 8 ulps.
    hidden = product_terms(x, w["c_fc.weight"]) + absolute(w["c_fc.bias"])
    terms = hidden @ absolute(w["c_proj.weight"]) + absolute(w["c_proj.bias"])
    assert_within_terms(got, expected, terms, ulps=D + Fw + 8, rtol=1e-5)


@given(seed=st.integers(0, 2**32 - 1), Dh=st.sampled_from([8, 16, 32]),
       factor=st.sampled_from([0.25, 0.5, 1.0]), theta=st.sampled_from([1e4, 1e5]))
def test_partial_rope_matches_stablelm(seed, Dh, factor, theta):
    from transformers.models.stablelm.modeling_stablelm import apply_rotary_pos_emb

    R = int(Dh * factor)
    q, k = data(seed, (1, 2, 7, Dh)), data(seed + 1, (1, 2, 7, Dh))
    positions = np.arange(3, 10)[None]
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(R, theta))  # [1, 7, R]
    # transformers' StableLM splits off the first R coordinates itself, then calls this.
    q_rot, k_rot = apply_rotary_pos_emb(torch.from_numpy(q[..., :R]), torch.from_numpy(k[..., :R]),
                                        torch.from_numpy(cos), torch.from_numpy(sin))
    expected = np.concatenate([q_rot.numpy(), q[..., R:]], axis=-1)
    got = apply_partial_rope(q, cos[:, None], sin[:, None])
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if R < Dh:  # the unrotated coordinates pass through unchanged
        np.testing.assert_array_equal(got[..., R:], q[..., R:])


@given(seed=st.integers(0, 2**32 - 1), P=st.integers(1, 64), D=st.integers(1, 16))
def test_learned_positions_match_embedding(seed, P, D):
    table = data(seed, (P, D))
    positions = np.random.default_rng(seed).integers(0, P, size=(2, 5))
    expected = F.embedding(torch.from_numpy(positions), torch.from_numpy(table)).numpy()
    np.testing.assert_array_equal(learned_positions(table, positions), expected)


def test_learned_positions_refuse_positions_beyond_the_table():
    import pytest
    with pytest.raises(ValueError, match="positions"):
        learned_positions(np.zeros((4, 2), np.float32), np.array([[0, 4]]))
