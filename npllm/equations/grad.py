r"""The backward pass of every forward equation (lectures 000 and 004: learning by maximum likelihood).

Training lowers the mean cross-entropy :math:`\mathcal{L}` by moving each weight against its
gradient :math:`\partial\mathcal{L}/\partial W`. The chain rule gives that gradient one equation
at a time, in the reverse order of the forward pass: each function here takes the gradient of
the loss with respect to an equation's *output* (written ``d_y`` for :math:`\bar y =
\partial\mathcal{L}/\partial y`, the same shape as y) and returns the gradients with respect to
its inputs, using what the forward pass computed (as llm.c's ``*_backward`` functions do).

Shapes use the letters of the package docstring; N is the number of target tokens. Every
function is tested against torch autograd in ``tests/test_equations_grad.py``, each with a wrong
variant (a dropped term, a wrong transpose) that the test rejects.
"""
import numpy as np

from ._checks import as_array, require
from .attention import repeat_kv
from .position import apply_rope
from .softmax import softmax


def cross_entropy_backward(logits, targets):
    r"""Gradient of the mean cross-entropy with respect to the logits (lecture 000; ``F.cross_entropy``).

    .. math::
        \mathcal{L} = -\frac{1}{N}\sum_{i} \log\mathrm{softmax}(z_i)_{s_i}
        \quad\Longrightarrow\quad
        \frac{\partial\mathcal{L}}{\partial z_{i,v}} = \frac{1}{N}\left(\mathrm{softmax}(z_i)_v - [v = s_i]\right)

    logits z [..., T, V], targets int [..., T] -> [..., T, V]. Raising the true token's logit by
    one lowers the loss by 1 - P(true token): a confident right answer learns little, a wrong one
    a lot; every other token's logit is pushed down in proportion to its probability.
    """
    logits = as_array(logits, "logits", "[..., T, V]")
    targets = np.asarray(targets)
    require(targets.shape == logits.shape[:-1],
            f"targets must have shape [..., T] = {logits.shape[:-1]} to match logits, got {targets.shape}")
    d_logits = softmax(logits)
    np.put_along_axis(d_logits, targets[..., None],
                      np.take_along_axis(d_logits, targets[..., None], axis=-1) - 1, axis=-1)
    return d_logits / np.float32(targets.size)


def lm_head_backward(d_logits, c, W):
    r"""Gradients of the LM head :math:`z = c W^\top` (lecture 000; HF ``lm_head``).

    .. math::
        \bar c = \bar z\, W,\qquad \bar W = \bar z^\top c \;\;(\text{summed over every position})

    d_logits [..., V], c [..., D], W [V, D] -> (d_c [..., D], d_W [V, D]). With tied embeddings
    d_W is added to the embedding matrix's gradient.
    """
    return linear_backward(d_logits, c, W)


def linear_backward(d_y, x, W):
    r"""Gradients of a linear layer without bias, :math:`y = x W^\top` (HF ``nn.Linear``).

    .. math::
        \bar x = \bar y\, W,\qquad \bar W = \sum_{t} \bar y_t^\top x_t = \bar Y^\top X

    d_y [..., out], x [..., in], W [out, in] -> (d_x [..., in], d_W [out, in]). The positions
    (every leading axis) are flattened so that each gradient is one matrix product.
    """
    d_y = as_array(d_y, "d_y", "[..., out]")
    x = as_array(x, "x", "[..., in]")
    W = as_array(W, "W", "[out, in]")
    require(d_y.shape[-1] == W.shape[0] and x.shape[-1] == W.shape[1] and d_y.shape[:-1] == x.shape[:-1],
            f"d_y [..., out], x [..., in] and W [out, in] disagree: {d_y.shape}, {x.shape}, {W.shape}")
    d_y2, x2 = d_y.reshape(-1, W.shape[0]), x.reshape(-1, W.shape[1])
    return (d_y2 @ W).reshape(x.shape), d_y2.T @ x2


def embedding_backward(d_x, ids, V, padding_idx=None):
    r"""Gradient of the embedding lookup :math:`x_t = E_{s_t}` (lecture 004; HF ``nn.Embedding``).

    .. math::
        \bar E_v = \sum_{t\,:\,s_t = v} \bar x_t

    d_x [..., D], ids int [...], V -> d_E [V, D]. A token's row collects the gradient of every
    position where it occurs; rows of tokens absent from the batch get zero. ``padding_idx``:
    a row that gets no gradient, as ``nn.Embedding(..., padding_idx)`` (transformers' Llama
    passes ``config.pad_token_id``), so the padding token's vector is never trained.
    """
    d_x = as_array(d_x, "d_x", "[..., D]")
    ids = np.asarray(ids)
    require(ids.shape == d_x.shape[:-1], f"ids must have shape {d_x.shape[:-1]}, got {ids.shape}")
    d_E = np.zeros((V, d_x.shape[-1]), np.float32)
    np.add.at(d_E, ids.reshape(-1), d_x.reshape(-1, d_x.shape[-1]))
    if padding_idx is not None:
        d_E[padding_idx] = 0
    return d_E


