"""npllm.equations.recurrent against torch.nn.RNNCell, LSTMCell, GRUCell, nn.RNN and autograd.

Cells are compared in float64 (npllm keeps float64 inputs in float64) and in float32 against
the float64 reference; BPTT gradients in float64 against torch autograd on nn.RNN.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import assert_close
from tolerances import absolute, assert_within_terms, product_terms
from npllm.equations.recurrent import (gru_bptt, gru_cell, gru_forward, lstm_bptt, lstm_cell,
                                       lstm_forward, rnn_bptt, rnn_cell, rnn_forward)

seeds = st.integers(0, 2**32 - 1)
sizes = st.integers(1, 7)
CELLS = {"rnn": (torch.nn.RNNCell, rnn_cell), "lstm": (torch.nn.LSTMCell, lstm_cell),
         "gru": (torch.nn.GRUCell, gru_cell)}
# float64 on both sides: the same few products and sums, a few ulp apart.
F64 = dict(rtol=1e-10, atol=1e-12)
# float32 against float64: see cell_terms (a gate's pre-activation may cancel).


def torch_cell(kind, seed, D, N):
    torch.manual_seed(seed % 2**31)
    return CELLS[kind][0](D, N).double()


def params(cell):
    return [p.detach().numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)]


@pytest.mark.parametrize("kind", sorted(CELLS))
@given(seed=seeds, B=st.integers(1, 4), D=sizes, N=sizes, scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_cells_match_torch(kind, seed, B, D, N, scale):
    cell = torch_cell(kind, seed, D, N)
    rng = np.random.default_rng(seed)
    x, h, c = (rng.standard_normal(s) * scale for s in ((B, D), (B, N), (B, N)))
    with torch.no_grad():
        if kind == "lstm":
            expected = [t.numpy() for t in cell(torch.from_numpy(x), (torch.from_numpy(h),
                                                                      torch.from_numpy(c)))]
        else:
            expected = [cell(torch.from_numpy(x), torch.from_numpy(h)).numpy()]
    ours = CELLS[kind][1]
    args = (x, h, c) if kind == "lstm" else (x, h)
    for dtype in (np.float64, np.float32):
        out = ours(*(a.astype(dtype) for a in args), *(p.astype(dtype) for p in params(cell)))
        out = list(out) if kind == "lstm" else [out]
        for a, e, terms in zip(out, expected, cell_terms(kind, x, h, c, *params(cell))):
            assert a.dtype == dtype
            if dtype == np.float64:
                assert_close(a, e, **F64)
            else:  # the gates' sums may cancel: within gamma_{D+N+2} (+ a few ulp) of terms
                assert_within_terms(a, e, terms, ulps=D + N + 8, rtol=1e-5)


def cell_terms(kind, x, h, c, W_ih, W_hh, b_ih, b_hh):
    """The size of the float32 rounding of each output of a cell: each gate's pre-activation is
    a sum whose error is relative to its terms A = |x| |W_ih|^T + |b_ih| + |h| |W_hh|^T + |b_hh|
    (the inputs' own rounding included), not to the sum, which may cancel; the nonlinearities'
    slopes are at most 1 and the gates at most 1 in size, so each output's error is on the
    scale of the terms of the gates it depends on, weighted by what they multiply."""
    A_x = product_terms(x, W_ih.T) + absolute(b_ih)
    A_h = product_terms(h, W_hh.T) + absolute(b_hh)
    if kind == "rnn":
        return [1 + A_x + A_h]
    if kind == "lstm":
        i, f, g, o = np.split(A_x + A_h, 4, axis=-1)
        c_terms = 1 + f * np.abs(c) + np.abs(c) + i + g
        return [o + 1 + c_terms, c_terms]
    (x_r, x_z, x_n), (h_r, h_z, h_n) = np.split(A_x, 3, axis=-1), np.split(A_h, 3, axis=-1)
    n_terms = 1 + x_n + h_n + (x_r + h_r) * h_n
    return [(x_z + h_z) * (1 + np.abs(h)) + n_terms + np.abs(h)]


def test_lstm_gate_order_matters():
    """Negative control: torch's gate order is i, f, g, o; reading i and f swapped differs."""
    cell = torch_cell("lstm", 0, 3, 4)
    W_ih, W_hh, b_ih, b_hh = params(cell)
    swap = np.r_[4:8, 0:4, 8:16]
    x, h, c = np.ones((1, 3)), np.full((1, 4), 0.5), np.full((1, 4), -1.0)
    right = lstm_cell(x, h, c, W_ih, W_hh, b_ih, b_hh)[1]
    wrong = lstm_cell(x, h, c, W_ih[swap], W_hh[swap], b_ih[swap], b_hh[swap])[1]
    with torch.no_grad():
        expected = cell(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c)))[1].numpy()
    assert_close(right, expected, **F64)
    assert not np.allclose(wrong, expected, rtol=1e-3)


