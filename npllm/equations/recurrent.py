r"""Recurrent cells and backpropagation through time (lectures 001 and 004: RNNs vs transformers).

Before transformers, a sequence was read one token at a time by a recurrent cell: a state
:math:`h_t` of fixed width N is updated from the previous state and the current input,
:math:`h_t = f(x_t, h_{t-1})`. Lecture 004 lists the consequences that attention removes:
T tokens need T *sequential* steps (attention takes them in one pass), and the gradient
reaching token t from the end of the sequence is a product of T - t Jacobians, which shrinks
geometrically: the vanishing gradient of lecture 001, which LSTM and GRU gates were built to
soften. In exchange the state stays N numbers at any T, where a KV cache grows with T.

Shapes: x [B, D] one step's input (D input width), h and c [B, N] (N the state width);
sequences xs [T, B, D]. Weights in torch's layout: W_ih [G*N, D], W_hh [G*N, N],
b_ih and b_hh [G*N], with G = 1 (RNN), 4 (LSTM: gates i, f, g, o) or 3 (GRU: r, z, n).
Float arrays keep their precision (float32 by default, float64 to check gradients tightly).
Tests: ``tests/test_equations_recurrent.py`` against ``torch.nn.RNNCell``, ``LSTMCell``,
``GRUCell``, and torch autograd on ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` for the three BPTT
functions.
"""
import numpy as np

from ._checks import require


def _float(x, name, ndim):
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    require(x.ndim == ndim, f"{name} must have {ndim} axes, got shape {x.shape}")
    return x


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def rnn_cell(x, h, W_ih, W_hh, b_ih, b_hh):
    r"""One step of the Elman RNN (lectures 001, 004; ``torch.nn.RNNCell``, tanh).

    .. math::
        h_t = \tanh\left(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}\right)

    x [B, D], h [B, N], W_ih [N, D], W_hh [N, N], b_ih, b_hh [N] -> h [B, N].
    """
    x, h = _float(x, "x", 2), _float(h, "h", 2)
    return np.tanh(x @ W_ih.T + b_ih + h @ W_hh.T + b_hh)


def lstm_cell(x, h, c, W_ih, W_hh, b_ih, b_hh):
    r"""One step of the long short-term memory cell (lecture 001; ``torch.nn.LSTMCell``).

    .. math::
        \begin{aligned}
        i, f, g, o &= \text{split}_4\left(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}\right)\\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g)\\
        h_t &= \sigma(o) \odot \tanh(c_t)
        \end{aligned}

    x [B, D], h and c [B, N], W_ih [4N, D], W_hh [4N, N], b_ih, b_hh [4N] -> (h, c), each
    [B, N]. The cell state c is updated by a gated sum, not a matrix product: where the forget
    gate :math:`\sigma(f)` is near 1, the gradient flows back through c almost unchanged.
    """
    x, h, c = _float(x, "x", 2), _float(h, "h", 2), _float(c, "c", 2)
    i, f, g, o = np.split(x @ W_ih.T + b_ih + h @ W_hh.T + b_hh, 4, axis=-1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c), c


def gru_cell(x, h, W_ih, W_hh, b_ih, b_hh):
    r"""One step of the gated recurrent unit (lecture 001; ``torch.nn.GRUCell``).

    .. math::
        \begin{aligned}
        r &= \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}),\quad
        z = \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz})\\
        n &= \tanh\left(W_{in} x_t + b_{in} + r \odot (W_{hn} h_{t-1} + b_{hn})\right)\\
        h_t &= (1 - z) \odot n + z \odot h_{t-1}
        \end{aligned}

    x [B, D], h [B, N], W_ih [3N, D], W_hh [3N, N], b_ih, b_hh [3N] -> h [B, N]. The update
    gate z interpolates between the old state and the candidate n.
    """
    x, h = _float(x, "x", 2), _float(h, "h", 2)
    xr, xz, xn = np.split(x @ W_ih.T + b_ih, 3, axis=-1)
    hr, hz, hn = np.split(h @ W_hh.T + b_hh, 3, axis=-1)
    r, z = _sigmoid(xr + hr), _sigmoid(xz + hz)
    n = np.tanh(xn + r * hn)
    return (1.0 - z) * n + z * h


