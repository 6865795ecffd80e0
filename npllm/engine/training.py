r"""The training engine: :func:`npllm.training.loss_and_grads` (the reference forward and
backward of :mod:`npllm.training.backprop`), fast.

The same steps in the same order, forward then backward, each tested equal to the reference
(``tests/test_training_engine.py``), with four kinds of speed the reference leaves out:

1. **Every core on every step.** One training step has no independent passes to run side by
   side (as the inference engine does, :mod:`npllm.engine.threads`), so each step is split
   instead: the output features of each product with the weights (the rows of dW for the
   weights' gradients), the rows (tokens) of the element-wise equations, the heads of
   attention, between a team of threads (:class:`Team`) with BLAS on one thread per call. The
   element-wise work, a third of a step on one core, then runs on every core too, and no
   thread waits on BLAS's spinning workers (see ``npllm/kernels/_parallel.py``): on a machine
   that other work shares, BLAS's own threads wait for the slowest of them at every product.
2. **Kernels.** RMSNorm, RoPE, the causal softmax, SwiGLU and their backward equations, and
   the cross-entropy with its gradient in one pass over the logits (in place: no [T, V]
   temporaries), are the Numba twins of :mod:`npllm.kernels.training`.
3. **Fused projections.** q, k, v (and gate, up) whose weights lie one after another in memory
   (:func:`trainable_weights` makes the trainable copies that way) are one matrix product
   forward, :math:`x [W_q; W_k; W_v]^\top`, and two backward: :math:`\bar x = [\bar q\ \bar k\
   \bar v] [W_q; W_k; W_v]` and :math:`[\bar W_q; \bar W_k; \bar W_v] = [\bar q\ \bar k\
   \bar v]^\top x`, whose gradient is one array with the three as row blocks (views).
4. **Fewer copies.** Activations stay [N, width] matrices of rows (heads are column slices, not
   transposed copies); the logits become their gradient, the gate/up activations theirs, in
   place; with tied embeddings the lookup's gradient is added into the LM head's.
"""
import itertools
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from npllm.engine.packed import stack_adjacent
from npllm.engine.threads import blas_on_one_thread, drain_together, machine_threads
from npllm.equations import rope_cos_sin, rope_inverse_frequencies
from npllm.kernels import training as KT

# Fewest rows (tokens, or a product's output features) per thread in a split: fewer run on
# fewer threads (a product of a few rows or columns on one thread is below BLAS's rate, and the
# split's bookkeeping would cost more than it saves).
MIN_ROWS = 32


def trainable_weights(weights, config):
    """Writable float32 copies of a model's weights for training (``{HF name: array}``, a tied
    pair one array as in ``weights``), each layer's q, k, v projections one after another in
    one block of memory, and its gate and up projections in another, so that the training
    engine multiplies each group in one product (:func:`npllm.engine.packed.stack_adjacent`
    finds them). The optimizer updates these arrays in place, so they stay adjacent."""
    out, copies = {}, {}
    groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              ("mlp.gate_proj", "mlp.up_proj"))
    for i in range(config.num_hidden_layers):
        for group in groups:
            names = [f"model.layers.{i}.{n}.weight" for n in group]
            if not all(n in weights for n in names):
                continue
            block = np.concatenate([np.asarray(weights[n], np.float32) for n in names])
            start = 0
            for n in names:
                rows = weights[n].shape[0]
                out[n] = block[start:start + rows]
                copies[id(weights[n])] = out[n]
                start += rows
    for name, w in weights.items():
        if name not in out:
            if id(w) not in copies:
                copies[id(w)] = np.array(w, np.float32)
            out[name] = copies[id(w)]
    return {name: out[name] for name in weights}  # in the weights' order


