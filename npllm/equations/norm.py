"""Normalisation layers (lecture 003: every SmolLM2 block starts its two halves with an RMSNorm).

Llama-family models use RMSNorm; GPT-2 style models use LayerNorm. Both are computed in float32,
with eps inside the square root, as transformers does.
"""
import numpy as np

from ._checks import as_array, require


def rms_norm(x, weight, eps):
    r"""Root-mean-square normalisation (lecture 003; Hugging Face ``LlamaRMSNorm``).

    .. math::
        \mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\frac{1}{D}\sum_{d=1}^{D} x_d^2 + \epsilon}} \odot w

    x [..., D], weight [D] -> [..., D]. No mean is subtracted and there is no bias: only the
    scale of x is normalised. Computed as transformers does: ``x * rsqrt(mean(x^2) + eps) * w``.
    """
    x = as_array(x, "x", "[..., D]")
    weight = as_array(weight, "weight", "[D]")
    require(weight.shape == x.shape[-1:],
            f"weight must have shape [D] = {x.shape[-1:]} to match x, got {weight.shape}")
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(variance + np.float32(eps))) * weight


def layer_norm(x, weight, bias, eps):
    r"""Layer normalisation (GPT-2 style blocks; ``torch.nn.functional.layer_norm``).

    .. math::
        \mathrm{LayerNorm}(x) = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \odot w + b,\quad
        \mu = \frac{1}{D}\sum_d x_d,\quad \sigma^2 = \frac{1}{D}\sum_d (x_d - \mu)^2

    x [..., D], weight [D], bias [D] or None (``nn.LayerNorm(D, bias=False)``: b = 0) -> [..., D].
    The variance is the biased one (divide by D). GPT-2 and StableLM normalise with it (with a
    bias), where Llama uses :func:`rms_norm`.
    """
    x = as_array(x, "x", "[..., D]")
    weight = as_array(weight, "weight", "[D]")
    bias = np.zeros_like(weight) if bias is None else as_array(bias, "bias", "[D]")
    require(weight.shape == bias.shape == x.shape[-1:],
            f"weight and bias must have shape [D] = {x.shape[-1:]} to match x, "
            f"got {weight.shape} and {bias.shape}")
    centred = x - np.mean(x, axis=-1, keepdims=True)
    variance = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(variance + np.float32(eps)) * weight + bias
