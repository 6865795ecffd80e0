r"""The Llama model's loss and its gradient with respect to every weight (lectures 000 and 004).

Read it beside :mod:`npllm.model.llama`: :func:`forward` is the same pass, written to keep what
the backward pass needs (each layer's input, its normalised input, q, k after RoPE, v, the
attention weights A, the gated MLP's two halves...); :func:`backward` walks the same diagram in
reverse, one ``*_backward`` equation of :mod:`npllm.equations.grad` per forward equation::

    loss <- log-softmax <- LM head <- RMSNorm <- L x [ + residual <- SwiGLU MLP <- RMSNorm
                                                       + residual <- attention (RoPE, GQA) <- RMSNorm ]
         <- embed <- token ids

Weights are the dict of Hugging Face names that ``npllm.load`` gives (``model.weights``); the
gradients come back as a dict with the same names and shapes. With tied embeddings
(``lm_head.weight`` is the embedding matrix) the two uses' gradients are added, and both names
map to that one array, as the weights do. The loss is the mean cross-entropy over every target
token, :math:`\mathcal{L} = -\frac{1}{N}\sum_i \log P(s_i \mid s_{<i})`, the number npllm's
forward pass gives as ``-model(ids, targets=targets).mean()``.
"""
from functools import lru_cache
from types import SimpleNamespace

import numpy as np

from npllm.equations import (apply_rope, apply_rope_backward, attention_pattern, causal_mask,
                             cross_entropy, cross_entropy_backward, embedding_backward,
                             grouped_query_attention_backward, linear_backward, lm_head,
                             lm_head_backward, merge_heads, repeat_kv, residual_backward, rms_norm,
                             rms_norm_backward, rope_cos_sin, rope_inverse_frequencies,
                             split_heads, swiglu, swiglu_backward)


def linear(x, W):
    r""":math:`y = x W^\top` for x [..., in], W [out, in] (``nn.Linear`` without bias), with the
    positions flattened into one matrix product."""
    return (x.reshape(-1, x.shape[-1]) @ W.T).reshape(*x.shape[:-1], W.shape[0])


@lru_cache(maxsize=None)
def _blas():
    from threadpoolctl import ThreadpoolController  # a dependency of npllm
    return ThreadpoolController()


def one_blas_thread():
    """A context in which NumPy's matrix products run on one thread. Attention multiplies one
    [T, Dh] matrix per head (thousands of small products per training step): sharing each
    between BLAS threads costs more in synchronisation than it saves, and on a busy machine
    made the whole step about a third slower. The model's large products keep every thread."""
    return _blas().limit(limits=1, user_api="blas")


def loss_and_grads(weights, config, input_ids, targets, padding_idx=None):
    r"""The mean cross-entropy of ``targets`` given ``input_ids``, and its gradient for every weight.

    input_ids, targets int [B, T] (or [T]); targets[t] is the token that should follow
    input_ids[: t + 1] (for a text, ``input_ids = ids[:-1]``, ``targets = ids[1:]``)
    -> (loss: float, grads: {HF name: array}). Equals transformers'
    ``F.cross_entropy(model(input_ids).logits, targets).backward()`` (tests/test_training_grads.py).
    ``padding_idx``: the embedding row that gets no gradient from the lookup, transformers'
    ``pad_token_id`` (its ``nn.Embedding(..., padding_idx)``); None trains every row.
    """
    input_ids, targets = np.atleast_2d(input_ids), np.atleast_2d(targets)
    if input_ids.shape != targets.shape:
        raise ValueError(f"targets must have input_ids' shape {input_ids.shape}, got {targets.shape}")
    loss, saved = forward(weights, config, input_ids, targets)
    return loss, backward(weights, config, saved, input_ids, targets, padding_idx)


def attend(q, k, v, mask):
    """Causal grouped-query attention, keeping its pattern for the backward pass: q [B, H, T, Dh],
    k, v [B, K, T, Dh] -> (A [B, H, T, T], heads [B, T, H Dh]). Its products are small (one
    [T, Dh] matrix per head), so they run with BLAS on one thread (:func:`one_blas_thread`)."""
    group = q.shape[1] // k.shape[1]
    with one_blas_thread():
        A = attention_pattern(q, repeat_kv(k, group), mask)
        return A, merge_heads(A @ repeat_kv(v, group))


def attend_backward(d_heads, s):
    """The backward of :func:`attend` (:func:`~npllm.equations.grouped_query_attention_backward`)
    from the layer's saved q, k, v and pattern, on one BLAS thread as :func:`attend`."""
    with one_blas_thread():
        return grouped_query_attention_backward(d_heads, s.q, s.k, s.v, s.A)


