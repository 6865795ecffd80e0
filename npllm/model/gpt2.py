r"""The GPT-2 forward pass (lecture 000's ``gpt2``, 124M), from the lecture equations.

The 2019 decoder the Llama family grew from::

    token ids -> token embedding + learned position embedding
              -> L x [ LayerNorm -> attention (one c_attn matrix for q | k | v, biases)
                           -> c_proj -> + residual
                       LayerNorm -> c_fc -> GELU (tanh form) -> c_proj -> + residual ]
              -> LayerNorm -> LM head (tied to the token embedding) -> logits

Differences from Llama: positions are *added* to the embeddings from a trained table
(``wpe``, one row per position, 1024 of them) instead of rotating q and k; LayerNorm with bias;
every projection has a bias; the MLP is GELU with no gate; every head has its own keys and
values (K = H). Weights under transformers' ``GPT2LMHeadModel`` names; GPT-2's Conv1D matrices
are turned to ``[out, in]`` once at load (:func:`npllm.model.weights.conv1d_to_linear`).
"""
import numpy as np

from npllm.equations import (gelu_mlp, grouped_query_attention, layer_norm, learned_positions,
                             linear, lm_head, merge_heads, split_heads)
from npllm.model.inputs import positions_and_mask
from npllm.model.modules import modules
from npllm.trace import no_trace



def forward(weights, config, ids, cache=None, attention_mask=None, trace=no_trace):
    r"""Logits for every position: token ids [B, T] -> logits [B, T, V].

    Arguments as :func:`npllm.model.llama.forward`'s.
    """
    B, T = ids.shape
    H, eps = config.num_attention_heads, config.norm_eps
    past = 0 if cache is None else cache.length
    positions, mask = positions_and_mask(B, T, past, attention_mask)  # [B, T], [B, 1, T, S]
    trace("mask", mask)
    if cache is not None:
        cache.reserve(T)

    x = weights["transformer.wte.weight"][ids]  # [B, T, D]
    x = x + learned_positions(weights["transformer.wpe.weight"], positions)  # + P[position]
    trace("embeddings", x)
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        w = modules(weights, p, ("ln_1", "ln_2"))
        attn = modules(weights, p + "attn.", ("c_attn", "c_proj"))
        mlp = modules(weights, p + "mlp.", ("c_fc", "c_proj"))
        h = layer_norm(x, w.ln_1.weight, w.ln_1.bias, eps)
        trace(f"layers.{i}.attn_norm", h)
        qkv = linear(h, attn.c_attn.weight, attn.c_attn.bias)  # [B, T, 3D]: q | k | v
        q, k, v = (split_heads(part, H) for part in np.split(qkv, 3, axis=-1))  # [B, H, T, Dh]
        if cache is not None:
            k, v = cache.update(i, k, v)
        heads = grouped_query_attention(q, k, v, mask)  # [B, H, T, Dh]: K = H, no grouping
        a = linear(merge_heads(heads), attn.c_proj.weight, attn.c_proj.bias)
        trace(f"layers.{i}.attn_output", a)
        x = x + a
        trace(f"layers.{i}.residual", x)
        h = layer_norm(x, w.ln_2.weight, w.ln_2.bias, eps)
        approximate = "none" if config.activation == "gelu" else "tanh"  # gelu_new: tanh
        x = x + gelu_mlp(h, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias,
                         approximate)
        trace(f"layers.{i}.output", x)
    x = layer_norm(x, weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"], eps)
    trace("norm", x)
    logits = lm_head(x, weights["lm_head.weight"])  # [B, T, V]
    trace("logits", logits)
    if cache is not None:
        cache.length += T
    return logits
