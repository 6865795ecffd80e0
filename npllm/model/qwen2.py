r"""The Qwen2 forward pass, from the lecture equations.

Llama's decoder (:mod:`npllm.model.llama`) with one change: q, k and v have **biases**::

    q = h W_q^T + b_q,   k = h W_k^T + b_k,   v = h W_v^T + b_v      (o_proj, MLP: no bias)

A file of its own rather than a bias switch in ``llama.py``: Llama's reference stays the bias-free
lecture text that its tests and the Numba engine follow line by line, and reading the two files
side by side (``docs/families.md``) shows the three lines where the labs differ.
"""
from npllm.equations import (apply_rope, grouped_query_attention, linear, lm_head, merge_heads,
                             rms_norm, rope_cos_sin, rope_inverse_frequencies, split_heads,
                             swiglu_mlp)
from npllm.model.inputs import positions_and_mask
from npllm.model.modules import modules
from npllm.trace import no_trace

LAYER_MODULES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")


def forward(weights, config, ids, cache=None, attention_mask=None, trace=no_trace):
    r"""Logits for every position: token ids [B, T] -> logits [B, T, V].

    Arguments as :func:`npllm.model.llama.forward`'s.
    """
    B, T = ids.shape
    H, K, eps = config.num_attention_heads, config.num_key_value_heads, config.norm_eps
    past = 0 if cache is None else cache.length
    positions, mask = positions_and_mask(B, T, past, attention_mask)  # [B, T], [B, 1, T, S]
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(config.head_dim, config.rope_theta))
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh]
    trace("mask", mask)
    if cache is not None:
        cache.reserve(T)

    x = weights["model.embed_tokens.weight"][ids]  # [B, T, D]
    trace("embeddings", x)
    for i in range(config.num_hidden_layers):
        w = modules(weights, f"model.layers.{i}.", LAYER_MODULES)
        h = rms_norm(x, w.input_layernorm.weight, eps)
        trace(f"layers.{i}.attn_norm", h)
        q = split_heads(linear(h, w.q_proj.weight, w.q_proj.bias), H)  # [B, H, T, Dh]
        k = split_heads(linear(h, w.k_proj.weight, w.k_proj.bias), K)  # [B, K, T, Dh]
        v = split_heads(linear(h, w.v_proj.weight, w.v_proj.bias), K)  # [B, K, T, Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
        x = x + swiglu_mlp(h, w.gate_proj.weight, w.up_proj.weight, w.down_proj.weight)
        trace(f"layers.{i}.output", x)
    x = rms_norm(x, weights["model.norm.weight"], eps)
    trace("norm", x)
    logits = lm_head(x, weights["lm_head.weight"])  # [B, T, V]
    trace("logits", logits)
    if cache is not None:
        cache.length += T
    return logits
