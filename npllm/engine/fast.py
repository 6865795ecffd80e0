r"""The Numba engine: the reference forward pass (:func:`npllm.model.llama.forward`), fast.

The same steps in the same order, with four kinds of speed that the reference leaves out, each
decided once, when the engine is made from the weights, and each tested equal to the reference
(``tests/test_engine.py``):

1. **Kernels.** RMSNorm, RoPE, attention, SwiGLU and the LM head's log-softmax are the Numba
   twins of the equations (:mod:`npllm.kernels`).
2. **Fused projections.** q, k, v (and gate, up) stored one after another are one matrix product
   (:class:`~npllm.engine.packed.Projection`).
3. **Packed decoding.** A model imported from GGUF decodes (one new token, a KV cache) from the
   matrices' GGUF blocks (:mod:`npllm.engine.packed`), and, when q/k/v and gate/up lie next to
   each other, each layer in one compiled call (:func:`npllm.kernels.decode.decode_layer`, the
   step llama2.c writes).
4. **Threads.** A long sequence runs in parts and a chunk's batches run several at once, one per
   core (:mod:`npllm.engine.threads`); the log-probabilities of the targets are computed without
   ever holding the [T, V] logits (:func:`npllm.kernels.lm_head_log_probs`), and for a long
   sequence by slices of the vocabulary, one per core, after the parts have joined their final
   states: each slice of W is then read once, for every row, in products of all the rows.

After products with BLAS on several threads, OpenBLAS keeps its threads spinning for a while,
ready for the next product (2^``OPENBLAS_THREAD_TIMEOUT`` cycles, 2^28 by default: about 0.1 s).
A Numba parallel loop started meanwhile fights them for the cores, so the first decoding steps
after a prompt would run several times slower: until the spin is over, packed products run on
the calling thread (:class:`BlasSpin`).
"""
import os
import time

import numpy as np

from npllm import kernels as K
from npllm.engine.packed import PackedWeight, Projection, load_packed, matmul
from npllm.engine.threads import MIN_PART_TOKENS, Parallel, blas_threads
from npllm.engine.warm import WarmUp
from npllm.equations import (merge_heads, rope_cos_sin, rope_inverse_frequencies, split_heads,
                             token_log_probs)
from npllm.model.inputs import positions_and_mask
from npllm.trace import no_trace


class BlasSpin:
    """When BLAS's threads, woken by the last products on several threads, may still spin."""

    def __init__(self):
        self.woken = -np.inf
        self.seconds = spin_seconds()

    def note(self):
        if blas_threads() > 1:
            self.woken = time.monotonic()

    def spinning(self):
        return time.monotonic() - self.woken < self.seconds


