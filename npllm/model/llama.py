r"""The Llama forward pass, composed from the lecture equations (lectures 000, 002, 003).

Read it beside the architecture diagram of lecture 003::

    token ids -> embed -> L x [ RMSNorm -> attention (RoPE, grouped-query) -> + residual
                               RMSNorm -> SwiGLU MLP                       -> + residual ]
              -> RMSNorm -> LM head -> logits

Everything is a function of (weights, config, token ids, cache). Weights are a dict keyed by the
Hugging Face tensor names (``model.layers.3.self_attn.q_proj.weight``), each ``[out, in]`` as
``torch.nn.Linear`` stores it, so a linear layer is ``x @ W.T``.

The hot functions (RMSNorm, RoPE, SwiGLU, attention) come from the chosen backend: the Numba
kernels by default, the readable NumPy equations with ``backend="numpy"`` (or
``NPLLM_BACKEND=numpy``). Both give the same numbers.

Decoding (one new token, with a cache) on the Numba backend reads the matrices of the linear
layers in their GGUF blocks when the model has them (``packed``, see :func:`forward`): the same
weights, 5.6 times fewer bytes for the default model. ``NPLLM_PACKED=0`` turns that off.
"""
import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from npllm.backend import blas_threads_spinning, get_backend, note_blas_products
from npllm.equations import (causal_mask, lm_head, merge_heads, rope_cos_sin,
                             rope_inverse_frequencies, split_heads, token_log_probs)
from npllm.model.weights import PackedWeight, stack_adjacent

MASKED = np.finfo(np.float32).min


def linear(x, weight):
    r"""A linear layer without bias, as ``torch.nn.Linear`` stores it: :math:`y = x W^\top`.

    x [..., in], weight [out, in] -> [..., out]. Leading dimensions are flattened so that NumPy
    hands one large matrix product to BLAS. A :class:`~npllm.model.weights.PackedWeight` (W in
    its GGUF blocks, used when decoding) is multiplied by a Numba kernel that expands the
    blocks in registers (:mod:`npllm.kernels.quantized`): the same W, bit for bit.
    """
    if isinstance(weight, PackedWeight):
        return weight.linear(x)
    return (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])


def lm_head_logits(c, W):
    """The LM head, c [..., D] -> logits [..., V] = c W^T, for a float32 or packed W."""
    return linear(c, W) if isinstance(W, PackedWeight) else lm_head(c, W)


def packed_enabled():
    """False when the environment says ``NPLLM_PACKED=0`` (or false, no, off)."""
    return os.environ.get("NPLLM_PACKED", "1").strip().lower() not in ("0", "false", "no", "off")


def linear_weights(weights, packed, decoding, be):
    """The weights the linear layers and the LM head read: ``weights`` with the ``packed``
    matrices in place of their float32 twins when decoding on the Numba backend (and
    ``NPLLM_PACKED`` does not say no); ``weights`` otherwise."""
    if packed and decoding and be.name == "numba" and packed_enabled():
        return {**weights, **packed}
    return weights


def linears(x, weights, fuse=False):
    r"""Several linear layers of the same input: ``[linear(x, w) for w in weights]``.

    With ``fuse`` (the Numba backend), weights that lie one after another in memory (see
    :func:`npllm.model.weights.stack_adjacent`) are one matrix :math:`[W_1; W_2]`, so
    :math:`x [W_1; W_2]^\top = [x W_1^\top, x W_2^\top]` is one larger matrix product (one call of
    BLAS instead of two), whose columns are then split: views, no copy.
    """
    if not fuse:
        return [linear(x, w) for w in weights]
    out = [None] * len(weights)
    for w, which in stack_adjacent(weights):
        y = linear(x, w)
        start = 0
        for i in which:
            out[i] = y[..., start:start + weights[i].shape[0]]
            start += weights[i].shape[0]
    return out


