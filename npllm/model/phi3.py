r"""The Phi-3 forward pass (Phi-3-mini, lecture 002's model), from the lecture equations.

Llama's decoder (:mod:`npllm.model.llama`), stored differently::

    token ids -> embed -> L x [ RMSNorm -> qkv_proj -> split q | k | v -> RoPE -> attention
                                   -> o_proj -> + residual
                               RMSNorm -> gate_up_proj -> split gate | up -> SwiGLU -> down_proj
                                   -> + residual ]
              -> RMSNorm -> LM head -> logits

- q, k and v are one matrix ``qkv_proj`` [(H + 2K) Dh, D], gate and up one matrix
  ``gate_up_proj`` [2F, D]: the rows of Llama's matrices stacked. Splitting the rows gives back
  Llama's matrices, and the rest is Llama's computation (RoPE on ``rotary_dim`` coordinates,
  all of them for Phi-3-mini).
- A sliding window (``sliding_window``, 2047 for Phi-3-mini-4k): token i sees only the last
  window positions. For sequences no longer than the window this is full causal attention, so
  npllm accepts at most that many positions (``config.context_length``), as for Mistral.
- ``rope_scaling`` (``longrope``, the 128k models) is refused at load: not implemented.
"""
import numpy as np

from npllm.equations import (apply_partial_rope, grouped_query_attention, lm_head, merge_heads,
                             rms_norm, rope_cos_sin, rope_inverse_frequencies, split_heads,
                             swiglu_mlp)
from npllm.model.inputs import positions_and_mask
from npllm.model.modules import modules
from npllm.trace import no_trace

LAYER_MODULES = ("input_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_up_proj", "mlp.down_proj")


def forward(weights, config, ids, cache=None, attention_mask=None, trace=no_trace):
    r"""Logits for every position: token ids [B, T] -> logits [B, T, V].

    Arguments as :func:`npllm.model.llama.forward`'s.
    """
    B, T = ids.shape
    H, K, eps = config.num_attention_heads, config.num_key_value_heads, config.norm_eps
    Hd, Kd = H * config.head_dim, K * config.head_dim
    past = 0 if cache is None else cache.length
    positions, mask = positions_and_mask(B, T, past, attention_mask)  # [B, T], [B, 1, T, S]
    inv_freq = rope_inverse_frequencies(config.rotary_dim, config.rope_theta)
    cos, sin = rope_cos_sin(positions, inv_freq)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, R]
    trace("mask", mask)
    if cache is not None:
        cache.reserve(T)

    x = weights["model.embed_tokens.weight"][ids]  # [B, T, D]
    trace("embeddings", x)
    for i in range(config.num_hidden_layers):
        w = modules(weights, f"model.layers.{i}.", LAYER_MODULES)
        h = rms_norm(x, w.input_layernorm.weight, eps)
        trace(f"layers.{i}.attn_norm", h)
        W_q, W_k, W_v = np.split(w.qkv_proj.weight, [Hd, Hd + Kd])  # rows of the stacked matrix
        q = split_heads(h @ W_q.T, H)  # [B, H, T, Dh]
        k = split_heads(h @ W_k.T, K)  # [B, K, T, Dh]
        v = split_heads(h @ W_v.T, K)  # [B, K, T, Dh]
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)
        trace(f"layers.{i}.q_rope", q)
        trace(f"layers.{i}.k_rope", k)
        heads = grouped_query_attention(q, k, v, mask)  # [B, H, T, Dh]
        a = merge_heads(heads) @ w.o_proj.weight.T  # [B, T, D]
        trace(f"layers.{i}.attn_output", a)
        x = x + a
        trace(f"layers.{i}.residual", x)
        h = rms_norm(x, w.post_attention_layernorm.weight, eps)
        W_gate, W_up = np.split(w.gate_up_proj.weight, 2)  # [F, D] each: gate first
        x = x + swiglu_mlp(h, W_gate, W_up, w.down_proj.weight)
        trace(f"layers.{i}.output", x)
    x = rms_norm(x, weights["model.norm.weight"], eps)
    trace("norm", x)
    logits = lm_head(x, weights["lm_head.weight"])  # [B, T, V]
    trace("logits", logits)
    if cache is not None:
        cache.length += T
    return logits