def spin_seconds():
    """How long OpenBLAS's idle threads spin: 2^``OPENBLAS_THREAD_TIMEOUT`` cycles (default 28,
    clamped to 4..30 as OpenBLAS does) at the processor's clock."""
    try:
        timeout = min(max(int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", 28)), 4), 30)
    except ValueError:
        timeout = 28
    hz = 2.5e9  # where the clock cannot be read
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        hz = max(mhz) * 1e6 if mhz else hz
    except (OSError, ValueError):
        pass
    return 2.0 ** timeout / hz


class Layer:
    """One decoder layer's weights as the engine multiplies them."""

    def __init__(self, weights, i, matrices):
        p = f"model.layers.{i}."
        self.attn_norm = weights[p + "input_layernorm.weight"]
        self.mlp_norm = weights[p + "post_attention_layernorm.weight"]
        m = {n: matrices[p + n + ".weight"] for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        self.qkv = Projection(m["self_attn.q_proj"], m["self_attn.k_proj"], m["self_attn.v_proj"])
        self.o = Projection(m["self_attn.o_proj"])
        self.gate_up = Projection(m["mlp.gate_proj"], m["mlp.up_proj"])
        self.down = Projection(m["mlp.down_proj"])

    def fused(self):
        """The blocks :func:`~npllm.kernels.decode.decode_layer` reads, or None unless every
        matrix is packed and q/k/v and gate/up are one matrix each."""
        groups = (self.qkv.groups, self.o.groups, self.gate_up.groups, self.down.groups)
        if not all(len(g) == 1 and isinstance(g[0][0], PackedWeight) for g in groups):
            return None
        return [g[0][0] for g in groups]


class NumbaEngine(WarmUp):
    """The forward pass with Numba kernels, fused and packed matrices and threads (see the
    module docstring). ``packed``: ``{name: PackedWeight}`` read when decoding (see
    :func:`~npllm.engine.packed.load_packed`). ``threads``: how many to use (None: the
    machine's, as BLAS and Numba are configured); ``min_part_tokens``: the fewest tokens a part
    of a long sequence gets (:data:`~npllm.engine.threads.MIN_PART_TOKENS`)."""

    name = "numba"

    def __init__(self, config, weights, packed=None, threads=None,
                 min_part_tokens=MIN_PART_TOKENS):
        self.config, self.weights, self.packed = config, weights, dict(packed or {})
        L = config.num_hidden_layers
        self.layers = [Layer(weights, i, weights) for i in range(L)]
        self.lm_head = weights["lm_head.weight"]
        self.decode_layers, self.decode_lm_head, self.fused = None, self.lm_head, None
        if self.packed:
            matrices = {**weights, **self.packed}
            self.decode_layers = [Layer(weights, i, matrices) for i in range(L)]
            self.decode_lm_head = matrices["lm_head.weight"]
            fused = [layer.fused() for layer in self.decode_layers]
            self.fused = fused if all(f is not None for f in fused) else None
        self.parallel = Parallel(threads, min_part_tokens)
        self.blas = BlasSpin()

    def __call__(self, inputs, cache=None, attention_mask=None, trace=no_trace):
        """Logits [B, kept, V], or log P(targets) [B, kept] (:class:`~npllm.model.inputs.Inputs`)."""
        B, T = inputs.ids.shape
        if cache is not None and T == 1 and attention_mask is None and self.decode_layers:
            return self.decode(inputs, cache, trace)
        whole = inputs.targets is None or inputs.kept == T
        n = self.parallel.parts(B, T) if attention_mask is None and trace is no_trace and whole \
            else 1
        if n > 1 and inputs.targets is not None:
            # The parts stop at the final states; the LM head is cut by the vocabulary instead
            # (every row of the sequence against a slice of W on each thread).
            x = self.parallel.forward_in_parts(self._states, self.config, inputs.ids, n, cache,
                                               inputs.kept, head=False)
            return K.lm_head_log_probs(x, self.lm_head, inputs.targets, slices=n,
                                       map=self.parallel.map)
        if n > 1:
            return self.parallel.forward_in_parts(self._logits, self.config, inputs.ids, n,
                                                  cache, inputs.kept)
        out = self.forward(inputs.ids, cache, attention_mask, trace, inputs.kept, inputs.targets)
        self.blas.note()  # its float32 products ran on BLAS's threads
        return out

    def _states(self, ids, cache, kept):
        return self.states(ids, cache, None, no_trace, kept)

    def _logits(self, ids, cache, kept):
        return self.forward(ids, cache, None, no_trace, kept)

    def forward(self, ids, cache=None, attention_mask=None, trace=no_trace, kept=None,
                targets=None, layers=None, lm_head=None, one_thread=False):
        """The reference forward pass's steps with the kernels: ids [B, T] -> logits
        [B, kept, V], or log P(targets [B, kept]) [B, kept]. ``layers``, ``lm_head``: the
        matrices to multiply by (the float32 ones by default)."""
        x = self.states(ids, cache, attention_mask, trace, kept, layers, one_thread)
        return self.head(x, lm_head, targets, attention_mask, trace, one_thread)

    def states(self, ids, cache=None, attention_mask=None, trace=no_trace, kept=None,
               layers=None, one_thread=False):
        """The forward pass up to the LM head: ids [B, T] -> the final (normed) states of the
        kept positions, [B, kept, D]."""
        config, layers = self.config, layers or self.layers
        B, T = ids.shape
        kept = kept or T
        H, Kv, eps = config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps
        past = 0 if cache is None else cache.length
        positions, mask = positions_and_mask(B, T, past, attention_mask)
        cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(config.head_dim,
                                                                    config.rope_theta))
        cos, sin = cos[:, None], sin[:, None]
        decoding = cache is not None and T == 1 and attention_mask is None
        trace("mask", mask)
        if cache is not None:
            cache.reserve(T)

        x = self.weights["model.embed_tokens.weight"][ids]
        trace("embeddings", x)
        for i, w in enumerate(layers):
            h = K.rms_norm(x, w.attn_norm, eps)
            trace(f"layers.{i}.attn_norm", h)
            q, k, v = w.qkv(h, one_thread)
            q, k, v = split_heads(q, H), split_heads(k, Kv), split_heads(v, Kv)
            trace(f"layers.{i}.q", q)
            trace(f"layers.{i}.k", k)
            trace(f"layers.{i}.v", v)
            q, k = K.apply_rope(q, cos, sin), K.apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.update(i, k, v)
            trace(f"layers.{i}.q_rope", q)
            trace(f"layers.{i}.k_rope", k)
            if decoding:  # the last position sees every cached one: no mask
                heads = K.decode_attention(q, cache.keys[i], cache.values[i], k.shape[2])
            else:
                heads = K.grouped_query_attention(q, k, v, mask)
            trace(f"layers.{i}.heads", heads)
            (a,) = w.o(merge_heads(heads), one_thread)
            trace(f"layers.{i}.attn_output", a)
            x = x + a
            trace(f"layers.{i}.residual", x)
            h = K.rms_norm(x, w.mlp_norm, eps)
            trace(f"layers.{i}.mlp_norm", h)
            gate, up = w.gate_up(h, one_thread)
            (m,) = w.down(K.swiglu(gate, up), one_thread)
            trace(f"layers.{i}.mlp_output", m)
            x = x + m
            trace(f"layers.{i}.output", x)
        x = K.rms_norm(x, self.weights["model.norm.weight"], eps)
        trace("norm", x)
        if cache is not None:
            cache.length += T
        return x[:, T - kept:]

    def head(self, x, W=None, targets=None, attention_mask=None, trace=no_trace,
             one_thread=False):
        """The LM head of the final states x [B, kept, D]: logits [B, kept, V], or
        log P(targets) [B, kept] without holding the logits (0 at padded positions)."""
        W = self.lm_head if W is None else W
        B, kept, D = x.shape

        def logits():
            if isinstance(W, PackedWeight):
                return W.linear(x, one_thread)
            return matmul(x, W)
        if targets is None:
            out = logits()
            trace("logits", out)
            return out
        trace("logits", logits)  # computed only if a trace asks for it
        if isinstance(W, PackedWeight):  # decoding: one position
            return token_log_probs(logits(), targets)
        if attention_mask is None:
            return K.lm_head_log_probs(x, W, targets)
        real = np.asarray(attention_mask)[:, -kept:] != 0  # padding: not computed (0)
        out = np.zeros((B, kept), np.float32)
        out[real] = K.lm_head_log_probs(x[real], W, targets[real])
        return out

    def decode(self, inputs, cache, trace=no_trace):
        """One new token per sequence with a KV cache, from the packed matrices: each layer in one
        compiled call when it can (one sequence, nobody tracing), else composed as in
        :meth:`forward`."""
        from npllm.kernels.decode import decode_layer
        from npllm.kernels.quantized import KINDS, one_thread_while

        one_thread = self.blas.spinning()
        ids = inputs.ids
        if self.fused is None or ids.shape[0] != 1 or trace is not no_trace:
            return self.forward(ids, cache, None, trace, inputs.kept, inputs.targets,
                                self.decode_layers, self.decode_lm_head, one_thread)
        config, past = self.config, cache.length
        cos, sin = rope_cos_sin(np.array([[past]]), rope_inverse_frequencies(config.head_dim,
                                                                             config.rope_theta))
        cache.reserve(1)
        x = np.array(self.weights["model.embed_tokens.weight"][ids], np.float32)  # [1, 1, D]
        eps = np.float32(config.rms_norm_eps)
        with one_thread_while(one_thread):
            for i, (layer, (qkv, o, gate_up, down)) in enumerate(zip(self.decode_layers,
                                                                    self.fused)):
                decode_layer(x[0, 0], layer.attn_norm, qkv.blocks, KINDS[qkv.ggml_type],
                             o.blocks, KINDS[o.ggml_type], layer.mlp_norm, gate_up.blocks,
                             KINDS[gate_up.ggml_type], down.blocks, KINDS[down.ggml_type],
                             cos[0, 0], sin[0, 0], cache.keys[i][0], cache.values[i][0], past,
                             eps)
        cache.length += 1
        x = K.rms_norm(x, self.weights["model.norm.weight"], eps)
        return self.head(x, self.decode_lm_head, inputs.targets, one_thread=one_thread)

    def map(self, fn, items, at_once=None):
        """``[fn(item) for item in items]``, several at a time (:meth:`Parallel.map`)."""
        return self.parallel.map(fn, items, at_once)

    def __repr__(self):
        n = self.parallel.threads
        parts = [f"numba ({n} thread{'s' if n > 1 else ''})"]
        if self.packed:
            kinds = {}
            for w in {id(w): w for w in self.packed.values()}.values():
                kinds[w.ggml_type] = kinds.get(w.ggml_type, 0) + 1
            count = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
            size = sum({id(w): w.nbytes for w in self.packed.values()}.values()) / 2**20
            parts.append(f"decoding from {count} matrices in their GGUF blocks ({size:.1f} MiB)")
        return "; ".join(parts)


def load_numba_engine(config, weights, folder=None, packed=True, threads=None):
    """The Numba engine for the model in ``folder``, with its packed matrices unless ``packed``
    is false."""
    tied = weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    blocks = load_packed(folder, config, tied) if packed and folder is not None else {}
    return NumbaEngine(config, weights, blocks, threads)