@dataclass
class KVCache:
    r"""The key/value cache of lecture 002: every layer's K and V for the tokens seen so far.

    ``keys[l]`` and ``values[l]`` are ``[B, K, capacity, Dh]``; the first ``length`` positions are
    filled. Decoding one more token then costs one row of attention per layer instead of
    recomputing the whole prefix. Storage grows by doubling, so a decode loop does not allocate
    at every step.
    """
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, config, batch_size=1, capacity=256):
        shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
        return cls._zeros(config.num_hidden_layers, shape)

    @property
    def capacity(self):
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, n_new):
        """Make room for ``n_new`` more positions (double the storage when it is full)."""
        needed = self.length + n_new
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                grown = np.zeros(old.shape[:2] + (capacity,) + old.shape[3:], np.float32)
                grown[:, :, :self.length] = old[:, :, :self.length]
                store[layer] = grown

    def update(self, layer, k, v):
        """Write the new positions' k, v [B, K, T, Dh] of ``layer``; return all keys and values
        so far, [B, K, length + T, Dh] (views, no copy)."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def prefix(self, n, capacity):
        """A new cache holding a copy of the first ``n`` positions of this one, with room for
        ``capacity`` in all: a conversation's next turn starts from the turns before it. This
        cache is left as it is."""
        if not 0 <= n <= min(self.length, capacity):
            raise ValueError(f"a prefix of {n} positions of a cache holding {self.length} "
                             f"does not fit in a capacity of {capacity}")
        B, K, _, Dh = self.keys[0].shape
        copy = KVCache._zeros(len(self.keys), (B, K, capacity, Dh))
        for mine, its in ((self.keys, copy.keys), (self.values, copy.values)):
            for old, new in zip(mine, its):
                new[:, :, :n] = old[:, :, :n]
        copy.length = n
        return copy

    @classmethod
    def _zeros(cls, layers, shape):
        return cls([np.zeros(shape, np.float32) for _ in range(layers)],
                   [np.zeros(shape, np.float32) for _ in range(layers)], 0)

    def __repr__(self):
        if not self.keys:
            return "KVCache(empty)"
        B, K, _, Dh = self.keys[0].shape
        return (f"KVCache(layers={len(self.keys)}, batch={B}, kv_heads={K}, head_dim={Dh}, "
                f"length={self.length}, capacity={self.capacity})")


def attention_block(x, weights, prefix, config, cos, sin, mask, be, cache=None, layer=0,
                    trace=None, decoding=False):
    """Self-attention of one decoder layer: x [B, T, D] -> [B, T, D].

    ``decoding``: one new token per sequence, no padding, and a ``cache``: it attends to every
    cached position, which :func:`~npllm.equations.decode_attention` does without a mask.
    """
    H, K = config.num_attention_heads, config.num_key_value_heads
    q, k, v = linears(x, [weights[prefix + n + "_proj.weight"] for n in "qkv"],
                      fuse=be.name != "numpy")
    q, k, v = split_heads(q, H), split_heads(k, K), split_heads(v, K)  # [B, H or K, T, Dh]
    if trace is not None:
        trace.keep(f"layers.{layer}.q", q)
        trace.keep(f"layers.{layer}.k", k)
        trace.keep(f"layers.{layer}.v", v)
    q, k = rope(q, cos, sin, be), rope(k, cos, sin, be)
    if cache is not None:
        k, v = cache.update(layer, k, v)  # [B, K, S, Dh]
    if trace is not None:
        trace.attention(layer, q, k, v, mask)
    if decoding:
        out = be.decode_attention(q, cache.keys[layer], cache.values[layer], k.shape[2])
    else:
        out = be.grouped_query_attention(q, k, v, mask)  # [B, H, T, Dh]
    if trace is not None:
        trace.keep(f"layers.{layer}.heads", out)
    return linear(merge_heads(out), weights[prefix + "o_proj.weight"])


def rope(x, cos, sin, be):
    """RoPE for x [B, n, T, Dh] with per-sequence cos, sin [B, T, Dh] (positions differ per row
    when a batch is padded on the left), shared by the n heads."""
    return be.apply_rope(x, cos[:, None], sin[:, None])


def mlp_block(x, weights, prefix, be, layer=0, trace=None):
    r"""The SwiGLU MLP, ``down(silu(gate x) * up x)``: x [B, T, D] -> [B, T, D] through width F."""
    gate, up = linears(x, [weights[prefix + "gate_proj.weight"], weights[prefix + "up_proj.weight"]],
                       fuse=be.name != "numpy")  # [B, T, F] each
    if trace is not None:
        trace.mlp(layer, gate, up)
    return linear(be.swiglu(gate, up), weights[prefix + "down_proj.weight"])


def fused_decode_weights(matrices, config):
    """Per layer, ``(qkv, o, gate_up, down)``: its packed matrices as the fused decoding layer
    (:func:`npllm.kernels.decode.decode_layer`) reads them, q, k, v and gate, up each one
    matrix; or None unless every layer's matrices are packed and those groups lie one after
    another in their file (see :func:`~npllm.model.weights.stack_adjacent`; npllm's GGUF import
    writes them so). Then the forward pass composes the step from the kernels instead."""
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = stack_adjacent([matrices[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        gate_up = stack_adjacent([matrices[p + "mlp.gate_proj.weight"],
                                  matrices[p + "mlp.up_proj.weight"]])
        fused = (qkv[0][0], matrices[p + "self_attn.o_proj.weight"], gate_up[0][0],
                 matrices[p + "mlp.down_proj.weight"])
        if (len(qkv) != 1 or qkv[0][1] != [0, 1, 2] or len(gate_up) != 1 or gate_up[0][1] != [0, 1]
                or not all(isinstance(w, PackedWeight) for w in fused)):
            return None
        layers.append(fused)
    return layers


def decode_layers(x, weights, layers, config, cos, sin, cache):
    """Every decoder layer for one new token, one compiled call each (the fused kernel of
    ``npllm/kernels/decode.py``): x [1, 1, D] is updated in place. ``layers`` from
    :func:`fused_decode_weights`; cos, sin [1, 1, Dh]; ``cache`` before its length advances."""
    from npllm.kernels.decode import decode_layer
    from npllm.kernels.quantized import KINDS, one_thread_while

    eps = np.float32(config.rms_norm_eps)
    with one_thread_while(blas_threads_spinning()):
        for i, (qkv, o, gate_up, down) in enumerate(layers):
            p = f"model.layers.{i}."
            decode_layer(x[0, 0], weights[p + "input_layernorm.weight"],
                         qkv.blocks, KINDS[qkv.ggml_type], o.blocks, KINDS[o.ggml_type],
                         weights[p + "post_attention_layernorm.weight"],
                         gate_up.blocks, KINDS[gate_up.ggml_type], down.blocks,
                         KINDS[down.ggml_type], cos[0, 0], sin[0, 0], cache.keys[i][0],
                         cache.values[i][0], cache.length, eps)


def positions_and_mask(B, T, past, attention_mask):
    """Position ids [B, T] and the additive attention mask [B, 1, T, S], S = past + T.

    Without ``attention_mask`` every sequence is whole: positions past, ..., past + T - 1 and
    the causal mask. With ``attention_mask`` [B, S] (1 = real token, 0 = padding, covering cached
    and new positions) a padded position is never attended to and real tokens are numbered
    0, 1, 2, ... whatever padding stands before them, so a padded sequence gives the same numbers
    as the same sequence alone.
    """
    S = past + T
    causal = causal_mask(T, S)  # [T, S]
    if attention_mask is None:
        positions = np.broadcast_to(np.arange(past, S), (B, T))
        return positions, causal[None, None]
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask must have shape (batch, cached + new tokens) = "
                         f"{(B, S)}, got {attention_mask.shape}")
    positions = np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0)[:, past:]
    padded = attention_mask[:, None, None, :] == 0  # [B, 1, 1, S]
    return positions, np.where(padded, MASKED, causal[None, None]).astype(np.float32)


def forward(weights, config, input_ids, cache=None, attention_mask=None, backend=None,
            trace=None, logits_to_keep=None, targets=None, packed=None):
    r"""Logits for every position: token ids [T] or [B, T] -> logits [T, V] or [B, T, V].

    ``logits[t]`` scores the token that follows ``input_ids[: t + 1]``. With a ``cache``
    (:class:`KVCache`), ``input_ids`` are the *new* tokens; their keys and values are appended
    and the cache's length advances. ``trace`` (see :mod:`npllm.trace`) keeps intermediates.

    Two ways to ask for less than every logit (the LM head is a [D, V] matrix product per
    position, a fifth of the model's work):

    - ``logits_to_keep=n``: the logits of the last n positions only, [n, V] or [B, n, V]
      (transformers' argument of the same name; generation needs only the last position's).
    - ``targets`` (ints shaped like ``input_ids``, or like the kept positions): instead of the
      logits, :math:`\log P(\text{targets}[t] \mid \text{input\_ids}[:t+1])`, [T] or [B, T],
      as ``token_log_probs(logits, targets)`` computes them from the logits (lecture 000's chain
      rule, for scoring). The Numba backend then never holds the [T, V] logits at once. With an
      ``attention_mask``, padded positions get 0: their LM head is not computed.

    ``packed``: ``{name: PackedWeight}``, the matrices of the linear layers and the LM head in
    their GGUF blocks (:func:`npllm.model.weights.load_packed`). Used only when decoding (one
    new token per sequence, a ``cache``, no ``attention_mask``) on the Numba backend, and
    unless ``NPLLM_PACKED=0``: each token then reads 96 MB instead of 538 MB for the default
    model. The weights are bit-identical to the float32 ones; only the order of the float32
    additions differs, so the logits agree with float32 decoding to float32 rounding.

    On the Numba backend, two more choices change how fast, not what, it computes: decoding one
    sequence from packed weights runs each layer in one compiled call
    (:func:`decode_layers`), and one sequence of many tokens runs as two concurrent passes over
    its two parts (:mod:`npllm.model.threads`). Both run the steps of the loop below.
    """
    be = get_backend(backend)
    ids = np.asarray(input_ids)
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers of shape [T] or [B, T], got "
                         f"{ids.dtype} {ids.shape}")
    single = ids.ndim == 1
    ids = ids.reshape(1, -1) if single else ids
    B, T = ids.shape
    if T == 0:
        raise ValueError("input_ids is empty: give at least one token")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {config.vocab_size}), got ids from "
                         f"{ids.min()} to {ids.max()}")
    if logits_to_keep is not None and not 0 < logits_to_keep <= T:
        raise ValueError(f"logits_to_keep must be between 1 and the {T} new tokens, "
                         f"got {logits_to_keep}")
    kept = logits_to_keep or T
    if targets is not None:
        targets = np.asarray(targets)
        if targets.shape != ids.shape[single:-1] + (kept,) or not np.issubdtype(
                targets.dtype, np.integer):
            raise ValueError(f"targets must be integers shaped like the kept positions "
                             f"{ids.shape[single:-1] + (kept,)}, got {targets.dtype} "
                             f"{targets.shape}")
        if targets.size and (targets.min() < 0 or targets.max() >= config.vocab_size):
            raise ValueError(f"targets must lie in [0, {config.vocab_size})")
    if (be.name == "numba" and attention_mask is None and trace is None
            and (targets is None or logits_to_keep is None)):
        from npllm.model import threads
        if threads.pays(B, T):  # a long sequence: both cores on every step, see there
            run = partial(forward, weights, config, backend=be.name, packed=packed)
            out = threads.forward_on_two_threads(
                run, config, ids, None if targets is None else targets.reshape(B, T),
                cache=cache, logits_to_keep=logits_to_keep)
            return out[0] if single else out
    past = cache.length if cache is not None else 0
    positions, mask = positions_and_mask(B, T, past, attention_mask)
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(config.head_dim, config.rope_theta))
    if cache is not None:
        cache.reserve(T)
    decoding = cache is not None and T == 1 and attention_mask is None
    matrices = linear_weights(weights, packed, decoding, be)

    eps = config.rms_norm_eps
    x = weights["model.embed_tokens.weight"][ids]  # [B, T, D]
    if trace is not None:
        trace.keep("embeddings", x)
    # Decoding one sequence from packed weights: each layer in one compiled call, the same steps
    # as the loop below (which is what a reader should read).
    fused = (decoding and matrices is not weights and B == 1 and trace is None
             and fused_decode_weights(matrices, config))
    if fused:
        decode_layers(x, weights, fused, config, cos, sin, cache)
    for i in range(0 if fused else config.num_hidden_layers):
        p = f"model.layers.{i}."
        h = be.rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        a = attention_block(h, matrices, p + "self_attn.", config, cos, sin, mask, be,
                            cache, i, trace, decoding=decoding)
        if trace is not None:
            trace.keep(f"layers.{i}.attn_norm", h)
            trace.keep(f"layers.{i}.attn_output", a)
        x = x + a
        h = be.rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        m = mlp_block(h, matrices, p + "mlp.", be, i, trace)
        if trace is not None:
            trace.keep(f"layers.{i}.residual", x)
            trace.keep(f"layers.{i}.mlp_norm", h)
            trace.keep(f"layers.{i}.mlp_output", m)
        x = x + m
        if trace is not None:
            trace.keep(f"layers.{i}.output", x)
    x = be.rms_norm(x, weights["model.norm.weight"], eps)
    if trace is not None:
        trace.keep("norm", x)
    x = x[:, T - kept:]  # the positions whose predictions are wanted
    W = matrices["lm_head.weight"]
    if targets is None:  # logits [B, T, V], from one [B * T, D] x [D, V] product
        out = lm_head_logits(x.reshape(-1, x.shape[-1]), W).reshape(B, kept, -1)
    elif isinstance(W, PackedWeight):  # decoding: one position's logits, then log P(target)
        out = token_log_probs(lm_head_logits(x, W), targets.reshape(B, kept))
    elif attention_mask is None:  # log P(targets | ...) [B, T]: LM head, log-softmax, targets
        out = be.lm_head_log_probs(x, W, targets.reshape(B, kept))
    else:  # the same where there is a token; padding's predictions are not computed (0)
        real = np.asarray(attention_mask)[:, -kept:] != 0  # [B, kept]
        out = np.zeros((B, kept), np.float32)
        out[real] = be.lm_head_log_probs(x[real], W, targets.reshape(B, kept)[real])
    if trace is not None:
        trace.keep("logits", out if targets is None else (lambda: lm_head_logits(x, W)))
    if cache is not None:
        cache.length += T
    if matrices is weights:  # the linear layers were BLAS products: its threads spin a while
        note_blas_products()
    return out[0] if single else out


class Model:
    """Weights, config and tokenizer together, as ``npllm.load`` returns them.

    ``model(ids)`` runs :func:`forward`; ``print(model)`` shows the module tree with shapes and
    parameter counts, the way lecture 000 prints a model first.

    ``packed``: the matrices in their GGUF blocks (``{name: PackedWeight}``, empty for models
    that have none), read when decoding on the Numba backend (see :func:`forward`). To decode
    from the float32 weights instead: ``model(ids, cache=c, packed=False)``, or
    ``NPLLM_PACKED=0``, or ``npllm.load(name, packed=False)``.
    """

    def __init__(self, config, weights, tokenizer=None, source="", folder=None, backend=None,
                 packed=None):
        self.config, self.weights, self.tokenizer = config, weights, tokenizer
        self.source, self.folder, self.backend = source, folder, backend
        self.packed = packed or {}

    def forward(self, input_ids, cache=None, attention_mask=None, backend=None, trace=None,
                logits_to_keep=None, targets=None, packed=True):
        return forward(self.weights, self.config, input_ids, cache=cache,
                       attention_mask=attention_mask, backend=backend or self.backend,
                       trace=trace, logits_to_keep=logits_to_keep, targets=targets,
                       packed=self.packed if packed else None)

    __call__ = forward

    def new_cache(self, batch_size=1, capacity=256):
        return KVCache.empty(self.config, batch_size, capacity)

    def num_parameters(self):
        """Parameters counted once each (tied embeddings share one matrix, as in transformers)."""
        unique = {id(w): w.size for w in self.weights.values()}
        return sum(unique.values())

    def __repr__(self):
        return module_tree(self.config, self.weights, self.packed)


def module_tree(config, weights, packed=None):
    """The model as transformers prints it, with shapes, parameter counts and shares (and a
    line on the ``packed`` weights, if any)."""
    c, total = config, sum({id(w): w.size for w in weights.values()}.values())
    tied = weights["lm_head.weight"] is weights["model.embed_tokens.weight"]

    def n(names):
        return sum(weights[name].size for name in names)

    layer = [k for k in weights if k.startswith("model.layers.0.")]
    attn = n(k for k in layer if ".self_attn." in k) * c.num_hidden_layers
    mlp = n(k for k in layer if ".mlp." in k) * c.num_hidden_layers
    norms = n(k for k in layer if "layernorm" in k) * c.num_hidden_layers + c.hidden_size
    embed = weights["model.embed_tokens.weight"].size
    head = 0 if tied else weights["lm_head.weight"].size

    def share(count):
        return f"{count:>13,}  {100 * count / total:5.1f}%"

    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    Hd, Kd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    lines = [
        f"LlamaForCausalLM  ({total:,} parameters, float32, "
        f"{c.num_attention_heads} query / {c.num_key_value_heads} key-value heads of width {c.head_dim})",
        "  (model): LlamaModel",
        f"    (embed_tokens): Embedding({V}, {D})".ljust(64) + share(embed),
        f"    (layers): {c.num_hidden_layers} x LlamaDecoderLayer",
        f"      (self_attn): LlamaAttention".ljust(64) + share(attn),
        f"        (q_proj): Linear({D} -> {Hd})",
        f"        (k_proj): Linear({D} -> {Kd})",
        f"        (v_proj): Linear({D} -> {Kd})",
        f"        (o_proj): Linear({Hd} -> {D})",
        f"        RoPE(head_dim={c.head_dim}, theta={c.rope_theta:g})",
        f"      (mlp): LlamaMLP".ljust(64) + share(mlp),
        f"        (gate_proj): Linear({D} -> {F})",
        f"        (up_proj): Linear({D} -> {F})",
        f"        (down_proj): Linear({F} -> {D})",
        f"        (act_fn): SiLU",
        f"      (input_layernorm): RMSNorm({D}, eps={c.rms_norm_eps:g})",
        f"      (post_attention_layernorm): RMSNorm({D}, eps={c.rms_norm_eps:g})",
        f"    (norm): RMSNorm({D}, eps={c.rms_norm_eps:g})".ljust(64) + share(norms) + "  (all norms)",
        f"  (lm_head): Linear({D} -> {V})".ljust(64)
        + (" tied to embed_tokens (shares its matrix)" if tied else share(head)),
    ]
    if packed:
        kinds = {}
        for w in {id(w): w for w in packed.values()}.values():
            kinds[w.ggml_type] = kinds.get(w.ggml_type, 0) + 1
        count = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        size = sum({id(w): w.nbytes for w in packed.values()}.values()) / 2**20
        lines.append(f"packed: {count} matrices in their GGUF blocks ({size:.1f} MiB), read when "
                     f"decoding on the Numba backend (off: NPLLM_PACKED=0)")
    return "\n".join(lines)
