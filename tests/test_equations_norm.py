"""npllm.equations.norm against torch: RMSNorm vs transformers' LlamaRMSNorm and torch.nn.RMSNorm,
LayerNorm vs torch.nn.functional.layer_norm."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from conftest import assert_close
from tolerances import layer_norm_rounding
from npllm.equations import layer_norm, rms_norm

leading = st.lists(st.integers(1, 4), min_size=0, max_size=2)
widths = st.integers(1, 64)
# Scales from tiny (mean(x^2) ~ eps, where the position of eps matters) to large.
scales = st.sampled_from([1e-4, 1e-3, 1e-2, 1.0, 1e2, 1e4])
epsilons = st.sampled_from([1e-5, 1e-6, 1e-8])


def data(seed, shape, scale):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def llama_rms_norm(x, w, eps):
    module = LlamaRMSNorm(w.shape[0], eps=eps)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(w))
        return module(torch.from_numpy(x)).numpy()


# float32, one reduction over D <= 64 then elementwise ops: a few ulp apart (summation order).
RMS_TOL = dict(rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**32 - 1), lead=leading, D=widths, scale=scales, eps=epsilons)
@example(seed=0, lead=[3], D=16, scale=1e-3, eps=1e-5)  # mean(x^2) ~ eps: catches eps misplaced
def test_rms_norm_matches_llama_rms_norm(seed, lead, D, scale, eps):
    x = data(seed, (*lead, D), scale)
    w = data(seed + 1, (D,), 1.0)
    assert_close(rms_norm(x, w, eps), llama_rms_norm(x, w, eps), **RMS_TOL)


@given(seed=st.integers(0, 2**32 - 1), lead=leading, D=widths, scale=scales, eps=epsilons)
def test_rms_norm_matches_torch_rms_norm(seed, lead, D, scale, eps):
    x = data(seed, (*lead, D), scale)
    w = data(seed + 1, (D,), 1.0)
    expected = F.rms_norm(torch.from_numpy(x), (D,), torch.from_numpy(w), eps=eps).numpy()
    assert_close(rms_norm(x, w, eps), expected, **RMS_TOL)


def test_rms_norm_keeps_float32():
    assert rms_norm(np.ones((2, 4), np.float32), np.ones(4, np.float32), np.float64(1e-5)).dtype == np.float32


def test_eps_outside_the_square_root_does_not_match():
    """Negative control: the test above can tell where eps goes."""
    x = data(0, (3, 16), 1e-3)
    w = data(1, (16,), 1.0)
    eps = 1e-5
    wrong = x / (np.sqrt(np.mean(x * x, axis=-1, keepdims=True)) + eps) * w
    with pytest.raises(AssertionError):
        assert_close(wrong, llama_rms_norm(x, w, eps), **RMS_TOL)


@given(seed=st.integers(0, 2**32 - 1), lead=leading, D=st.integers(2, 64), scale=scales, eps=epsilons)
@example(seed=12954802, lead=[3, 4], D=38, scale=100.0, eps=1e-5)  # found by the dev profile
def test_layer_norm_matches_torch(seed, lead, D, scale, eps):
    x = data(seed, (*lead, D), scale) + np.float32(3 * scale)  # an offset for the mean to remove
    w, b = data(seed + 1, (D,), 1.0), data(seed + 2, (D,), 1.0)
    x64, w64, b64 = (torch.from_numpy(a).double() for a in (x, w, b))
    exact = F.layer_norm(x64, (D,), w64, b64, eps).numpy()
    actual = layer_norm(x, w, b, eps)
    assert actual.dtype == np.float32
    assert np.all(np.abs(actual - exact) <= layer_norm_rounding(x, w, b, eps, exact))


def test_layer_norm_bound_rejects_the_unbiased_variance():
    """Negative control: the bound above tells the biased variance (D) from the unbiased (D - 1)."""
    x = data(0, (3, 38), 100.0) + np.float32(300.0)
    w, b = data(1, (38,), 1.0), data(2, (38,), 1.0)
    exact = F.layer_norm(torch.from_numpy(x).double(), (38,), torch.from_numpy(w).double(),
                         torch.from_numpy(b).double(), 1e-5).numpy()
    centred = x - x.mean(axis=-1, keepdims=True)
    wrong = centred / np.sqrt(centred.var(axis=-1, ddof=1, keepdims=True) + 1e-5) * w + b
    assert np.all(np.abs(layer_norm(x, w, b, 1e-5) - exact) <= layer_norm_rounding(x, w, b, 1e-5, exact))
    assert not np.all(np.abs(wrong - exact) <= layer_norm_rounding(x, w, b, 1e-5, exact))


def test_norm_errors_name_the_argument():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \[D\] = \(4,\)"):
        rms_norm(x, np.ones(3, np.float32), 1e-5)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., D\]"):
        rms_norm(np.float32(1.0), np.ones(1, np.float32), 1e-5)
    with pytest.raises(ValueError, match="weight and bias must have shape"):
        layer_norm(x, np.ones(4, np.float32), np.ones(5, np.float32), 1e-5)