def residual_backward(d_out):
    r"""Gradient through the residual stream :math:`x_{out} = x + f(x)` (lecture 003's "+ residual").

    .. math::
        \bar x \mathrel{+}= \bar x_{out},\qquad \bar f = \bar x_{out}

    d_out [B, T, D] -> (d_x, d_f), both d_out itself: the sum passes its gradient unchanged to
    both branches. The copy that goes straight to x is why deep residual stacks train: every
    layer receives the loss's gradient without going through the layers above it.
    """
    return d_out, d_out


def rms_norm_backward(d_y, x, weight, eps):
    r"""Gradients of RMSNorm (lecture 003; HF ``LlamaRMSNorm``).

    .. math::
        r = \Bigl(\tfrac{1}{D}\textstyle\sum_d x_d^2 + \epsilon\Bigr)^{-1/2},\quad \hat x = r x,\quad y = \hat x \odot w

        \bar w = \sum_{t} \bar y_t \odot \hat x_t,\qquad
        \bar x = r\left(\bar{\hat x} - \hat x\,\tfrac{1}{D}\textstyle\sum_d \bar{\hat x}_d \hat x_d\right),
        \quad \bar{\hat x} = \bar y \odot w

    d_y, x [..., D], weight [D] -> (d_x [..., D], d_w [D]). The second term of d_x is the path
    through r: making x longer makes r smaller, so only the part of the gradient orthogonal to
    x̂ changes y.
    """
    d_y = as_array(d_y, "d_y", "[..., D]")
    x = as_array(x, "x", "[..., D]")
    weight = as_array(weight, "weight", "[D]")
    require(d_y.shape == x.shape and weight.shape == x.shape[-1:],
            f"d_y and x [..., D] and weight [D] disagree: {d_y.shape}, {x.shape}, {weight.shape}")
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    x_hat = x * r
    d_w = (d_y * x_hat).reshape(-1, x.shape[-1]).sum(axis=0)
    d_x_hat = d_y * weight
    d_x = r * (d_x_hat - x_hat * np.mean(d_x_hat * x_hat, axis=-1, keepdims=True))
    return d_x, d_w


def apply_rope_backward(d_y, cos, sin):
    r"""Gradient of RoPE, Hugging Face layout (lecture 003; HF ``apply_rotary_pos_emb``).

    .. math::
        y = R_\phi\, x \quad\Longrightarrow\quad \bar x = R_\phi^\top \bar y = R_{-\phi}\,\bar y
        = \bar y \odot \cos - \mathrm{rotate\_half}(\bar y \odot \sin)

    d_y [..., T, Dh], cos, sin [..., T, Dh] from ``rope_cos_sin`` -> d_x [..., T, Dh]. A
    rotation's transpose is the rotation by the opposite angle, so the gradient is RoPE with
    ``-sin``.
    """
    return apply_rope(d_y, cos, -np.asarray(sin))


def silu_backward(d_y, x):
    r"""Gradient of SiLU (lecture 003; ``torch.nn.functional.silu``).

    .. math::
        \frac{d}{dx}\, x\,\sigma(x) = \sigma(x)\bigl(1 + x\,(1 - \sigma(x))\bigr)

    d_y, x [...] -> d_x [...], elementwise.
    """
    d_y = as_array(d_y, "d_y", "[...]")
    x = as_array(x, "x", "[...]")
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88: sigma = 0, the right limit
        sigma = 1.0 / (1.0 + np.exp(-x))
    return d_y * sigma * (1.0 + x * (1.0 - sigma))


def swiglu_backward(d_y, gate, up):
    r"""Gradients of the SwiGLU gate :math:`y = \mathrm{SiLU}(g) \odot u` (lecture 003; HF ``LlamaMLP``).

    .. math::
        \bar g = \bar y \odot u \odot \mathrm{SiLU}'(g),\qquad \bar u = \bar y \odot \mathrm{SiLU}(g)

    d_y, gate, up [..., F] -> (d_gate, d_up) [..., F].
    """
    d_y = as_array(d_y, "d_y", "[..., F]")
    gate = as_array(gate, "gate", "[..., F]")
    up = as_array(up, "up", "[..., F]")
    require(d_y.shape == gate.shape == up.shape,
            f"d_y, gate and up must have the same shape, got {d_y.shape}, {gate.shape}, {up.shape}")
    with np.errstate(over="ignore"):
        sigma = 1.0 / (1.0 + np.exp(-gate))
    return d_y * up * sigma * (1.0 + gate * (1.0 - sigma)), d_y * gate * sigma


