r"""The Llama forward pass (Llama, Mistral, SmolLM), composed from the lecture equations.

Read it beside the architecture diagram of lecture 003::

    token ids -> embed -> L x [ RMSNorm -> attention (RoPE, grouped-query) -> + residual
                               RMSNorm -> SwiGLU MLP                       -> + residual ]
              -> RMSNorm -> LM head -> logits

Everything is a function of (weights, config, token ids, cache). Weights are a dict keyed by the
Hugging Face tensor names (``model.layers.3.self_attn.q_proj.weight``), each ``[out, in]`` as
``torch.nn.Linear`` stores it, so a linear layer is ``x @ W.T``.

This is the reference: what the model computes, written for reading. ``npllm.load`` runs it
with ``engine="reference"``; the default engine (:mod:`npllm.engine`) computes the same numbers
faster and is tested equal to this function.
"""
from types import SimpleNamespace

from npllm.equations import (apply_rope, grouped_query_attention, lm_head, merge_heads,
                             rms_norm, rope_cos_sin, rope_inverse_frequencies, split_heads,
                             swiglu_mlp)
from npllm.model.inputs import positions_and_mask
from npllm.trace import no_trace

LAYER_TENSORS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")


def layer_weights(weights, i):
    """Layer i's tensors under their module names: ``w.q_proj`` is
    ``weights["model.layers.{i}.self_attn.q_proj.weight"]``."""
    return SimpleNamespace(**{name.split(".")[-1]: weights[f"model.layers.{i}.{name}.weight"]
                              for name in LAYER_TENSORS})


def forward(weights, config, ids, cache=None, attention_mask=None, trace=no_trace):
    r"""Logits for every position: token ids [B, T] -> logits [B, T, V].

    ``logits[b, t]`` scores the token that follows ``ids[b, : t + 1]``:
    :math:`P(s_{t+1} \mid s_{\le t}) = \mathrm{softmax}(\mathrm{logits}_t)` (lecture 000).

    ``cache`` (:class:`~npllm.model.cache.KVCache`): ``ids`` are the *new* tokens; their keys
    and values are appended and the cache's length advances (lecture 002). ``attention_mask``
    [B, S] (1 = token, 0 = padding) for padded batches. ``trace(name, value)`` is called with
    each intermediate under its lecture name (:mod:`npllm.trace`); by default nobody listens.
    Arguments are checked by :func:`npllm.model.inputs.check_inputs` before.
    """
    B, T = ids.shape
    H, K, eps = config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps
    past = 0 if cache is None else cache.length
    positions, mask = positions_and_mask(B, T, past, attention_mask)  # [B, T], [B, 1, T, S]
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(config.head_dim, config.rope_theta))
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh]: the same rotation for every head
    trace("mask", mask)
    if cache is not None:
        cache.reserve(T)

    x = weights["model.embed_tokens.weight"][ids]  # [B, T, D]
    trace("embeddings", x)
    for i in range(config.num_hidden_layers):
        w = layer_weights(weights, i)
        # Attention: x + o_proj(attention(RoPE(q), RoPE(k), v)) of the normed x
        h = rms_norm(x, w.input_layernorm, eps)
        trace(f"layers.{i}.attn_norm", h)
        q = split_heads(h @ w.q_proj.T, H)  # [B, H, T, Dh]
        k = split_heads(h @ w.k_proj.T, K)  # [B, K, T, Dh]
        v = split_heads(h @ w.v_proj.T, K)  # [B, K, T, Dh]
        trace(f"layers.{i}.q", q)
        trace(f"layers.{i}.k", k)
        trace(f"layers.{i}.v", v)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)  # [B, K, S, Dh]: the cached positions and the new ones
        trace(f"layers.{i}.q_rope", q)
        trace(f"layers.{i}.k_rope", k)
        heads = grouped_query_attention(q, k, v, mask)  # [B, H, T, Dh]
        trace(f"layers.{i}.heads", heads)
        a = merge_heads(heads) @ w.o_proj.T  # [B, T, D]
        trace(f"layers.{i}.attn_output", a)
        x = x + a
        trace(f"layers.{i}.residual", x)
        # MLP: x + down(SiLU(gate(h)) * up(h)) of the normed x
        h = rms_norm(x, w.post_attention_layernorm, eps)
        trace(f"layers.{i}.mlp_norm", h)
        m = swiglu_mlp(h, w.gate_proj, w.up_proj, w.down_proj)  # [B, T, D], through width F
        trace(f"layers.{i}.mlp_output", m)
        x = x + m
        trace(f"layers.{i}.output", x)
    x = rms_norm(x, weights["model.norm.weight"], eps)
    trace("norm", x)
    logits = lm_head(x, weights["lm_head.weight"])  # [B, T, V]
    trace("logits", logits)
    if cache is not None:
        cache.length += T
    return logits