def rnn_forward(xs, h0, W_ih, W_hh, b_ih, b_hh):
    r"""Run the Elman RNN over a sequence, one step after the other (``torch.nn.RNN``).

    .. math::
        h_t = \tanh\left(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh}\right),\quad t = 1 \ldots T

    xs [T, B, D], h0 [B, N] -> hs [T, B, N]. The loop cannot be parallelised over t: step t
    needs :math:`h_{t-1}` (lecture 004: "N-length sequence, N-times matrix multiplication").
    """
    xs, h = _float(xs, "xs", 3), _float(h0, "h0", 2)
    hs = []
    for x in xs:
        h = rnn_cell(x, h, W_ih, W_hh, b_ih, b_hh)
        hs.append(h)
    return np.stack(hs)


def rnn_bptt(xs, h0, hs, dhs, W_ih, W_hh):
    r"""Backpropagation through time for :func:`rnn_forward` (lecture 001: the vanishing gradient).

    With :math:`a_t` the pre-activation and :math:`\delta_t = \partial L / \partial h_t` the
    gradient reaching :math:`h_t` (from the loss at step t and from step t + 1):

    .. math::
        \begin{aligned}
        \delta_t &= \frac{\partial L}{\partial h_t}\Big|_{\text{direct}}
                    + \frac{\partial L}{\partial a_{t+1}} W_{hh},\qquad
        \frac{\partial L}{\partial a_t} = \delta_t \odot (1 - h_t^2)\\
        \frac{\partial L}{\partial W_{ih}} &= \sum_t \Bigl(\frac{\partial L}{\partial a_t}\Bigr)^{\!\top} x_t,\quad
        \frac{\partial L}{\partial W_{hh}} = \sum_t \Bigl(\frac{\partial L}{\partial a_t}\Bigr)^{\!\top} h_{t-1},\quad
        \frac{\partial L}{\partial b} = \sum_t \mathbf{1}^{\top} \frac{\partial L}{\partial a_t}
        \end{aligned}

    Each step back multiplies by :math:`\mathrm{diag}(1 - h_t^2)\, W_{hh}`; with
    :math:`|\tanh'| \le 1` and small :math:`W_{hh}` the product shrinks geometrically with
    the distance.

    xs [T, B, D], h0 [B, N], hs [T, B, N] (from :func:`rnn_forward`), dhs [T, B, N] (the loss's
    direct gradient with respect to each :math:`h_t`), W_ih [N, D], W_hh [N, N] ->
    dict with ``xs`` [T, B, D], ``h0`` [B, N], ``W_ih``, ``W_hh``, ``b_ih``, ``b_hh`` (``b_ih``
    and ``b_hh`` get the same gradient). torch autograd's ``backward`` on ``torch.nn.RNN``.
    """
    xs, hs, dhs = _float(xs, "xs", 3), _float(hs, "hs", 3), _float(dhs, "dhs", 3)
    h0 = _float(h0, "h0", 2)
    require(hs.shape == dhs.shape and hs.shape[0] == xs.shape[0],
            f"hs and dhs must both have shape [T, B, N] with T = {xs.shape[0]}, "
            f"got {hs.shape} and {dhs.shape}")
    dW_ih, dW_hh = np.zeros_like(W_ih, dtype=hs.dtype), np.zeros_like(W_hh, dtype=hs.dtype)
    db = np.zeros(W_hh.shape[0], hs.dtype)
    dxs = np.zeros_like(xs)
    dh_next = np.zeros_like(h0)
    for t in reversed(range(len(xs))):
        h_prev = hs[t - 1] if t > 0 else h0
        da = (dhs[t] + dh_next) * (1.0 - hs[t] ** 2)
        dW_ih += da.T @ xs[t]
        dW_hh += da.T @ h_prev
        db += da.sum(axis=0)
        dxs[t] = da @ W_ih
        dh_next = da @ W_hh
    return {"xs": dxs, "h0": dh_next, "W_ih": dW_ih, "W_hh": dW_hh, "b_ih": db, "b_hh": db.copy()}


def lstm_forward(xs, h0, c0, W_ih, W_hh, b_ih, b_hh):
    r"""Run the LSTM over a sequence, one step after the other (``torch.nn.LSTM``, one layer).

    .. math::
        (h_t, c_t) = \mathrm{LSTMCell}(x_t, h_{t-1}, c_{t-1}),\quad t = 1 \ldots T

    xs [T, B, D], h0 and c0 [B, N] -> (hs, cs), each [T, B, N].
    """
    xs = _float(xs, "xs", 3)
    h, c = _float(h0, "h0", 2), _float(c0, "c0", 2)
    hs, cs = [], []
    for x in xs:
        h, c = lstm_cell(x, h, c, W_ih, W_hh, b_ih, b_hh)
        hs.append(h)
        cs.append(c)
    return np.stack(hs), np.stack(cs)


