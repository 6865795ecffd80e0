"""Counting parameters and compute (lecture 000: parameters per module; lecture 001: scaling laws).

A Llama-family decoder has embeddings [V, D], then L blocks of (RMSNorm, attention, RMSNorm, MLP),
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


def attention_parameters(D, H, K, Dh):
    r"""Parameters of one attention layer: q, k, v, o projections, no biases (lecture 000; HF ``LlamaAttention``).

    .. math::
        N_{attn} = \underbrace{D H D_h}_{W_q} + \underbrace{2 D K D_h}_{W_k,\,W_v} + \underbrace{H D_h D}_{W_o}
    """
    D, H, K, Dh = (positive_int(n, name) for n, name in ((D, "D"), (H, "H"), (K, "K"), (Dh, "Dh")))
    require(H % K == 0, f"the query heads H must be a multiple of the key/value heads K, got H={H}, K={K}")
    return D * H * Dh + 2 * D * K * Dh + H * Dh * D


def mlp_parameters(D, F):
    r"""Parameters of one SwiGLU MLP: gate, up and down projections (lecture 000; HF ``LlamaMLP``).

    .. math::
        N_{mlp} = 3 D F
    """
    return 3 * positive_int(D, "D") * positive_int(F, "F")


def norm_parameters(D):
    r"""Parameters of one RMSNorm: its weight vector (lecture 000; HF ``LlamaRMSNorm``).

    .. math::
        N_{norm} = D
    """
    return positive_int(D, "D")


def llama_parameter_counts(V, D, F, L, H, K, Dh, tied):
    r"""Parameter counts of a Llama-family model, by module (lecture 000; HF ``num_parameters()``).

    .. math::
        N = V D + L\,(N_{attn} + N_{mlp} + 2D) + D + [\text{not tied}]\,V D

    Returns a dict of ints: ``embeddings``, ``attention`` (all L layers), ``mlp`` (all L layers),
    ``norms`` (2 per layer plus the final one), ``lm_head`` (0 when tied to the embeddings) and
    ``total``. SmolLM2-135M gives a total of 134,515,008.
    """
    L = positive_int(L, "L")
    counts = {
        "embeddings": embedding_parameters(V, D),
        "attention": L * attention_parameters(D, H, K, Dh),
        "mlp": L * mlp_parameters(D, F),
        "norms": (2 * L + 1) * norm_parameters(D),
        "lm_head": 0 if tied else embedding_parameters(V, D),
    }
    counts["total"] = sum(counts.values())
    return counts


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