def forward(weights, config, ids, targets):
    """The forward pass of :mod:`npllm.model.llama` for ids [B, T], without a cache or padding:
    -> (loss, saved), ``saved`` holding what :func:`backward` reads."""
    H, K, eps = config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps
    B, T = ids.shape
    cos, sin = rope_cos_sin(np.broadcast_to(np.arange(T), (B, T)),
                            rope_inverse_frequencies(config.head_dim, config.rope_theta))
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh]: shared by the heads
    mask = causal_mask(T)
    layers = []
    x = weights["model.embed_tokens.weight"][ids]  # [B, T, D]
    for i in range(config.num_hidden_layers):
        w = layer_weights(weights, i)
        s = SimpleNamespace(x=x)
        s.h = rms_norm(x, w.input_norm, eps)
        s.q = apply_rope(split_heads(linear(s.h, w.q), H), cos, sin)  # [B, H, T, Dh]
        s.k = apply_rope(split_heads(linear(s.h, w.k), K), cos, sin)  # [B, K, T, Dh]
        s.v = split_heads(linear(s.h, w.v), K)
        s.A, s.heads = attend(s.q, s.k, s.v, mask)  # [B, H, T, T], [B, T, H * Dh]
        x = x + linear(s.heads, w.o)
        s.x_mid = x
        s.h2 = rms_norm(x, w.post_norm, eps)
        s.gate, s.up = linear(s.h2, w.gate), linear(s.h2, w.up)  # [B, T, F]
        s.act = swiglu(s.gate, s.up)
        x = x + linear(s.act, w.down)
        layers.append(s)
    final = rms_norm(x, weights["model.norm.weight"], eps)
    logits = lm_head(final, weights["lm_head.weight"])  # [B, T, V]
    saved = SimpleNamespace(layers=layers, x=x, final=final, logits=logits, cos=cos, sin=sin)
    return float(cross_entropy(logits, targets)), saved


def backward(weights, config, saved, ids, targets, padding_idx=None):
    """The gradients of the loss of :func:`forward` for every weight, in reverse order."""
    H, eps = config.num_attention_heads, config.rms_norm_eps
    grads = {}
    d_logits = cross_entropy_backward(saved.logits, targets)
    d_final, d_head = lm_head_backward(d_logits, saved.final, weights["lm_head.weight"])
    d_x, grads["model.norm.weight"] = rms_norm_backward(d_final, saved.x, weights["model.norm.weight"], eps)
    for i in reversed(range(config.num_hidden_layers)):
        w, s, g = layer_weights(weights, i), saved.layers[i], {}
        # x_out = x_mid + MLP(RMSNorm(x_mid))
        d_x, d_mlp = residual_backward(d_x)
        d_act, g["mlp.down_proj"] = linear_backward(d_mlp, s.act, w.down)
        d_gate, d_up = swiglu_backward(d_act, s.gate, s.up)
        d_h2_gate, g["mlp.gate_proj"] = linear_backward(d_gate, s.h2, w.gate)
        d_h2_up, g["mlp.up_proj"] = linear_backward(d_up, s.h2, w.up)
        d_norm, g["post_attention_layernorm"] = rms_norm_backward(d_h2_gate + d_h2_up, s.x_mid,
                                                                  w.post_norm, eps)
        d_x = d_x + d_norm
        # x_mid = x + attention(RMSNorm(x))
        d_x, d_attn = residual_backward(d_x)
        d_heads, g["self_attn.o_proj"] = linear_backward(d_attn, s.heads, w.o)
        d_q, d_k, d_v = attend_backward(split_heads(d_heads, H), s)
        d_q = apply_rope_backward(d_q, saved.cos, saved.sin)
        d_k = apply_rope_backward(d_k, saved.cos, saved.sin)
        d_h_q, g["self_attn.q_proj"] = linear_backward(merge_heads(d_q), s.h, w.q)
        d_h_k, g["self_attn.k_proj"] = linear_backward(merge_heads(d_k), s.h, w.k)
        d_h_v, g["self_attn.v_proj"] = linear_backward(merge_heads(d_v), s.h, w.v)
        d_norm, g["input_layernorm"] = rms_norm_backward(d_h_q + d_h_k + d_h_v, s.x, w.input_norm, eps)
        d_x = d_x + d_norm
        grads.update({f"model.layers.{i}.{name}.weight": grad for name, grad in g.items()})
    d_embed = embedding_backward(d_x, ids, config.vocab_size, padding_idx)
    if weights["lm_head.weight"] is weights["model.embed_tokens.weight"]:  # tied: one matrix
        grads["model.embed_tokens.weight"] = grads["lm_head.weight"] = d_embed + d_head
    else:
        grads["model.embed_tokens.weight"], grads["lm_head.weight"] = d_embed, d_head
    return {name: grads[name] for name in weights}  # in the weights' order


def layer_weights(weights, i):
    """Layer i's weights under short names (q, k, v, o, gate, up, down, input_norm, post_norm)."""
    p = f"model.layers.{i}."
    return SimpleNamespace(
        q=weights[p + "self_attn.q_proj.weight"], k=weights[p + "self_attn.k_proj.weight"],
        v=weights[p + "self_attn.v_proj.weight"], o=weights[p + "self_attn.o_proj.weight"],
        gate=weights[p + "mlp.gate_proj.weight"], up=weights[p + "mlp.up_proj.weight"],
        down=weights[p + "mlp.down_proj.weight"], input_norm=weights[p + "input_layernorm.weight"],
        post_norm=weights[p + "post_attention_layernorm.weight"])