def autograd_rnn(seed, T, B, D, N, scale):
    """torch.nn.RNN on random inputs, loss = sum_t <G_t, h_t>: the gradients npllm must match."""
    torch.manual_seed(seed % 2**31)
    rnn = torch.nn.RNN(D, N).double()
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(scale)
    rng = np.random.default_rng(seed)
    xs = torch.tensor(rng.standard_normal((T, B, D)), requires_grad=True)
    h0 = torch.tensor(rng.standard_normal((1, B, N)), requires_grad=True)
    G = rng.standard_normal((T, B, N))
    hs, _ = rnn(xs, h0)
    (hs * torch.from_numpy(G)).sum().backward()
    weights = [getattr(rnn, f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    grads = {"xs": xs.grad, "h0": h0.grad[0], "W_ih": weights[0].grad, "W_hh": weights[1].grad,
             "b_ih": weights[2].grad, "b_hh": weights[3].grad}
    return (xs.detach().numpy(), h0.detach().numpy()[0], G, [w.detach().numpy() for w in weights],
            hs.detach().numpy(), {k: v.numpy() for k, v in grads.items()})


@given(seed=seeds, T=st.integers(1, 12), B=st.integers(1, 3), D=sizes, N=sizes,
       scale=st.sampled_from([0.5, 1.0, 3.0]))
def test_bptt_gradients_equal_torch_autograd(seed, T, B, D, N, scale):
    xs, h0, G, (W_ih, W_hh, b_ih, b_hh), torch_hs, expected = autograd_rnn(seed, T, B, D, N, scale)
    hs = rnn_forward(xs, h0, W_ih, W_hh, b_ih, b_hh)
    assert_close(hs, torch_hs, **F64)
    grads = rnn_bptt(xs, h0, hs, G, W_ih, W_hh)
    assert grads.keys() == expected.keys()
    for name in expected:
        # float64, T <= 12 steps of products: errors stay near 1e-15 relative.
        assert_close(grads[name], expected[name], rtol=1e-9, atol=1e-11, err_msg=name)


def test_bptt_without_the_recurrent_path_fails():
    """Negative control: dropping the gradient carried back through W_hh (truncating BPTT to
    one step) gives other weight gradients than autograd."""
    xs, h0, G, (W_ih, W_hh, b_ih, b_hh), _, expected = autograd_rnn(1, 6, 2, 3, 4, 1.0)
    hs = rnn_forward(xs, h0, W_ih, W_hh, b_ih, b_hh)
    truncated = {"W_hh": sum(((G[t] * (1 - hs[t] ** 2)).T @ (hs[t - 1] if t else h0))
                             for t in range(len(xs)))}
    assert_close(rnn_bptt(xs, h0, hs, G, W_ih, W_hh)["W_hh"], expected["W_hh"], **F64)
    assert not np.allclose(truncated["W_hh"], expected["W_hh"], rtol=1e-3)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="x must have 2 axes"):
        rnn_cell(np.ones(3), np.ones((1, 2)), np.ones((2, 3)), np.ones((2, 2)), 0, 0)


@given(seed=seeds, T=st.integers(1, 10), B=st.integers(1, 3), D=sizes, N=sizes,
       scale=st.sampled_from([0.5, 1.0, 3.0]))
def test_lstm_bptt_gradients_equal_torch_autograd(seed, T, B, D, N, scale):
    torch.manual_seed(seed % 2**31)
    lstm = torch.nn.LSTM(D, N).double()
    rng = np.random.default_rng(seed)
    xs = torch.tensor(rng.standard_normal((T, B, D)) * scale, requires_grad=True)
    h0 = torch.tensor(rng.standard_normal((1, B, N)), requires_grad=True)
    c0 = torch.tensor(rng.standard_normal((1, B, N)), requires_grad=True)
    G = rng.standard_normal((T, B, N))
    torch_hs, _ = lstm(xs, (h0, c0))
    (torch_hs * torch.from_numpy(G)).sum().backward()
    weights = [getattr(lstm, f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    W = [w.detach().numpy() for w in weights]
    x, h, c = xs.detach().numpy(), h0.detach().numpy()[0], c0.detach().numpy()[0]
    hs, cs = lstm_forward(x, h, c, *W)
    assert_close(hs, torch_hs.detach().numpy(), **F64)
    grads = lstm_bptt(x, h, c, hs, cs, G, *W)
    expected = {"xs": xs.grad, "h0": h0.grad[0], "c0": c0.grad[0], "W_ih": weights[0].grad,
                "W_hh": weights[1].grad, "b_ih": weights[2].grad, "b_hh": weights[3].grad}
    assert grads.keys() == expected.keys()
    for name, e in expected.items():
        # float64, T <= 10 steps: errors stay near 1e-15 relative.
        assert_close(grads[name], e.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)


@given(seed=seeds, T=st.integers(1, 10), B=st.integers(1, 3), D=sizes, N=sizes,
       scale=st.sampled_from([0.5, 1.0, 3.0]))
def test_gru_bptt_gradients_equal_torch_autograd(seed, T, B, D, N, scale):
    torch.manual_seed(seed % 2**31)
    gru = torch.nn.GRU(D, N).double()
    rng = np.random.default_rng(seed)
    xs = torch.tensor(rng.standard_normal((T, B, D)) * scale, requires_grad=True)
    h0 = torch.tensor(rng.standard_normal((1, B, N)), requires_grad=True)
    G = rng.standard_normal((T, B, N))
    torch_hs, _ = gru(xs, h0)
    (torch_hs * torch.from_numpy(G)).sum().backward()
    weights = [getattr(gru, f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    W = [w.detach().numpy() for w in weights]
    x, h = xs.detach().numpy(), h0.detach().numpy()[0]
    hs = gru_forward(x, h, *W)
    assert_close(hs, torch_hs.detach().numpy(), **F64)
    grads = gru_bptt(x, h, hs, G, *W)
    expected = {"xs": xs.grad, "h0": h0.grad[0], "W_ih": weights[0].grad,
                "W_hh": weights[1].grad, "b_ih": weights[2].grad, "b_hh": weights[3].grad}
    assert grads.keys() == expected.keys()
    for name, e in expected.items():
        # float64, T <= 10 steps: errors stay near 1e-15 relative.
        assert_close(grads[name], e.numpy(), rtol=1e-9, atol=1e-11, err_msg=name)
