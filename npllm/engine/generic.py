r"""The Numba engine for StableLM, Phi-3, Qwen2 and GPT-2: their forward passes with the kernels.

One forward pass for the four families (:mod:`npllm.model.families` has one readable reference
each), switching where they differ, with the Numba kernels where a kernel exists
(:mod:`npllm.kernels`):

- attention: ``grouped_query_attention`` (causal blocks skipped, no repeated K/V) and, decoding
  one token with a cache, ``decode_attention``;
- RoPE (on the first ``rotary_dim`` coordinates of each head), RMSNorm (Phi-3, Qwen2), the
  SwiGLU gate (StableLM, Phi-3, Qwen2), and the LM head's log-softmax when the
  log-probabilities of targets are asked (the [T, V] logits never held).

LayerNorm (StableLM, GPT-2), GELU (GPT-2) and the biases are the NumPy equations: they have no
kernel. Phi-3's and GPT-2's stacked q | k | v and gate | up matrices are split into row views
once, here, and each projection is one BLAS product. Llama's own fast paths
(:mod:`npllm.engine.fast`: packed decoding, parts on threads) are Llama's only. Tested equal to
transformers on both engines in ``tests/test_families.py``.
"""
from types import SimpleNamespace

import numpy as np

from npllm import kernels as K
from npllm.engine.threads import Parallel
from npllm.engine.warm import WarmUp
from npllm.equations import (gelu_mlp, layer_norm, learned_positions, linear, merge_heads,
                             rope_cos_sin, rope_inverse_frequencies, split_heads)
from npllm.model.family_config import embedding_name
from npllm.model.inputs import positions_and_mask
from npllm.trace import no_trace

LAYER_NORM_FAMILIES = ("stablelm", "gpt2")


def family_layers(config, weights):
    """Each layer's matrices as views of the loaded weights, in one layout for every family:
    q, k, v, o, the MLP's matrices, the norms (weight, bias) and the biases (None if absent)."""
    c = config
    Hd, Kd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layers = []
    for i in range(c.num_hidden_layers):
        if c.model_type == "gpt2":
            p = f"transformer.h.{i}."
            W_q, W_k, W_v = np.split(weights[p + "attn.c_attn.weight"], 3)
            b_q, b_k, b_v = np.split(weights[p + "attn.c_attn.bias"], 3)
            layers.append(SimpleNamespace(
                attn_norm=(weights[p + "ln_1.weight"], weights[p + "ln_1.bias"]),
                mlp_norm=(weights[p + "ln_2.weight"], weights[p + "ln_2.bias"]),
                q=(W_q, b_q), k=(W_k, b_k), v=(W_v, b_v),
                o=(weights[p + "attn.c_proj.weight"], weights[p + "attn.c_proj.bias"]),
                mlp=(weights[p + "mlp.c_fc.weight"], weights[p + "mlp.c_fc.bias"],
                     weights[p + "mlp.c_proj.weight"], weights[p + "mlp.c_proj.bias"])))
            continue
        p = f"model.layers.{i}."

        def get(name):
            return weights.get(p + name)
        if c.model_type == "phi3":
            W_q, W_k, W_v = np.split(get("self_attn.qkv_proj.weight"), [Hd, Hd + Kd])
            W_gate, W_up = np.split(get("mlp.gate_up_proj.weight"), 2)
        else:
            W_q, W_k, W_v = (get(f"self_attn.{n}_proj.weight") for n in "qkv")
            W_gate, W_up = get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")
        layers.append(SimpleNamespace(
            attn_norm=(get("input_layernorm.weight"), get("input_layernorm.bias")),
            mlp_norm=(get("post_attention_layernorm.weight"), get("post_attention_layernorm.bias")),
            q=(W_q, get("self_attn.q_proj.bias")), k=(W_k, get("self_attn.k_proj.bias")),
            v=(W_v, get("self_attn.v_proj.bias")), o=(get("self_attn.o_proj.weight"), None),
            mlp=(W_gate, W_up, get("mlp.down_proj.weight"))))
    return layers


