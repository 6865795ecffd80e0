"""Choosing the next token (lecture 002: greedy vs sampling; lecture 003: temperature 0.2, top_p 0.9).

The model gives a distribution over the vocabulary; decoding picks one token from it. Greedy
decoding takes the most likely token. Sampling draws from the distribution after reshaping it:
temperature sharpens or flattens it, top-k and top-p (nucleus) cut off its unlikely tail by
setting those logits to -inf. Each filter matches the transformers logits processor named in its
docstring, and they are applied in transformers' order: temperature, top-k, top-p.
"""
import numpy as np

from ._checks import as_array, positive_int, require
from .softmax import softmax


def greedy(logits):
    r"""Greedy decoding: the most likely token (lecture 002; ``generate(do_sample=False)``).

    .. math::
        \hat y = \arg\max_{v} \mathrm{logits}_v

    logits [..., V] -> int [...]; among equal maxima, the first (lowest id).
    """
    return np.argmax(as_array(logits, "logits", "[..., V]"), axis=-1)


def apply_temperature(logits, temperature):
    r"""Temperature scaling (lecture 002; HF ``TemperatureLogitsWarper``).

    .. math::
        P_\tau(v) = \mathrm{softmax}(\mathrm{logits} / \tau)_v

    logits [..., V] -> [..., V]. tau < 1 sharpens the distribution (tau -> 0 approaches greedy),
    tau > 1 flattens it.
    """
    logits = as_array(logits, "logits", "[..., V]")
    require(temperature > 0, f"temperature must be > 0 (use greedy() for temperature 0), got {temperature!r}")
    return logits / np.float32(temperature)


def top_k_filter(logits, k, filter_value=-np.inf):
    r"""Keep the k most likely tokens (lecture 003: top-k; HF ``TopKLogitsWarper``).

    .. math::
        \tilde\ell_v = \begin{cases} \ell_v & \ell_v \ge \ell_{(k)} \\
                                     \text{filter\_value} & \text{otherwise} \end{cases}

    where l_(k) is the k-th largest logit of the row. logits [..., V] -> [..., V]. Tokens tied
    with the k-th largest are all kept, so more than k may survive; k > V keeps everything.
    """
    logits = as_array(logits, "logits", "[..., V]")
    V = logits.shape[-1]
    k = min(positive_int(k, "k"), V)
    kth_largest = np.partition(logits, V - k, axis=-1)[..., V - k, None]
    return np.where(logits < kth_largest, np.float32(filter_value), logits)


def top_p_filter(logits, top_p, min_tokens_to_keep=1, filter_value=-np.inf):
    r"""Nucleus filtering: keep the most likely tokens covering probability top_p (lecture 003;
    HF ``TopPLogitsWarper``).

    .. math::
        \text{remove } v \iff \sum_{v' \preceq v} P(v') \le 1 - p

    where the sum runs over v and every token ranked below it (sorted by ascending logit). What
    is removed holds at most 1 - p of the mass, so what is kept holds at least p.
    logits [..., V] -> [..., V]; the min_tokens_to_keep most likely tokens always stay.
    As in transformers, ties straddling the cut are resolved by sort position: here a stable
    sort, so the lower token id is removed first (transformers' unstable torch.sort agrees up
    to V = 16 and may pick another of the tied tokens beyond).
    """
    logits = as_array(logits, "logits", "[..., V]")
    require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p!r}")
    min_tokens_to_keep = positive_int(min_tokens_to_keep, "min_tokens_to_keep")
    order = np.argsort(logits, axis=-1, kind="stable")
    probs = softmax(np.take_along_axis(logits, order, axis=-1))
    # torch's CPU cumsum adds in float64 and rounds each partial sum to float32; doing the same
    # puts the cut exactly where transformers puts it (a float32 running sum over 49152 tokens
    # drifts by ~1e-5).
    cumulative = np.cumsum(probs, axis=-1, dtype=np.float64).astype(np.float32)
    remove_sorted = cumulative <= np.float32(1 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(filter_value), logits)


def filter_logits(logits, temperature=1.0, top_k=0, top_p=1.0):
    r"""Temperature, then top-k, then top-p, as transformers' ``generate(do_sample=True)`` chains them (lecture 002).

    .. math::
        \tilde\ell = \mathrm{top\_p}(\mathrm{top\_k}(\ell / \tau))

    logits [..., V] -> [..., V]. temperature=1.0, top_k=0 and top_p=1.0 each switch their step
    off (as in transformers, which then adds no warper).
    """
    logits = as_array(logits, "logits", "[..., V]")
    require(temperature > 0, f"temperature must be > 0 (use greedy() for temperature 0), got {temperature!r}")
    require(isinstance(top_k, (int, np.integer)) and top_k >= 0,
            f"top_k must be a non-negative integer (0 switches top-k off), got {top_k!r}")
    require(0 < top_p <= 1, f"top_p must be in (0, 1] (1.0 switches top-p off), got {top_p!r}")
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    if top_k != 0:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits


def sample(logits, rng):
    r"""Draw one token per row from softmax(logits) (lecture 002: sampling), by inverting the CDF.

    .. math::
        y = \min\{\, v : F_v > u \,\},\qquad F_v = \sum_{v' \le v} P(v'),\quad u \sim U[0, F_{V-1})

    logits [..., V] (filtered logits are fine: -inf has probability 0 and is never drawn),
    rng a ``numpy.random.Generator`` -> int [...]. One uniform ``rng.random`` number per row, so
    the same seed gives the same tokens. transformers draws with ``torch.multinomial`` instead.
    """
    logits = as_array(logits, "logits", "[..., V]")
    require(isinstance(rng, np.random.Generator),
            f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), "
            f"got {type(rng).__name__}")
    cdf = np.cumsum(softmax(logits), axis=-1)
    # u is scaled by the CDF's last value (1 up to rounding), so the draw never falls past it.
    u = rng.random(logits.shape[:-1])[..., None] * cdf[..., -1:]
    return np.sum(cdf <= u, axis=-1)
