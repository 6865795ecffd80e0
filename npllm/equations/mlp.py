"""Activation functions and the gated MLP (lecture 003: SmolLM2's MLP, 576 -> 1536 -> 576).

Each decoder block ends with an MLP applied to every token separately. Llama-family models use
the SwiGLU form: two projections up to width F, one passed through SiLU and used as a gate on the
other, then a projection back down to D.
"""
import numpy as np

from ._checks import as_array, require


def silu(x):
    r"""Sigmoid linear unit, also called swish (lecture 003; ``torch.nn.functional.silu``).

    .. math::
        \mathrm{SiLU}(x) = x\,\sigma(x) = \frac{x}{1 + e^{-x}}

    x [...] -> [...], elementwise.
    """
    x = as_array(x, "x", "[...]")
    # For x < -88, exp(-x) overflows to inf in float32 and x / inf = -0: the correct limit.
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def gelu(x, approximate="none"):
    r"""Gaussian error linear unit (GPT-2 style MLPs; ``torch.nn.functional.gelu``).

    .. math::
        \mathrm{GELU}(x) = x\,\Phi(x) = \frac{x}{2}\,\mathrm{erfc}\!\left(-\frac{x}{\sqrt 2}\right)
        \qquad\text{or, with approximate="tanh",}\qquad
        \frac{x}{2}\left(1 + \tanh\!\left(\sqrt{2/\pi}\,(x + 0.044715\,x^3)\right)\right)

    x [...] -> [...], elementwise. Phi is the standard normal CDF.
    """
    x = as_array(x, "x", "[...]")
    require(approximate in ("none", "tanh"), f'approximate must be "none" or "tanh", got {approximate!r}')
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + 0.044715 * x**3)))
    return 0.5 * x * _erfc(-x / np.float32(np.sqrt(2.0)))


def swiglu(gate, up):
    r"""The SwiGLU gate (lecture 003; the middle of HF ``LlamaMLP``).

    .. math::
        \mathrm{SwiGLU}(g, u) = \mathrm{SiLU}(g) \odot u

    gate, up [..., F] -> [..., F].
    """
    gate = as_array(gate, "gate", "[..., F]")
    up = as_array(up, "up", "[..., F]")
    require(gate.shape == up.shape, f"gate and up must have the same shape, got {gate.shape} and {up.shape}")
    return silu(gate) * up


def swiglu_mlp(x, w_gate, w_up, w_down):
    r"""The SwiGLU MLP of a Llama block (lecture 003; HF ``LlamaMLP``).

    .. math::
        \mathrm{MLP}(x) = W_{down}\left(\mathrm{SiLU}(W_{gate}\,x) \odot W_{up}\,x\right)

    x [..., D], w_gate, w_up [F, D], w_down [D, F] (HF ``nn.Linear`` layout: [out, in])
    -> [..., D]. For SmolLM2-135M, D = 576 and F = 1536.
    """
    x = as_array(x, "x", "[..., D]")
    w_gate = as_array(w_gate, "w_gate", "[F, D]")
    w_up = as_array(w_up, "w_up", "[F, D]")
    w_down = as_array(w_down, "w_down", "[D, F]")
    D, F = x.shape[-1], w_gate.shape[0]
    require(w_gate.shape == w_up.shape == (F, D),
            f"w_gate and w_up must have shape [F, D] with D = {D}, got {w_gate.shape} and {w_up.shape}")
    require(w_down.shape == (D, F), f"w_down must have shape [D, F] = {(D, F)}, got {w_down.shape}")
    return swiglu(x @ w_gate.T, x @ w_up.T) @ w_down.T


def linear(x, w, b=None):
    r"""A linear layer, with or without bias (lecture 003; ``torch.nn.Linear``).

    .. math::
        y = x W^\top + b

    x [..., in], w [out, in] (``nn.Linear``'s layout), b [out] or None -> [..., out]. Llama has
    no biases; Qwen2 adds them to q, k, v; GPT-2 to every projection.
    """
    x = as_array(x, "x", "[..., in]")
    w = as_array(w, "w", "[out, in]")
    require(w.shape[1] == x.shape[-1], f"w must have shape [out, in] with in = {x.shape[-1]}, "
                                       f"got {w.shape}")
    y = x @ w.T
    if b is None:
        return y
    b = as_array(b, "b", "[out]")
    require(b.shape == w.shape[:1], f"b must have shape [out] = {w.shape[:1]}, got {b.shape}")
    return y + b


def gelu_mlp(x, w_fc, b_fc, w_proj, b_proj, approximate="tanh"):
    r"""GPT-2's MLP: up to width F, GELU, back down, with biases (lecture 003; HF ``GPT2MLP``).

    .. math::
        \mathrm{MLP}(x) = W_{proj}\,\mathrm{GELU}(W_{fc}\,x + b_{fc}) + b_{proj}

    x [..., D], w_fc [F, D], b_fc [F], w_proj [D, F], b_proj [D] -> [..., D] (``nn.Linear``
    layout; GPT-2's Conv1D files are turned at load). GPT-2's ``gelu_new`` is the tanh form.
    One matrix fewer than :func:`swiglu_mlp`: no gate.
    """
    return linear(gelu(linear(x, w_fc, b_fc), approximate), w_proj, b_proj)


def _erfc(z):
    # NumPy has no erf. This is the complementary error function of Numerical Recipes ("erfcc",
    # Chebyshev fit), relative error below 1.2e-7 everywhere: float32 accuracy, including the
    # far negative tail where GELU's value is tiny.
    a = np.abs(z)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = np.float32(0.17087277)
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
              0.09678418, 0.37409196, 1.00002368, -1.26551223):
        poly = poly * t + np.float32(c)
    tail = t * np.exp(-a * a + poly)
    return np.where(z >= 0, tail, 2.0 - tail)
