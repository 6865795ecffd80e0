"""Counting parameters and compute (lecture 000: parameters per module; lecture 001: scaling laws).

Every decoder of the lectures (Llama, StableLM, Phi-3, Qwen2, GPT-2) is counted by
:func:`decoder_parameter_counts`; the families differ in biases, LayerNorm (weight and bias)
against RMSNorm (weight), a gated MLP (3 matrices) against GPT-2's (2), and GPT-2's table of
learned positions. A Llama-family decoder has embeddings [V, D], then L blocks of (RMSNorm, attention, RMSNorm, MLP),
a final RMSNorm and the LM head [V, D], which many small models tie to the embeddings (one matrix
used twice, counted once). No linear layer has a bias. For SmolLM2-135M (V=49152, D=576, F=1536,
L=30, H=9, K=3, Dh=64, tied) the MLPs hold 59% of the 134,515,008 parameters, attention 20% and
the embeddings 21%.
"""
from ._checks import positive_int, require


def embedding_parameters(V, D):
    r"""Parameters of the token embedding (or of an untied LM head) (lecture 000).

    .. math::
        N_{emb} = V D
    """
    return positive_int(V, "V") * positive_int(D, "D")


def attention_parameters(D, H, K, Dh, qkv_bias=False, o_bias=False):
    r"""Parameters of one attention layer: q, k, v, o projections (lecture 000; HF ``LlamaAttention``).

    .. math::
        N_{attn} = \underbrace{D H D_h}_{W_q} + \underbrace{2 D K D_h}_{W_k,\,W_v} + \underbrace{H D_h D}_{W_o}
            + [\text{qkv bias}]\,(H + 2K) D_h + [\text{o bias}]\,D

    Biases: none in Llama and Phi-3; on q, k, v in Qwen2 (and StableLM with ``use_qkv_bias``);
    on all four in GPT-2. Phi-3's one ``qkv_proj`` matrix holds the same D (H + 2K) Dh numbers.
    """
    D, H, K, Dh = (positive_int(n, name) for n, name in ((D, "D"), (H, "H"), (K, "K"), (Dh, "Dh")))
    require(H % K == 0, f"the query heads H must be a multiple of the key/value heads K, got H={H}, K={K}")
    return D * H * Dh + 2 * D * K * Dh + H * Dh * D + qkv_bias * (H + 2 * K) * Dh + o_bias * D


def mlp_parameters(D, F, gated=True, bias=False):
    r"""Parameters of one MLP (lecture 000; HF ``LlamaMLP``, ``GPT2MLP``).

    .. math::
        N_{mlp} = 3 D F \ \text{(gated: SwiGLU)}\qquad\text{or}\qquad
        2 D F + [\text{bias}]\,(F + D) \ \text{(GPT-2: up, GELU, down)}
    """
    D, F = positive_int(D, "D"), positive_int(F, "F")
    return 3 * D * F + bias * (2 * F + D) if gated else 2 * D * F + bias * (F + D)


def norm_parameters(D, bias=False):
    r"""Parameters of one norm: RMSNorm's weight, or LayerNorm's weight and bias (lecture 000).

    .. math::
        N_{norm} = D\ \text{(RMSNorm)}\qquad\text{or}\qquad 2D\ \text{(LayerNorm with bias)}
    """
    return (1 + bool(bias)) * positive_int(D, "D")


def decoder_parameter_counts(V, D, F, L, H, K, Dh, tied, qkv_bias=False, o_bias=False,
                             gated=True, mlp_bias=False, norm_bias=False, norms_per_layer=2,
                             positions=0):
    r"""Parameter counts of any decoder of the lectures, by module (lecture 000; HF ``num_parameters()``).

    .. math::
        N = V D + P D + L\,(N_{attn} + N_{mlp} + n\,N_{norm}) + N_{norm}
            + [\text{not tied}]\,V D

    P = ``positions``: GPT-2's learned position table (0 for RoPE models); n =
    ``norms_per_layer`` (2; 1 for StableLM's parallel residual). Returns a dict of ints:
    ``embeddings`` (tokens and positions), ``attention``, ``mlp``, ``norms`` (all L layers and
    the final norm), ``lm_head`` (0 when tied) and ``total``. StableLM-3B-4e1t: 2,795,443,200;
    Phi-3-mini-4k: 3,821,079,552; GPT-2: 124,439,808.
    """
    L = positive_int(L, "L")
    require(positions >= 0, f"positions must be >= 0, got {positions!r}")
    counts = {
        "embeddings": embedding_parameters(V, D) + positions * D,
        "attention": L * attention_parameters(D, H, K, Dh, qkv_bias, o_bias),
        "mlp": L * mlp_parameters(D, F, gated, mlp_bias),
        "norms": (norms_per_layer * L + 1) * norm_parameters(D, norm_bias),
        "lm_head": 0 if tied else embedding_parameters(V, D),
    }
    counts["total"] = sum(counts.values())
    return counts


def llama_parameter_counts(V, D, F, L, H, K, Dh, tied):
    r"""Parameter counts of a Llama-family model, by module (lecture 000; HF ``num_parameters()``).

    .. math::
        N = V D + L\,(N_{attn} + N_{mlp} + 2D) + D + [\text{not tied}]\,V D

    Returns a dict of ints: ``embeddings``, ``attention`` (all L layers), ``mlp`` (all L layers),
    ``norms`` (2 per layer plus the final one), ``lm_head`` (0 when tied to the embeddings) and
    ``total``. SmolLM2-135M gives a total of 134,515,008.
    """
    return decoder_parameter_counts(V, D, F, L, H, K, Dh, tied)


def chinchilla_optimal_tokens(n_params):
    r"""Compute-optimal number of training tokens, Chinchilla's rule of thumb (lecture 001).

    .. math::
        D_{opt} \approx 20\,N
    """
    require(n_params > 0, f"n_params must be positive, got {n_params!r}")
    return 20 * n_params


def forward_flops_per_token(n_params):
    r"""Floating-point operations of one forward pass per token, ignoring attention's T^2 term (lecture 001).

    .. math::
        C_{fwd} \approx 2 N

    (each parameter takes part in one multiply and one add).
    """
    require(n_params > 0, f"n_params must be positive, got {n_params!r}")
    return 2 * n_params


def training_flops(n_params, n_tokens):
    r"""Training compute: forward plus backward (twice the forward) over every token (lecture 001).

    .. math::
        C_{train} \approx 6 N D

    N parameters, D training tokens (here D is a token count, not the model width).
    """
    require(n_params > 0, f"n_params must be positive, got {n_params!r}")
    require(n_tokens > 0, f"n_tokens must be positive, got {n_tokens!r}")
    return 6 * n_params * n_tokens