def lstm_bptt(xs, h0, c0, hs, cs, dhs, W_ih, W_hh, b_ih, b_hh):
    r"""Backpropagation through time for :func:`lstm_forward` (lecture 001: why LSTMs help).

    Each step's gates are recomputed from :math:`x_t` and :math:`h_{t-1}`; with
    :math:`\delta^h_t` and :math:`\delta^c_t` the gradients reaching :math:`h_t` and :math:`c_t`:

    .. math::
        \begin{aligned}
        \delta^c_t &= \delta^h_t \odot \sigma(o_t) \odot (1 - \tanh^2 c_t) + \delta^c_{t+1} \odot \sigma(f_{t+1})\\
        \frac{\partial L}{\partial o_t} &= \delta^h_t \odot \tanh c_t \odot \sigma'(o_t),\quad
        \frac{\partial L}{\partial i_t} = \delta^c_t \odot \tanh g_t \odot \sigma'(i_t),\\
        \frac{\partial L}{\partial f_t} &= \delta^c_t \odot c_{t-1} \odot \sigma'(f_t),\quad
        \frac{\partial L}{\partial g_t} = \delta^c_t \odot \sigma(i_t) \odot (1 - \tanh^2 g_t)
        \end{aligned}

    then the same products with the weights as in :func:`rnn_bptt`. The path through the cell
    state is multiplied only by the forget gate :math:`\sigma(f)` at each step, not by a weight
    matrix: where the gate stays near 1 the gradient crosses many steps intact.

    xs [T, B, D], h0 and c0 [B, N], hs and cs [T, B, N] (from :func:`lstm_forward`), dhs
    [T, B, N] (the loss's direct gradient with respect to each :math:`h_t`), W_ih [4N, D],
    W_hh [4N, N], b_ih, b_hh [4N] -> dict with ``xs``, ``h0``, ``c0``, ``W_ih``, ``W_hh``,
    ``b_ih``, ``b_hh`` (the two biases get the same gradient). torch autograd's ``backward``
    on ``torch.nn.LSTM``.
    """
    xs, hs, cs, dhs = (_float(a, n, 3) for a, n in ((xs, "xs"), (hs, "hs"), (cs, "cs"),
                                                     (dhs, "dhs")))
    h0, c0 = _float(h0, "h0", 2), _float(c0, "c0", 2)
    require(hs.shape == cs.shape == dhs.shape and hs.shape[0] == xs.shape[0],
            f"hs, cs and dhs must have shape [T, B, N] with T = {xs.shape[0]}, "
            f"got {hs.shape}, {cs.shape} and {dhs.shape}")
    dW_ih, dW_hh = np.zeros_like(W_ih, dtype=hs.dtype), np.zeros_like(W_hh, dtype=hs.dtype)
    db = np.zeros(W_hh.shape[0], hs.dtype)
    dxs = np.zeros_like(xs)
    dh_next, dc_next = np.zeros_like(h0), np.zeros_like(c0)
    for t in reversed(range(len(xs))):
        h_prev, c_prev = (hs[t - 1], cs[t - 1]) if t > 0 else (h0, c0)
        i, f, g, o = np.split(xs[t] @ W_ih.T + b_ih + h_prev @ W_hh.T + b_hh, 4, axis=-1)
        i, f, g, o = _sigmoid(i), _sigmoid(f), np.tanh(g), _sigmoid(o)
        tanh_c = np.tanh(cs[t])
        dh = dhs[t] + dh_next
        dc = dh * o * (1.0 - tanh_c ** 2) + dc_next
        da = np.concatenate([dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
                             dc * i * (1.0 - g ** 2), dh * tanh_c * o * (1.0 - o)], axis=-1)
        dW_ih += da.T @ xs[t]
        dW_hh += da.T @ h_prev
        db += da.sum(axis=0)
        dxs[t] = da @ W_ih
        dh_next, dc_next = da @ W_hh, dc * f
    return {"xs": dxs, "h0": dh_next, "c0": dc_next, "W_ih": dW_ih, "W_hh": dW_hh, "b_ih": db,
            "b_hh": db.copy()}