class FamilyEngine(WarmUp):
    """The Numba engine of StableLM, Phi-3, Qwen2 and GPT-2 (see the module docstring)."""

    name = "numba"

    def __init__(self, config, weights, threads=None):
        self.config, self.weights = config, weights
        self.layers = family_layers(config, weights)
        self.embed, self.lm_head = weights[embedding_name(config)], weights["lm_head.weight"]
        gpt2 = config.model_type == "gpt2"
        self.positions = weights["transformer.wpe.weight"] if gpt2 else None
        final = "transformer.ln_f." if gpt2 else "model.norm."
        self.final_norm = (weights[final + "weight"], weights.get(final + "bias"))
        self.parallel = Parallel(threads)

    def __call__(self, inputs, cache=None, attention_mask=None, trace=no_trace):
        """Logits [B, kept, V], or log P(targets) [B, kept] (:class:`~npllm.model.inputs.Inputs`)."""
        return self.forward(inputs.ids, cache, attention_mask, trace, inputs.kept, inputs.targets)

    def norm(self, x, weight_bias):
        weight, bias = weight_bias
        if self.config.model_type in LAYER_NORM_FAMILIES:
            return layer_norm(x, weight, bias, self.config.norm_eps)
        return K.rms_norm(x, weight, self.config.norm_eps)

    def rope(self, x, cos, sin):
        """RoPE on the first R coordinates of each head (all of them when R = Dh)."""
        R = cos.shape[-1]
        if R == x.shape[-1]:
            return K.apply_rope(x, cos, sin)
        return np.concatenate([K.apply_rope(np.ascontiguousarray(x[..., :R]), cos, sin),
                               x[..., R:]], axis=-1)

    def mlp(self, h, layer):
        if self.config.model_type == "gpt2":
            return gelu_mlp(h, *layer.mlp, "none" if self.config.activation == "gelu" else "tanh")
        W_gate, W_up, W_down = layer.mlp
        return K.swiglu(h @ W_gate.T, h @ W_up.T) @ W_down.T

    def forward(self, ids, cache=None, attention_mask=None, trace=no_trace, kept=None,
                targets=None):
        """The family's forward pass: ids [B, T] -> logits [B, kept, V], or log P(targets)."""
        c = self.config
        B, T = ids.shape
        kept = kept or T
        H, Kv = c.num_attention_heads, c.num_key_value_heads
        past = 0 if cache is None else cache.length
        positions, mask = positions_and_mask(B, T, past, attention_mask)
        decoding = cache is not None and T == 1 and attention_mask is None
        if c.rotary_dim:
            cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(c.rotary_dim,
                                                                        c.rope_theta))
            cos, sin = cos[:, None], sin[:, None]
        trace("mask", mask)
        if cache is not None:
            cache.reserve(T)

        x = self.embed[ids]
        if self.positions is not None:
            x = x + learned_positions(self.positions, positions)
        trace("embeddings", x)
        for i, layer in enumerate(self.layers):
            h = self.norm(x, layer.attn_norm)
            trace(f"layers.{i}.attn_norm", h)
            q = split_heads(linear(h, *layer.q), H)
            k = split_heads(linear(h, *layer.k), Kv)
            v = split_heads(linear(h, *layer.v), Kv)
            if c.rotary_dim:
                q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            if cache is not None:
                k, v = cache.update(i, k, v)
            trace(f"layers.{i}.q_rope", q)
            trace(f"layers.{i}.k_rope", k)
            if decoding:  # the last position sees every cached one: no mask
                heads = K.decode_attention(q, cache.keys[i], cache.values[i], k.shape[2])
            else:
                heads = K.grouped_query_attention(q, k, v, mask)
            a = linear(merge_heads(heads), *layer.o)
            trace(f"layers.{i}.attn_output", a)
            if c.parallel_residual:
                x = x + a + self.mlp(h, layer)
            else:
                x = x + a
                trace(f"layers.{i}.residual", x)
                x = x + self.mlp(self.norm(x, layer.mlp_norm), layer)
            trace(f"layers.{i}.output", x)
        x = self.norm(x, self.final_norm)
        trace("norm", x)
        if cache is not None:
            cache.length += T
        return self.head(x[:, T - kept:], targets, attention_mask, trace)

    def head(self, x, targets=None, attention_mask=None, trace=no_trace):
        """Logits [B, kept, V] of the final states, or log P(targets) [B, kept] without holding
        the logits (0 at padded positions)."""
        if targets is None:
            logits = x @ self.lm_head.T
            trace("logits", logits)
            return logits
        trace("logits", lambda: x @ self.lm_head.T)  # computed only if a trace asks for it
        if attention_mask is None:
            return K.lm_head_log_probs(x, self.lm_head, targets)
        B, kept, _ = x.shape
        real = np.asarray(attention_mask)[:, -kept:] != 0
        out = np.zeros((B, kept), np.float32)
        out[real] = K.lm_head_log_probs(x[real], self.lm_head, targets[real])
        return out

    def map(self, fn, items, at_once=None):
        """``[fn(item) for item in items]``, several at a time (:meth:`Parallel.map`)."""
        return self.parallel.map(fn, items, at_once)

    def __repr__(self):
        return (f"numba ({self.config.model_type}: npllm.engine.generic, kernels for attention, "
                "RoPE, RMSNorm, SwiGLU, the LM head's log-softmax)")
