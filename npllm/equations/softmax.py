"""Softmax, log-softmax and the LM head (lecture 000: P_LM(y = v | c); lectures 002/003: softmax).

The LM head turns the transformer's last contextual vector c into one score (logit) per
vocabulary entry; softmax turns scores into a probability distribution. Both softmax functions
subtract the row maximum first, which changes nothing mathematically (the factor e^{-max} cancels)
but keeps exp from overflowing on large logits.
"""
import numpy as np

from ._checks import as_array, require


def softmax(x, axis=-1):
    r"""Numerically stable softmax (lectures 002, 003; ``torch.softmax``).

    .. math::
        \mathrm{softmax}(x)_v = \frac{e^{x_v - m}}{\sum_{v'} e^{x_{v'} - m}},\qquad m = \max_{v'} x_{v'}

    x [..., V] -> [..., V] (along ``axis``), each row non-negative and summing to 1.
    """
    x = as_array(x, "x", "[..., V]")
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    r"""Numerically stable log-softmax (lectures 000, 002; ``torch.log_softmax``).

    .. math::
        \log \mathrm{softmax}(x)_v = (x_v - m) - \log \sum_{v'} e^{x_{v'} - m},\qquad m = \max_{v'} x_{v'}

    x [..., V] -> [..., V]. Computing it directly (logsumexp) keeps log-probabilities of
    unlikely tokens exact where log(softmax(x)) would give log(0) = -inf.
    """
    x = as_array(x, "x", "[..., V]")
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def lm_head(c, W):
    r"""The language-modelling head: one logit per vocabulary entry (lecture 000; HF ``lm_head``).

    .. math::
        \mathrm{logits}_v = W_v \cdot c,\qquad
        P_{LM}(y = v \mid c) = \mathrm{softmax}(\mathrm{logits})_v
            = \frac{e^{W_v \cdot c}}{\sum_{v' \in V} e^{W_{v'} \cdot c}}

    c [..., D], W [V, D] (Hugging Face layout: one row per token) -> logits [..., V].
    Lecture 000 writes P = W_v . c / sum_v' W_v' . c, without the exponential; that is not a
    distribution (dot products can be negative or sum to zero). The exponential above, i.e.
    ``softmax(lm_head(c, W))``, is what models compute. With tied embeddings W is the embedding
    matrix.
    """
    c = as_array(c, "c", "[..., D]")
    W = as_array(W, "W", "[V, D]")
    require(W.shape[1] == c.shape[-1],
            f"W must have shape [V, D] with D = {c.shape[-1]} to match c, got {W.shape}")
    return c @ W.T