def gru_forward(xs, h0, W_ih, W_hh, b_ih, b_hh):
    r"""Run the GRU over a sequence, one step after the other (``torch.nn.GRU``, one layer).

    .. math::
        h_t = \mathrm{GRUCell}(x_t, h_{t-1}),\quad t = 1 \ldots T

    xs [T, B, D], h0 [B, N] -> hs [T, B, N].
    """
    xs, h = _float(xs, "xs", 3), _float(h0, "h0", 2)
    hs = []
    for x in xs:
        h = gru_cell(x, h, W_ih, W_hh, b_ih, b_hh)
        hs.append(h)
    return np.stack(hs)


def gru_bptt(xs, h0, hs, dhs, W_ih, W_hh, b_ih, b_hh):
    r"""Backpropagation through time for :func:`gru_forward`.

    With :math:`\delta_t` the gradient reaching :math:`h_t` and :math:`a^n_t` the candidate's
    pre-activation:

    .. math::
        \begin{aligned}
        \frac{\partial L}{\partial a^n_t} &= \delta_t \odot (1 - z_t) \odot (1 - n_t^2),\quad
        \frac{\partial L}{\partial z_t} = \delta_t \odot (h_{t-1} - n_t),\quad
        \frac{\partial L}{\partial r_t} = \frac{\partial L}{\partial a^n_t} \odot (W_{hn} h_{t-1} + b_{hn})\\
        \delta_{t-1} &= \delta_t \odot z_t + \Bigl[\tfrac{\partial L}{\partial r_t} \sigma'_r,\
            \tfrac{\partial L}{\partial z_t} \sigma'_z,\ \tfrac{\partial L}{\partial a^n_t} \odot r_t\Bigr] W_{hh}
            + \frac{\partial L}{\partial h_{t-1}}\Big|_{\text{direct}}
        \end{aligned}

    The term :math:`\delta_t \odot z_t` passes the gradient back untouched where the update
    gate keeps the old state (z near 1), as the LSTM's forget gate does.

    xs [T, B, D], h0 [B, N], hs [T, B, N] (from :func:`gru_forward`), dhs [T, B, N], W_ih
    [3N, D], W_hh [3N, N], b_ih, b_hh [3N] -> dict with ``xs``, ``h0``, ``W_ih``, ``W_hh``,
    ``b_ih``, ``b_hh`` (the biases differ in their n part: :math:`b_{hn}` sits inside
    :math:`r \odot (\cdot)`). torch autograd's ``backward`` on ``torch.nn.GRU``.
    """
    xs, hs, dhs = _float(xs, "xs", 3), _float(hs, "hs", 3), _float(dhs, "dhs", 3)
    h0 = _float(h0, "h0", 2)
    require(hs.shape == dhs.shape and hs.shape[0] == xs.shape[0],
            f"hs and dhs must both have shape [T, B, N] with T = {xs.shape[0]}, "
            f"got {hs.shape} and {dhs.shape}")
    grads = {name: np.zeros_like(w, dtype=hs.dtype)
             for name, w in (("W_ih", W_ih), ("W_hh", W_hh), ("b_ih", b_ih), ("b_hh", b_hh))}
    dxs = np.zeros_like(xs)
    dh_next = np.zeros_like(h0)
    for t in reversed(range(len(xs))):
        h_prev = hs[t - 1] if t > 0 else h0
        xr, xz, xn = np.split(xs[t] @ W_ih.T + b_ih, 3, axis=-1)
        hr, hz, hn = np.split(h_prev @ W_hh.T + b_hh, 3, axis=-1)
        r, z = _sigmoid(xr + hr), _sigmoid(xz + hz)
        n = np.tanh(xn + r * hn)
        dh = dhs[t] + dh_next
        dan = dh * (1.0 - z) * (1.0 - n ** 2)
        dar = dan * hn * r * (1.0 - r)
        daz = dh * (h_prev - n) * z * (1.0 - z)
        dX = np.concatenate([dar, daz, dan], axis=-1)        # w.r.t. x W_ih^T + b_ih
        dH = np.concatenate([dar, daz, dan * r], axis=-1)    # w.r.t. h W_hh^T + b_hh
        grads["W_ih"] += dX.T @ xs[t]
        grads["b_ih"] += dX.sum(axis=0)
        grads["W_hh"] += dH.T @ h_prev
        grads["b_hh"] += dH.sum(axis=0)
        dxs[t] = dX @ W_ih
        dh_next = dh * z + dH @ W_hh
    return {"xs": dxs, "h0": dh_next, **grads}
