"""A language model as a product of conditionals (lecture 000; perplexity and bits per byte: lecture 001).

A decoder-only model gives the probability of a sequence as the product of next-token
probabilities, P(s) = prod_i P(s_i | s_<i). In log space the product becomes a sum, which is how
it is computed (a product of thousands of numbers below 1 underflows float32). Training maximises
this likelihood, which is the same as minimising the cross-entropy.
"""
import numpy as np

from ._checks import as_array, require
from .softmax import lm_head, log_softmax


def token_log_probs(logits, targets):
    r"""Log-probability of each target token given its prefix (lecture 000).

    .. math::
        \log P(s_i \mid s_{<i}) = \log\mathrm{softmax}(\mathrm{logits}_i)_{s_i}

    logits [..., T, V], targets int [..., T] -> [..., T]. Row t of logits must be the prediction
    for targets[t]: the caller shifts (logits of positions 0..T-2 predict tokens 1..T-1).
    """
    logits = as_array(logits, "logits", "[..., T, V]")
    targets = as_array(targets, "targets", "[..., T]", dtype=np.int64)
    require(targets.shape == logits.shape[:-1],
            f"targets must have shape [..., T] = {logits.shape[:-1]} to match logits, got {targets.shape}")
    require(targets.size == 0 or (targets.min() >= 0 and targets.max() < logits.shape[-1]),
            f"targets must be token ids in [0, V) = [0, {logits.shape[-1]})")
    return np.take_along_axis(log_softmax(logits), targets[..., None], axis=-1)[..., 0]



def lm_head_log_probs(c, W, targets):
    r"""log P(targets | c): the LM head, then the log-softmax read at the targets (lecture 000).

    .. math::
        \log P(y_t \mid c_t) = \log\mathrm{softmax}(W c_t)_{y_t}

    c [..., T, D], W [V, D], targets int [..., T] -> [..., T]: :func:`token_log_probs` of
    :func:`~npllm.equations.lm_head`. Its Numba twin (:func:`npllm.kernels.lm_head_log_probs`)
    gives the same numbers without ever holding the [..., T, V] logits.
    """
    return token_log_probs(lm_head(c, W), targets)

def sequence_log_prob(logits, targets):
    r"""Log-probability of a whole sequence, the chain rule in log space (lecture 000).

    .. math::
        \log P(s) = \sum_{i} \log P(s_i \mid s_{<i})

    logits [..., T, V], targets int [..., T] -> [...]. Equals
    ``-F.cross_entropy(logits, targets, reduction="sum")`` for one sequence.
    """
    return np.sum(token_log_probs(logits, targets), axis=-1)


def cross_entropy(logits, targets):
    r"""The training loss: mean negative log-likelihood (lecture 000: maximum likelihood).

    .. math::
        \mathcal{L} = -\frac{1}{N}\sum_{i=1}^{N} \log P(s_i \mid s_{<i})

    logits [..., T, V], targets int [..., T] -> scalar, the mean over every target token.
    Maximising prod_i P(s_i | s_<i) over the parameters is minimising this
    (``F.cross_entropy``).
    """
    return -np.mean(token_log_probs(logits, targets))


def perplexity(token_log_probs):
    r"""Perplexity: the exponential of the mean negative log-likelihood (lecture 001).

    .. math::
        \mathrm{PPL} = \exp\!\left(-\frac{1}{N}\sum_{i=1}^{N} \log P(s_i \mid s_{<i})\right)

    token_log_probs [...] (natural log, e.g. from :func:`token_log_probs`) -> scalar. A model
    that is as unsure as a uniform choice among n tokens has perplexity n.
    """
    token_log_probs = as_array(token_log_probs, "token_log_probs", "[...]")
    require(token_log_probs.size > 0, "token_log_probs must hold at least one log-probability")
    return np.exp(-np.mean(token_log_probs))


def bits_per_byte(total_log_prob, n_bytes):
    r"""Bits per byte: a tokenizer-independent score for a text (lecture 001).

    .. math::
        \mathrm{BPB} = -\frac{\log P(\text{text})}{n_{\text{bytes}} \ln 2}

    total_log_prob: the text's log-probability in nats (the sum of its token log-probabilities),
    n_bytes: its length in UTF-8 bytes -> scalar. Dividing by bytes rather than tokens lets
    models with different vocabularies be compared.
    """
    require(n_bytes > 0, f"n_bytes must be positive, got {n_bytes!r}")
    return -np.float32(total_log_prob) / np.float32(n_bytes * np.log(2.0))