def softmax_backward(d_p, p):
    r"""Gradient of softmax through its output p (lectures 002, 004; ``torch.softmax``).

    .. math::
        \bar s_j = p_j\Bigl(\bar p_j - \sum_{k} \bar p_k\, p_k\Bigr)

    d_p, p [..., S] -> d_s [..., S]. The Jacobian :math:`\mathrm{diag}(p) - p p^\top` applied to
    d_p without forming it. Masked positions have p = 0, so they get no gradient.
    """
    d_p = as_array(d_p, "d_p", "[..., S]")
    p = as_array(p, "p", "[..., S]")
    return p * (d_p - np.sum(d_p * p, axis=-1, keepdims=True))


def attention_backward(d_out, q, k, v, A):
    r"""Gradients of scaled dot-product attention (lectures 002, 004; ``F.scaled_dot_product_attention``).

    .. math::
        O = A V,\quad A = \mathrm{softmax}(S),\quad S = \frac{Q K^\top}{\sqrt{D_h}} + M

        \bar V = A^\top \bar O,\quad \bar A = \bar O V^\top,\quad
        \bar S = \mathrm{softmax\_backward}(\bar A, A),\quad
        \bar Q = \frac{\bar S K}{\sqrt{D_h}},\quad \bar K = \frac{\bar S^\top Q}{\sqrt{D_h}}

    d_out, q [..., T, Dh], k, v [..., S, Dh], A [..., T, S] (the attention weights of the forward
    pass, ``attention_pattern(q, k, mask)``) -> (d_q, d_k, d_v). The mask M is a constant: it
    has no gradient, and its zeros in A stop the gradient reaching future keys.
    """
    d_out = as_array(d_out, "d_out", "[..., T, Dh]")
    q = as_array(q, "q", "[..., T, Dh]")
    k = as_array(k, "k", "[..., S, Dh]")
    v = as_array(v, "v", "[..., S, Dh]")
    A = as_array(A, "A", "[..., T, S]")
    scale = np.float32(q.shape[-1] ** -0.5)
    d_v = np.swapaxes(A, -1, -2) @ d_out
    d_scores = softmax_backward(d_out @ np.swapaxes(v, -1, -2), A) * scale
    return d_scores @ k, np.swapaxes(d_scores, -1, -2) @ q, d_v


def repeat_kv_backward(d_x, n_rep):
    r"""Gradient of ``repeat_kv`` (lecture 002; HF ``repeat_kv``).

    .. math::
        \bar K_g = \sum_{h\,:\,\lfloor h / n_{rep} \rfloor = g} \bar{\tilde K}_h

    d_x [..., K * n_rep, S, Dh] -> [..., K, S, Dh]: a key/value head shared by n_rep query heads
    collects the gradient from each of them.
    """
    d_x = as_array(d_x, "d_x", "[..., H, S, Dh]")
    if n_rep == 1:
        return d_x
    *lead, H, S, Dh = d_x.shape
    return d_x.reshape(*lead, H // n_rep, n_rep, S, Dh).sum(axis=-3)


def grouped_query_attention_backward(d_out, q, k, v, A):
    r"""Gradients of grouped-query attention (lecture 002; HF ``LlamaAttention``).

    .. math::
        O_h = A_h V_{g(h)} \quad\Longrightarrow\quad
        \bar K_g = \sum_{h: g(h) = g} \frac{\bar S_h^\top Q_h}{\sqrt{D_h}},\quad
        \bar V_g = \sum_{h: g(h) = g} A_h^\top \bar O_h

    d_out, q [..., H, T, Dh], k, v [..., K, S, Dh], A [..., H, T, S] (the forward pass's
    attention weights) -> (d_q [..., H, T, Dh], d_k, d_v [..., K, S, Dh]).
    """
    q = as_array(q, "q", "[..., H, T, Dh]")
    k = as_array(k, "k", "[..., K, S, Dh]")
    H, K = q.shape[-3], k.shape[-3]
    require(H % K == 0, f"the query heads H must be a multiple of the key/value heads K, got H={H}, K={K}")
    d_q, d_k, d_v = attention_backward(d_out, q, repeat_kv(k, H // K), repeat_kv(v, H // K), A)
    return d_q, repeat_kv_backward(d_k, H // K), repeat_kv_backward(d_v, H // K)
