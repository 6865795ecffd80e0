"""npllm.equations.mlp against F.silu, F.gelu and transformers' LlamaMLP."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from conftest import assert_close
from tolerances import assert_within_terms, product_terms
from npllm.equations import gelu, silu, swiglu, swiglu_mlp

seeds = st.integers(0, 2**32 - 1)
shapes = st.lists(st.integers(1, 8), min_size=0, max_size=3)
scales = st.sampled_from([1e-3, 1.0, 10.0, 100.0])


def randn(seed, shape, scale=1.0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype=np.float32)


@given(seed=seeds, shape=shapes, scale=scales)
def test_silu_matches_torch(seed, shape, scale):
    x = randn(seed, shape, scale)
    # Same formula x / (1 + exp(-x)); exp from two libms: a few ulp.
    assert_close(silu(x), F.silu(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_silu_far_tails():
    x = np.array([-1e4, -100.0, -88.0, 0.0, 88.0, 1e4], np.float32)
    assert_close(silu(x), F.silu(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-30)


@given(seed=seeds, shape=shapes, scale=scales, approximate=st.sampled_from(["none", "tanh"]))
def test_gelu_matches_torch(seed, shape, scale, approximate):
    x = randn(seed, shape, scale)
    expected = F.gelu(torch.from_numpy(x), approximate=approximate).numpy()
    # "none": our erfc is a Chebyshev fit with relative error < 1.2e-7, evaluated in float32
    # (about ten roundings), so a few 1e-6 relative; absolute 1e-6 where GELU is ~0.
    if approximate == "none":
        assert_close(gelu(x, approximate), expected, rtol=1e-5, atol=1e-6)
    else:
        # 0.5 x (1 + tanh(.)) cancels for x in [-5, -2] (tanh near -1): the two libms' tanh,
        # 1-2 ulp apart near -1, leave errors of ulps of the terms 0.5 |x| (1 + |tanh|), not
        # of the result: at most 0.5 beyond the rtol on 2 million points of [-12, 12]; 4 allowed.
        x64 = x.astype(np.float64)
        tanh = np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3))
        assert_within_terms(gelu(x, approximate), expected, 0.5 * np.abs(x64) * (1 + np.abs(tanh)),
                            ulps=4, rtol=1e-5)


@given(seed=seeds, shape=shapes.map(lambda s: (*s, 5)), scale=scales)
def test_swiglu_matches_silu_times_up(seed, shape, scale):
    gate, up = randn(seed, shape, scale), randn(seed + 1, shape)
    expected = F.silu(torch.from_numpy(gate)) * torch.from_numpy(up)
    # Products only (SiLU is x / (1 + e^-x): nothing cancels): relative errors.
    assert_close(swiglu(gate, up), expected.numpy(), rtol=1e-5, atol=1e-6)


@given(seed=seeds, lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), D=st.integers(1, 32),
       F_=st.integers(1, 48))
@example(seed=123, lead=[3, 4], D=32, F_=32)
def test_swiglu_mlp_matches_llama_mlp(seed, lead, D, F_):
    config = LlamaConfig(hidden_size=D, intermediate_size=F_, hidden_act="silu",
                         num_attention_heads=1, head_dim=2)  # attention is unused here
    mlp = LlamaMLP(config)
    w_gate, w_up, w_down = randn(seed, (F_, D)), randn(seed + 1, (F_, D)), randn(seed + 2, (D, F_))
    with torch.no_grad():
        for linear, w in ((mlp.gate_proj, w_gate), (mlp.up_proj, w_up), (mlp.down_proj, w_down)):
            linear.weight.copy_(torch.from_numpy(w))
        x = randn(seed + 3, (*lead, D))
        expected = mlp(torch.from_numpy(x)).numpy()
    # Three matmuls with reductions over D <= 32 and F <= 48, summed in other orders by torch:
    # each output's rounding is relative to the size of its terms, sum_f |act_f W_df| with
    # |act_f| <= |x W_gate^T|_f |x W_up^T|_f (terms' sizes), not to the output, which may cancel
    # (the dev profile found -0.2421 from terms of ~300, off by 1.1e-4). 16 ulp of the terms.
    terms = (product_terms(x, w_gate.T) * product_terms(x, w_up.T)) @ np.abs(w_down).T
    assert_within_terms(swiglu_mlp(x, w_gate, w_up, w_down), expected, terms, ulps=16, rtol=1e-5)


def test_mlp_errors_name_the_argument():
    with pytest.raises(ValueError, match="gate and up must have the same shape"):
        swiglu(np.ones(3, np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"w_down must have shape \[D, F\] = \(4, 6\)"):
        swiglu_mlp(np.ones((2, 4)), np.ones((6, 4)), np.ones((6, 4)), np.ones((6, 4)))
    with pytest.raises(ValueError, match=r"w_gate and w_up must have shape \[F, D\] with D = 4"):
        swiglu_mlp(np.ones((2, 4)), np.ones((6, 5)), np.ones((6, 5)), np.ones((4, 6)))
    with pytest.raises(ValueError, match='approximate must be "none" or "tanh"'):
        gelu(np.ones(2), approximate="fast")