class Team:
    """``threads`` threads (the caller's included) that run a step's tasks: :meth:`run` calls
    ``fn(i)`` for every task i, each task taken by the next free thread."""

    def __init__(self, threads, min_rows=MIN_ROWS):
        self.threads, self.min_rows = max(1, int(threads)), max(1, int(min_rows))
        self.pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="npllm-train") \
            if self.threads > 1 else None

    def run(self, fn, tasks):
        if self.pool is None or tasks < 2:
            for i in range(tasks):
                fn(i)
            return
        order = itertools.count()  # next() on it is atomic: each task is taken once

        def drain():
            for i in order:
                if i >= tasks:
                    return
                fn(i)
        drain_together(self.pool, drain, min(self.threads, tasks))

    def bounds(self, N, min_rows=None):
        """Rows [0, N) cut into one range per thread, each of at least ``min_rows``."""
        n = max(1, min(self.threads, N // (min_rows or self.min_rows)))
        return [N * j // n for j in range(n + 1)]

    def rows(self, fn, N, min_rows=None):
        """``fn(a, b)`` over the ranges of :meth:`bounds`, one task each."""
        bounds = self.bounds(N, min_rows)
        self.run(lambda j: fn(bounds[j], bounds[j + 1]), len(bounds) - 1)

    # How each product is split: by the output's columns for x W^T and d_y W (each thread reads
    # a part of W and all of the few rows of x: as fast as BLAS's own split on an idle machine,
    # and faster than splitting the rows, which makes every thread read all of W), by the
    # output's rows for dW (measured the other way round).

    def matmul(self, x, W):
        """x [N, in] @ W [out, in]^T -> [N, out], the output's columns (W's rows) split."""
        out = np.empty((x.shape[0], W.shape[0]), np.float32)
        self.rows(lambda a, b: np.matmul(x, W[a:b].T, out=out[:, a:b]), W.shape[0])
        return out

    def matmul_nn(self, d_y, W):
        """d_y [N, out] @ W [out, in] -> [N, in] (the input's gradient), its columns split."""
        out = np.empty((d_y.shape[0], W.shape[1]), np.float32)
        self.rows(lambda a, b: np.matmul(d_y, W[:, a:b], out=out[:, a:b]), W.shape[1])
        return out

    def weight_grad(self, d_y, x):
        """d_y [N, out]^T @ x [N, in] -> dW [out, in], its rows (output features) split."""
        out = np.empty((d_y.shape[1], x.shape[1]), np.float32)
        self.rows(lambda a, b: np.matmul(d_y[:, a:b].T, x, out=out[a:b]), d_y.shape[1])
        return out


def stacked(*matrices):
    """The matrices [n_i, D] as one [sum n_i, D]: a view when they lie one after another in
    memory (:func:`trainable_weights`), else a copy."""
    groups = stack_adjacent(list(matrices))
    if len(groups) == 1:
        return groups[0][0]
    return np.concatenate([np.asarray(m, np.float32) for m in matrices])


class TrainingEngine:
    """``loss_and_grads`` fast: called as ``engine(weights, config, input_ids, targets,
    padding_idx=None)`` -> (loss, {HF name: gradient}), the reference's signature and numbers
    (up to float32 rounding). ``threads``: how many (None: the machine's, as BLAS and Numba are
    configured, :func:`~npllm.engine.threads.machine_threads`); ``min_rows``: the fewest rows
    a thread gets in a split (:data:`MIN_ROWS`; tests lower it to split tiny inputs)."""

    name = "numba"

    def __init__(self, threads=None, min_rows=MIN_ROWS):
        self.team = Team(threads or machine_threads(), min_rows)

    def __call__(self, weights, config, input_ids, targets, padding_idx=None):
        input_ids, targets = np.atleast_2d(input_ids), np.atleast_2d(targets)
        if input_ids.shape != targets.shape:
            raise ValueError(f"targets must have input_ids' shape {input_ids.shape}, got "
                             f"{targets.shape}")
        V = config.vocab_size
        if targets.size and (targets.min() < 0 or targets.max() >= V):  # the kernels index by them
            raise ValueError(f"targets must be token ids in [0, V) = [0, {V})")
        if self.team.threads == 1:
            return self._step(weights, config, input_ids, targets, padding_idx)
        with blas_on_one_thread():
            return self._step(weights, config, input_ids, targets, padding_idx)

    def _step(self, weights, config, ids, targets, padding_idx):
        loss, saved = self.forward(weights, config, ids, targets)
        return loss, self.backward(weights, config, saved, ids, padding_idx)

    def forward(self, weights, config, ids, targets):
        """The reference forward's steps on rows: -> (loss, saved); the logits in ``saved`` are
        already their gradient."""
        team = self.team
        H, K, Dh, eps = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                         np.float32(config.rms_norm_eps))
        B, T = ids.shape
        N = B * T
        cos, sin = rope_cos_sin(np.arange(T)[None],
                                rope_inverse_frequencies(Dh, config.rope_theta))
        cos, sin = np.ascontiguousarray(cos[0]), np.ascontiguousarray(sin[0])  # [T, Dh]
        scale = np.float32(Dh ** -0.5)
        x = np.asarray(weights["model.embed_tokens.weight"][ids.reshape(-1)], np.float32)  # [N, D]
        layers = []
        for i in range(config.num_hidden_layers):
            w = layer(weights, i)
            s = SimpleNamespace(x=x, w=w)
            s.h = self.rms_norm(x, w.input_norm, eps)
            s.qkv = team.matmul(s.h, w.qkv)  # [N, (H + 2K) Dh]
            team.rows(lambda a, b: KT.rope_rows(s.qkv, cos, sin, H + K, Dh, T, a, b), N)
            s.A, s.heads = self.attend(s.qkv, B, T, H, K, Dh, scale)
            x = x + team.matmul(s.heads, w.o)
            s.x_mid = x
            s.h2 = self.rms_norm(x, w.post_norm, eps)
            s.gate_up = team.matmul(s.h2, w.gate_up)  # [N, 2F]
            s.act = np.empty((N, s.gate_up.shape[1] // 2), np.float32)
            team.rows(lambda a, b: KT.swiglu_rows(s.gate_up, s.act, a, b), N)
            x = x + team.matmul(s.act, w.down)
            layers.append(s)
        final = self.rms_norm(x, weights["model.norm.weight"], eps)
        logits = team.matmul(final, weights["lm_head.weight"])  # [N, V]
        log_probs = np.empty(N, np.float32)
        flat = np.ascontiguousarray(targets.reshape(-1), np.int64)
        team.rows(lambda a, b: KT.cross_entropy_rows(logits, flat, N, log_probs, a, b), N, 1)
        saved = SimpleNamespace(layers=layers, x=x, final=final, d_logits=logits, cos=cos,
                                sin=sin, scale=scale, B=B, T=T)
        return float(-np.mean(log_probs)), saved

    def rms_norm(self, x, weight, eps):
        out = np.empty_like(x)
        self.team.rows(lambda a, b: KT.rms_norm_rows(x, weight, eps, out, a, b), x.shape[0])
        return out

    def attend(self, qkv, B, T, H, K, Dh, scale):
        """Causal grouped-query attention on the rows of qkv [N, (H + 2K) Dh], one task per
        (sequence, head): -> (A [B, H, T, T], heads [N, H Dh])."""
        A = np.empty((B, H, T, T), np.float32)
        heads = np.empty((B * T, H * Dh), np.float32)

        def head(task):
            b, h = divmod(task, H)
            rows = slice(b * T, (b + 1) * T)
            q, k, v = head_columns(qkv[rows], h, H, K, Dh)
            np.matmul(q, k.T, out=A[b, h])
            KT.causal_softmax_rows(A[b, h], scale, 0, T)
            heads[rows, h * Dh:(h + 1) * Dh] = A[b, h] @ v
        self.team.run(head, B * H)
        return A, heads

    def backward(self, weights, config, saved, ids, padding_idx=None):
        """The reference backward's steps on rows: the gradient of every weight."""
        team = self.team
        eps = np.float32(config.rms_norm_eps)
        H, K, Dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        grads = {}
        d_logits = saved.d_logits
        W_head = weights["lm_head.weight"]
        d_x = team.matmul_nn(d_logits, W_head)  # d_final
        d_head = team.weight_grad(d_logits, saved.final)
        saved.d_logits = d_logits = None  # 4 V bytes a token: freed before the layers
        d_x, grads["model.norm.weight"] = self.rms_norm_backward(
            d_x, saved.x, weights["model.norm.weight"], eps, np.zeros_like(d_x))
        for i in reversed(range(config.num_hidden_layers)):
            s, g = saved.layers[i], {}
            w = s.w
            # x_out = x_mid + MLP(RMSNorm(x_mid))
            d_act = team.matmul_nn(d_x, w.down)
            g["mlp.down_proj"] = team.weight_grad(d_x, s.act)
            team.rows(lambda a, b: KT.swiglu_backward_rows(d_act, s.gate_up, a, b), d_x.shape[0])
            d_gate_up = s.gate_up  # now the gradient of gate and up
            d_h2 = team.matmul_nn(d_gate_up, w.gate_up)
            g["mlp.gate_up"] = team.weight_grad(d_gate_up, s.h2)
            d_x, g["post_attention_layernorm"] = self.rms_norm_backward(d_h2, s.x_mid,
                                                                        w.post_norm, eps, d_x)
            # x_mid = x + attention(RMSNorm(x))
            d_heads = team.matmul_nn(d_x, w.o)
            g["self_attn.o_proj"] = team.weight_grad(d_x, s.heads)
            d_qkv = self.attend_backward(d_heads, s, saved, H, K, Dh)
            team.rows(lambda a, b: KT.rope_rows(d_qkv, saved.cos, -saved.sin, H + K, Dh,
                                                saved.T, a, b), d_qkv.shape[0])
            d_h = team.matmul_nn(d_qkv, w.qkv)
            g["self_attn.qkv"] = team.weight_grad(d_qkv, s.h)
            d_x, g["input_layernorm"] = self.rms_norm_backward(d_h, s.x, w.input_norm, eps, d_x)
            saved.layers[i] = None
            p = f"model.layers.{i}."
            qkv_sizes = (H * Dh, K * Dh, K * Dh)
            for name, part in zip(("q_proj", "k_proj", "v_proj"),
                                  split_rows(g.pop("self_attn.qkv"), qkv_sizes)):
                grads[p + f"self_attn.{name}.weight"] = part
            F = d_gate_up.shape[1] // 2
            for name, part in zip(("gate_proj", "up_proj"), split_rows(g.pop("mlp.gate_up"), (F, F))):
                grads[p + f"mlp.{name}.weight"] = part
            grads.update({p + f"{name}.weight": grad for name, grad in g.items()})
        flat = ids.reshape(-1)
        if padding_idx is not None:
            keep = flat != padding_idx
            flat, d_x = flat[keep], d_x[keep]
        if W_head is weights["model.embed_tokens.weight"]:  # tied: one matrix, one gradient
            np.add.at(d_head, flat, d_x)
            grads["model.embed_tokens.weight"] = grads["lm_head.weight"] = d_head
        else:
            d_embed = np.zeros(weights["model.embed_tokens.weight"].shape, np.float32)
            np.add.at(d_embed, flat, d_x)
            grads["model.embed_tokens.weight"], grads["lm_head.weight"] = d_embed, d_head
        return {name: grads[name] for name in weights}

    def rms_norm_backward(self, d_y, x, weight, eps, d_x):
        """d_x += RMSNorm's input gradient (in place), and the gain's gradient."""
        bounds = self.team.bounds(x.shape[0])
        n = len(bounds) - 1
        partial = np.zeros((n, x.shape[1]), np.float32)
        self.team.run(lambda j: KT.rms_norm_backward_rows(
            d_y, x, weight, eps, d_x, partial[j], bounds[j], bounds[j + 1]), n)
        return d_x, partial.sum(axis=0)

    def attend_backward(self, d_heads, s, saved, H, K, Dh):
        """The gradient of qkv [N, (H + 2K) Dh] (before RoPE's backward) from d_heads [N, H Dh],
        one task per (sequence, head); a key/value head sums its query heads' gradients."""
        B, T, scale, group = saved.B, saved.T, saved.scale, H // K
        d_qkv = np.empty_like(s.qkv)
        d_kv = np.empty((B, H, 2, T, Dh), np.float32)  # each query head's share of dk, dv
        qkv, A = s.qkv, s.A

        def head(task):
            b, h = divmod(task, H)
            rows = slice(b * T, (b + 1) * T)
            q, k, v = head_columns(qkv[rows], h, H, K, Dh)
            d_out = d_heads[rows, h * Dh:(h + 1) * Dh]
            pattern = A[b, h]
            np.matmul(pattern.T, d_out, out=d_kv[b, h, 1])
            d_scores = d_out @ v.T  # dL/dA, then dL/dS in place
            KT.softmax_backward_rows(d_scores, pattern, scale, 0, T)
            d_qkv[rows, h * Dh:(h + 1) * Dh] = d_scores @ k
            np.matmul(d_scores.T, q, out=d_kv[b, h, 0])
        self.team.run(head, B * H)
        for b in range(B):
            rows = slice(b * T, (b + 1) * T)
            for g in range(K):
                d_k, d_v = d_kv[b, g * group:(g + 1) * group].sum(axis=0)
                d_qkv[rows, (H + g) * Dh:(H + g + 1) * Dh] = d_k
                d_qkv[rows, (H + K + g) * Dh:(H + K + g + 1) * Dh] = d_v
        return d_qkv


def head_columns(qkv, h, H, K, Dh):
    """Query head h's columns of qkv [T, (H + 2K) Dh] and those of its key/value head
    h // (H / K): (q, k, v), each [T, Dh], views."""
    g = h // (H // K)
    return (qkv[:, h * Dh:(h + 1) * Dh], qkv[:, (H + g) * Dh:(H + g + 1) * Dh],
            qkv[:, (H + K + g) * Dh:(H + K + g + 1) * Dh])


def split_rows(block, sizes):
    """A [sum sizes, D] array's row blocks (views)."""
    return np.split(block, np.cumsum(sizes)[:-1])


def layer(weights, i):
    """Layer i's weights as the engine multiplies them: q/k/v and gate/up stacked (views when
    adjacent, :func:`stacked`)."""
    p = f"model.layers.{i}."
    m = {n: weights[p + n + ".weight"] for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    return SimpleNamespace(
        qkv=stacked(m["self_attn.q_proj"], m["self_attn.k_proj"], m["self_attn.v_proj"]),
        o=m["self_attn.o_proj"], gate_up=stacked(m["mlp.gate_proj"], m["mlp.up_proj"]),
        down=m["mlp.down_proj"], input_norm=weights[p + "input_layernorm.weight"],
        post_norm=weights[p + "post_attention_layernorm.weight"])


def backprop_engine(engine=None, threads=None):
    """The function that computes a step's loss and gradients, ``fn(weights, config, input_ids,
    targets, padding_idx=None) -> (loss, grads)``, for the engine ``engine`` (None:
    :func:`~npllm.engine.engine_name`, i.e. ``$NPLLM_ENGINE``, else ``numba``): the reference
    :func:`npllm.training.loss_and_grads` as written, or a :class:`TrainingEngine`."""
    from npllm.engine import engine_name
    if engine_name(engine) == "reference":
        from npllm.training.backprop import loss_and_grads
        return loss_and_grads
    return TrainingEngine(threads)
