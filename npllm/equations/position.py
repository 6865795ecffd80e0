"""Positional information (lecture 003: sinusoidal encoding with a constant C, then RoPE).

Attention by itself ignores word order. The original transformer adds a fixed sinusoidal code to
the embeddings; Llama-family models (SmolLM2 among them) instead rotate each query and key by an
angle proportional to its position (rotary position embedding, RoPE), so the score q_m . k_n
depends only on the offset m - n.

RoPE pairs the coordinates of a head in one of two layouts. Hugging Face pairs coordinate i with
i + Dh/2 (``rotate_half``); Meta's original code and GGUF files pair 2i with 2i + 1. llama.cpp's
converter permutes the rows of the q and k projections so that the interleaved layout gives the
same attention as Hugging Face's: :func:`interleaved_to_half_rows` undoes that permutation.
"""
import numpy as np

from ._checks import as_array, positive_int, require


def rope_inverse_frequencies(head_dim, theta):
    r"""RoPE rotation frequencies, one per coordinate pair (lecture 003; HF ``LlamaRotaryEmbedding.inv_freq``).

    .. math::
        \omega_i = \theta^{-2i/D_h},\qquad i = 0, \dots, D_h/2 - 1

    -> [Dh/2]. Computed as transformers does: ``1 / theta ** (arange(0, Dh, 2) / Dh)``, the
    exponent in float32.
    """
    head_dim = positive_int(head_dim, "head_dim")
    require(head_dim % 2 == 0, f"head_dim must be even (RoPE rotates pairs), got {head_dim}")
    require(theta > 0, f"theta must be positive, got {theta!r}")
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # The power is rounded once from float64: that is the correctly rounded float32 value, which
    # torch's float32 pow (within 1 ulp of it) reproduces bit for bit at the usual (theta, Dh),
    # where NumPy's own float32 power is 1 ulp off in about one entry in five.
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def rope_cos_sin(positions, inv_freq):
    r"""The cosines and sines of the RoPE angles (lecture 003; HF ``LlamaRotaryEmbedding.forward``).

    .. math::
        \phi_{p,i} = p\,\omega_i,\qquad
        \cos = \cos([\phi, \phi]),\quad \sin = \sin([\phi, \phi])

    positions int [..., T], inv_freq [Dh/2] -> cos, sin [..., T, Dh]. The angles are repeated
    (``cat(freqs, freqs)``) so that coordinate i and i + Dh/2 share angle i: the HF layout.
    """
    positions = as_array(positions, "positions", "[..., T]", dtype=np.float32)
    inv_freq = as_array(inv_freq, "inv_freq", "[Dh/2]")
    freqs = positions[..., None] * inv_freq
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate_half(x):
    r"""Rotate the two halves of each head by 90 degrees (lecture 003; HF ``rotate_half``).

    .. math::
        \mathrm{rotate\_half}([x_1, x_2]) = [-x_2, x_1]

    x [..., Dh] -> [..., Dh], where x_1 is the first half of the coordinates and x_2 the second.
    """
    x = as_array(x, "x", "[..., Dh]")
    require(x.shape[-1] % 2 == 0, f"x must have an even last axis Dh, got shape {x.shape}")
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    r"""Rotary position embedding, Hugging Face layout (lecture 003; HF ``apply_rotary_pos_emb``).

    .. math::
        \mathrm{RoPE}(x) = x \odot \cos + \mathrm{rotate\_half}(x) \odot \sin

    i.e. each pair (x_i, x_{i+Dh/2}) is rotated by the angle p * omega_i. x [..., T, Dh] (heads
    before T are fine, e.g. [H, T, Dh]), cos, sin [..., T, Dh] from :func:`rope_cos_sin`,
    broadcastable to x -> [..., T, Dh].
    """
    x, cos, sin = _rope_arguments(x, cos, sin)
    return x * cos + rotate_half(x) * sin


def apply_partial_rope(x, cos, sin):
    r"""RoPE on the first R coordinates of each head only (StableLM, Phi-3; HF ``apply_rotary_pos_emb``
    with ``partial_rotary_factor``; lecture 003).

    .. math::
        \mathrm{RoPE}_R(x) = [\,\mathrm{RoPE}(x_{:R}),\ x_{R:}\,]

    x [..., T, Dh], cos, sin [..., T, R] from :func:`rope_cos_sin` with
    ``rope_inverse_frequencies(R, theta)`` (R = Dh * partial_rotary_factor, even) -> [..., T, Dh].
    The last Dh - R coordinates carry no position: StableLM 3B rotates 20 of its 80.
    """
    R = np.shape(cos)[-1]
    require(np.shape(x)[-1] >= R, f"x must have at least R = {R} coordinates per head, got shape "
                                  f"{np.shape(x)}")
    x = as_array(x, "x", "[..., T, Dh]")
    return np.concatenate([apply_rope(x[..., :R], cos, sin), x[..., R:]], axis=-1)


