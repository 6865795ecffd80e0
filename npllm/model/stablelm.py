r"""The StableLM forward pass (StableLM-3B-4e1t, lecture 000's model), from the lecture equations.

Llama's decoder (:mod:`npllm.model.llama`) with three of one lab's choices::

    token ids -> embed -> L x [ LayerNorm -> attention (RoPE on the first R of Dh coordinates)
                                   -> + residual
                               LayerNorm -> SwiGLU MLP -> + residual ]
              -> LayerNorm -> LM head -> logits

- LayerNorm (with a bias) where Llama has RMSNorm;
- RoPE on the first ``rotary_dim`` = Dh x ``partial_rotary_factor`` coordinates of each head
  only (StableLM 3B: 20 of 80), the rest pass unrotated;
- optional biases on q, k, v (``use_qkv_bias``, StableLM 2) and optional *parallel* residual
  (``use_parallel_residual``: attention and MLP both read the same normed x, GPT-J's layout).

Weights under transformers' ``StableLmForCausalLM`` names, each ``[out, in]``.
"""
from npllm.equations import (apply_partial_rope, grouped_query_attention, layer_norm, linear,
                             lm_head, merge_heads, rope_cos_sin, rope_inverse_frequencies,
                             split_heads, swiglu_mlp)
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
    inv_freq = rope_inverse_frequencies(config.rotary_dim, config.rope_theta)  # [R/2]
    cos, sin = rope_cos_sin(positions, inv_freq)  # [B, T, R]: only R coordinates turn
    cos, sin = cos[:, None], sin[:, None]
    trace("mask", mask)
    if cache is not None:
        cache.reserve(T)

    x = weights["model.embed_tokens.weight"][ids]  # [B, T, D]
    trace("embeddings", x)
    for i in range(config.num_hidden_layers):
        w = modules(weights, f"model.layers.{i}.", LAYER_MODULES)
        h = layer_norm(x, w.input_layernorm.weight, w.input_layernorm.bias, eps)
        trace(f"layers.{i}.attn_norm", h)
        q = split_heads(linear(h, w.q_proj.weight, w.q_proj.bias), H)  # [B, H, T, Dh]
        k = split_heads(linear(h, w.k_proj.weight, w.k_proj.bias), K)  # [B, K, T, Dh]
        v = split_heads(linear(h, w.v_proj.weight, w.v_proj.bias), K)  # [B, K, T, Dh]
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(i, k, v)
        trace(f"layers.{i}.q_rope", q)
        trace(f"layers.{i}.k_rope", k)
        heads = grouped_query_attention(q, k, v, mask)  # [B, H, T, Dh]
        a = merge_heads(heads) @ w.o_proj.weight.T  # [B, T, D]
        trace(f"layers.{i}.attn_output", a)
        if config.parallel_residual:  # both halves read the same normed x: x + attn + mlp
            x = x + a + swiglu_mlp(h, w.gate_proj.weight, w.up_proj.weight, w.down_proj.weight)
        else:
            x = x + a
            trace(f"layers.{i}.residual", x)
            h = layer_norm(x, w.post_attention_layernorm.weight,
                           w.post_attention_layernorm.bias, eps)
            x = x + swiglu_mlp(h, w.gate_proj.weight, w.up_proj.weight, w.down_proj.weight)
        trace(f"layers.{i}.output", x)
    x = layer_norm(x, weights["model.norm.weight"], weights["model.norm.bias"], eps)
    trace("norm", x)
    logits = lm_head(x, weights["lm_head.weight"])  # [B, T, V]
    trace("logits", logits)
    if cache is not None:
        cache.length += T
    return logits