def learned_positions(table, positions):
    r"""Learned absolute position embeddings (GPT-2; HF ``GPT2Model.wpe``; lecture 003).

    .. math::
        x_t = E_{s_t} + P_{p_t}

    table [P, D] (one trained vector per position, P = n_positions), positions int [..., T]
    -> [..., T, D]: the rows to add to the token embeddings. Unlike RoPE or the sinusoidal code
    it is a lookup: a model has no vector for a position beyond P.
    """
    table = as_array(table, "table", "[P, D]")
    positions = np.asarray(positions)
    require(positions.size == 0 or (positions.min() >= 0 and positions.max() < table.shape[0]),
            f"positions must lie in [0, {table.shape[0]}): the table has one row per position")
    return table[positions]


def apply_rope_interleaved(x, cos, sin):
    r"""Rotary position embedding, interleaved layout (lecture 003; Meta's original code, GGUF files).

    .. math::
        \begin{pmatrix} y_{2i} \\ y_{2i+1} \end{pmatrix} =
        \begin{pmatrix} \cos\phi_i & -\sin\phi_i \\ \sin\phi_i & \cos\phi_i \end{pmatrix}
        \begin{pmatrix} x_{2i} \\ x_{2i+1} \end{pmatrix}

    Pairs neighbouring coordinates (x_{2i}, x_{2i+1}) instead of (x_i, x_{i+Dh/2}). Same shapes
    and the same cos, sin [..., T, Dh] as :func:`apply_rope` (only the first half of the angles
    is read). No HF counterpart: transformers permutes the weights instead.
    """
    x, cos, sin = _rope_arguments(x, cos, sin)
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = np.stack([even * c - odd * s, odd * c + even * s], axis=-1)
    return rotated.reshape(x.shape)


def interleaved_to_half_rows(w, n_heads):
    r"""Undo llama.cpp's row permutation of ``attn_q`` / ``attn_k`` (lecture 003: RoPE layouts).

    .. math::
        W^{\mathrm{HF}}_{h D_h + j D_h/2 + i} = W^{\mathrm{GGUF}}_{h D_h + 2i + j},
        \qquad j \in \{0, 1\},\ i < D_h/2

    w [n_heads * Dh, D] (or a bias [n_heads * Dh]) -> same shape. llama.cpp's converter moved
    row i + j Dh/2 of each head to row 2i + j so that interleaved RoPE on its weights gives the
    HF result; this puts the rows back so :func:`apply_rope` can be used. Pass the query head
    count H for attn_q and the key/value head count K for attn_k.
    """
    w = np.asarray(w)
    n_heads = positive_int(n_heads, "n_heads")
    require(w.ndim in (1, 2), f"w must have shape [n_heads * Dh, D] or [n_heads * Dh], got {w.shape}")
    require(w.shape[0] % (2 * n_heads) == 0,
            f"w must have n_heads * Dh rows with Dh even; {w.shape[0]} rows, n_heads={n_heads}")
    head_dim = w.shape[0] // n_heads
    return (w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def sinusoidal_encoding(n_positions, d_model, C=10000.0):
    r"""Sinusoidal positional encoding with an adjustable constant C (lecture 003; "Attention Is All You Need").

    .. math::
        PE_{p,2k} = \sin\!\left(\frac{p}{C^{2k/d_{model}}}\right),\qquad
        PE_{p,2k+1} = \cos\!\left(\frac{p}{C^{2k/d_{model}}}\right)

    -> [T, D] with T = n_positions, D = d_model. C = 10000 is the paper's choice; the lecture
    uses C = 1 (every angle is then just p) so short examples show visible changes. The lecture
    multiplies the embeddings by this code for its plots; the paper adds it.
    """
    n_positions = positive_int(n_positions, "n_positions")
    d_model = positive_int(d_model, "d_model")
    require(C > 0, f"C must be positive, got {C!r}")
    p = np.arange(n_positions, dtype=np.float32)[:, None]
    two_k = (np.arange(d_model) // 2 * 2).astype(np.float32)
    angles = p / np.float32(C) ** (two_k / np.float32(d_model))
    return np.where(np.arange(d_model) % 2 == 0, np.sin(angles), np.cos(angles))


def _rope_arguments(x, cos, sin):
    x = as_array(x, "x", "[..., T, Dh]")
    cos = as_array(cos, "cos", "[..., T, Dh]")
    sin = as_array(sin, "sin", "[..., T, Dh]")
    require(x.shape[-1] % 2 == 0,
            f"x must have an even head width Dh (RoPE rotates pairs), got shape {x.shape}")
    require(cos.shape == sin.shape, f"cos and sin must have the same shape, got {cos.shape} and {sin.shape}")
    require(cos.shape[-1] == x.shape[-1] and _broadcasts_to(cos.shape, x.shape),
            f"cos and sin must be [..., T, Dh] broadcastable to x {x.shape}, got {cos.shape}")
    return x, cos, sin


def _broadcasts_to(shape, target):
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False
