r"""Look inside a forward pass: keep the intermediate arrays under the lectures' names.

A :class:`Trace` passed to the model keeps copies of the arrays whose names match its glob
patterns, and nothing else, so tracing one attention map costs one attention map::

    import npllm
    from npllm.trace import Trace

    model = npllm.load()
    ids = model.tokenizer.encode(" 2 + 2 = ")
    trace = Trace("layers.0.pattern", "layers.*.output")
    logits = model(ids, trace=trace)
    trace["layers.0.pattern"].shape     # (1, 9, 7, 7): [B, H, T, S]
    trace.stack("layers.*.output").shape  # (30, 1, 7, 576): [L, B, T, D]

Names and shapes (see :data:`NAMES`; ``{i}`` is the layer, 0 to L - 1). Every array keeps the
batch axis, B = 1 for a single sequence. Shape letters as in :mod:`npllm`. S is the number of
key positions: T, plus what a KV cache already held.

| name | shape | what it is |
|---|---|---|
| ``mask`` | [B, 1, T, S] | the additive attention mask M: 0 where a query may look, else float32's minimum |
| ``embeddings`` | [B, T, D] | rows of ``embed_tokens`` for the input ids |
| ``layers.{i}.attn_norm`` | [B, T, D] | the layer's input after ``input_layernorm`` (RMSNorm) |
| ``layers.{i}.q`` | [B, H, T, Dh] | queries ``x W_q^T`` split into heads, before RoPE |
| ``layers.{i}.k`` | [B, K, T, Dh] | keys of the new tokens, before RoPE |
| ``layers.{i}.v`` | [B, K, T, Dh] | values of the new tokens |
| ``layers.{i}.q_rope`` | [B, H, T, Dh] | queries after RoPE |
| ``layers.{i}.k_rope`` | [B, K, S, Dh] | keys after RoPE, cached ones included: what q meets |
| ``layers.{i}.scores`` | [B, H, T, S] | :math:`Q K^\top / \sqrt{D_h}` per query head, no mask |
| ``layers.{i}.pattern`` | [B, H, T, S] | :math:`\mathrm{softmax}(Q K^\top/\sqrt{D_h} + M)` |
| ``layers.{i}.heads`` | [B, H, T, Dh] | each head's weighted sum of values, before ``o_proj`` |
| ``layers.{i}.attn_output`` | [B, T, D] | the attention block's output (after ``o_proj``) |
| ``layers.{i}.residual`` | [B, T, D] | the residual stream after attention: x + attention |
| ``layers.{i}.mlp_norm`` | [B, T, D] | after ``post_attention_layernorm`` (RMSNorm) |
| ``layers.{i}.gate`` | [B, T, F] | ``x W_gate^T`` |
| ``layers.{i}.up`` | [B, T, F] | ``x W_up^T`` |
| ``layers.{i}.act`` | [B, T, F] | ``silu(gate)``, the activation |
| ``layers.{i}.hidden`` | [B, T, F] | ``silu(gate) * up``, what ``down_proj`` reads |
| ``layers.{i}.mlp_output`` | [B, T, D] | the MLP block's output (after ``down_proj``) |
| ``layers.{i}.output`` | [B, T, D] | the residual stream after the whole block |
| ``norm`` | [B, T, D] | after the final RMSNorm (``model.norm``) |
| ``logits`` | [B, T, V] | the LM head's scores |

Grouped-query attention: K/V head g serves the query heads g G, ..., g G + G - 1 (G = H / K).
``scores`` and ``pattern`` are given per *query* head h, computed with K/V head
:func:`kv_head` (h) = h // G, exactly as transformers' ``repeat_kv`` pairs them; ``k``, ``v`` and
``k_rope`` keep their K heads.

``hidden_states`` of transformers (``output_hidden_states=True``) are ``embeddings``,
``layers.0.output``, ..., ``layers.{L-2}.output`` and ``norm``; its ``attentions``
(``output_attentions=True``, eager attention) are the ``layers.{i}.pattern``.

How it works: the forward pass calls a callback, ``trace(name, value)``, with each array it
computes, under the names above (llama.cpp's ``cb(cur, "attn_norm", il)``); nobody listens
unless a :class:`Trace` is given (:func:`no_trace`). What the forward pass computes inside one
equation (``scores`` and ``pattern`` inside attention, ``gate``, ``up``, ``act`` and ``hidden``
inside the SwiGLU MLP) is computed here, with the readable equations, from the arrays it was
given and the model's weights, and only when a pattern asks for it. Each name is copied only
when a pattern asks for it. A trace holds the arrays of the last forward pass it was given (a
second pass, e.g. the next decoding step, replaces them).
"""
import fnmatch
import re

import numpy as np

# name template -> (shape, meaning). The order is the order of the forward pass.
NAMES = {
    "mask": ("[B, 1, T, S]", "the additive attention mask M (0 or float32's minimum)"),
    "embeddings": ("[B, T, D]", "rows of embed_tokens for the input ids"),
    "layers.{i}.attn_norm": ("[B, T, D]", "the layer's input after input_layernorm (RMSNorm)"),
    "layers.{i}.q": ("[B, H, T, Dh]", "queries split into heads, before RoPE"),
    "layers.{i}.k": ("[B, K, T, Dh]", "keys of the new tokens, before RoPE"),
    "layers.{i}.v": ("[B, K, T, Dh]", "values of the new tokens"),
    "layers.{i}.q_rope": ("[B, H, T, Dh]", "queries after RoPE"),
    "layers.{i}.k_rope": ("[B, K, S, Dh]", "keys after RoPE (cached ones included)"),
    "layers.{i}.scores": ("[B, H, T, S]", "Q K^T / sqrt(Dh) per query head, before mask and softmax"),
    "layers.{i}.pattern": ("[B, H, T, S]", "attention weights softmax(Q K^T / sqrt(Dh) + M)"),
    "layers.{i}.heads": ("[B, H, T, Dh]", "each head's weighted sum of values, before o_proj"),
    "layers.{i}.attn_output": ("[B, T, D]", "the attention block's output (after o_proj)"),
    "layers.{i}.residual": ("[B, T, D]", "the residual stream after attention"),
    "layers.{i}.mlp_norm": ("[B, T, D]", "after post_attention_layernorm (RMSNorm)"),
    "layers.{i}.gate": ("[B, T, F]", "gate projection x W_gate^T"),
    "layers.{i}.up": ("[B, T, F]", "up projection x W_up^T"),
    "layers.{i}.act": ("[B, T, F]", "the activation silu(gate)"),
    "layers.{i}.hidden": ("[B, T, F]", "silu(gate) * up, the input of down_proj"),
    "layers.{i}.mlp_output": ("[B, T, D]", "the MLP block's output (after down_proj)"),
    "layers.{i}.output": ("[B, T, D]", "the residual stream after the whole block"),
    "norm": ("[B, T, D]", "after the final RMSNorm"),
    "logits": ("[B, T, V]", "the LM head's scores"),
}
_MAX_LAYERS_CHECKED = 256


def kv_head(h, n_heads, n_kv_heads):
    """The key/value head that query head ``h`` reads in grouped-query attention: h // (H / K)."""
    return h // (n_heads // n_kv_heads)


def no_trace(name, value):
    """The trace callback when nobody listens: the forward pass calls it, nothing happens."""


def names(n_layers):
    """Every name a forward pass through ``n_layers`` layers can keep, in forward order."""
    out = []
    for template in NAMES:
        if "{i}" in template:
            continue
        if template == "norm":  # layers come between embeddings and the final norm
            out += [t.format(i=i) for i in range(n_layers) for t in NAMES if "{i}" in t]
        out.append(template)
    return out


def _template_of(name):
    return re.sub(r"^layers\.\d+\.", "layers.{i}.", name)


_TEMPLATE_INDEX = {t: n for n, t in enumerate(NAMES)}


def _forward_order(name):
    """Sort key putting names in the order the forward pass computes them."""
    layer = re.match(r"^layers\.(\d+)\.", name)
    index = _TEMPLATE_INDEX[_template_of(name)]
    if layer:
        return (1, int(layer.group(1)), index)
    return (0 if name in ("mask", "embeddings") else 2, 0, index)


class Trace:
    """The intermediate arrays of one forward pass, kept by name (see the module's table).

    ``Trace()`` keeps every name (for a real model that is a lot of memory: prefer patterns);
    ``Trace("layers.*.pattern", "logits")`` keeps only the names matching one of the glob
    patterns (:mod:`fnmatch`: ``*`` matches anything, dots included). A pattern that matches no
    name at all is a ``ValueError``, so a typo does not silently keep nothing.

    ``trace[name]`` is a kept array (a copy: later changes to the model's buffers, such as the
    KV cache, do not touch it); ``trace.names()`` lists the kept names in forward order;
    ``trace.stack(pattern)`` stacks the matching arrays along a new first axis; ``print(trace)``
    shows names and shapes.
    """

    def __init__(self, *patterns):
        self.patterns = patterns or ("*",)
        for pattern in self.patterns:
            if not isinstance(pattern, str):
                raise ValueError(f"trace patterns must be strings, got {pattern!r}")
            if not any(fnmatch.fnmatchcase(name, pattern)
                       for name in names(_MAX_LAYERS_CHECKED)):
                raise ValueError(
                    f"the trace pattern {pattern!r} matches no name; names are "
                    + ", ".join(NAMES) + " ({i} = layer number; globs like 'layers.*.q' work)")
        self.arrays = {}
        self._wanted = {}

    def wants(self, name):
        """Whether ``name`` matches one of the patterns (the answer is cached per name)."""
        wanted = self._wanted.get(name)
        if wanted is None:
            wanted = self._wanted[name] = any(fnmatch.fnmatchcase(name, p) for p in self.patterns)
        return wanted

    def listener(self, weights):
        """The callback a forward pass calls, ``listen(name, value)``, for the model with
        ``weights`` (HF names: the MLP's inner arrays are computed from them). It starts a new
        pass: what the trace kept before is dropped. ``value`` may be a callable, called (to
        compute the array) only when wanted."""
        from npllm.equations import attention_pattern, repeat_kv, silu

        self.arrays = {}
        seen = {}  # the mask and the last layer's queries: what scores and pattern need

        def listen(name, value):
            self._keep(name, value)
            layer, _, what = name.rpartition(".")
            if what in ("mask", "q_rope"):
                seen[what] = value
            elif what == "k_rope":
                q, k = seen["q_rope"], value
                group = q.shape[1] // k.shape[1]
                self._keep(layer + ".scores", lambda: (q @ np.swapaxes(repeat_kv(k, group), -1, -2))
                           * q.shape[-1] ** -0.5)
                self._keep(layer + ".pattern",
                           lambda: attention_pattern(q, repeat_kv(k, group), seen["mask"]))
            elif what == "mlp_norm":
                def project(kind):
                    return value @ weights[f"model.{layer}.mlp.{kind}_proj.weight"].T
                self._keep(layer + ".gate", lambda: project("gate"))
                self._keep(layer + ".up", lambda: project("up"))
                self._keep(layer + ".act", lambda: silu(project("gate")))
                self._keep(layer + ".hidden", lambda: silu(project("gate")) * project("up"))
        return listen

    def _keep(self, name, value):
        """Keep a copy of ``value`` (or of ``value()``) under ``name`` if a pattern asks for it."""
        assert _template_of(name) in NAMES, f"undocumented trace name {name!r}"
        if self.wants(name):
            value = value() if callable(value) else value
            self.arrays[name] = np.array(value, dtype=np.float32, copy=True)

    def __getitem__(self, name):
        try:
            return self.arrays[name]
        except KeyError:
            hint = ("it is not a name a forward pass keeps (see npllm.trace.NAMES)"
                    if _template_of(name) not in NAMES else
                    f"the patterns {self.patterns} do not ask for it, or no forward pass "
                    f"ran with this trace yet")
            raise KeyError(f"{name!r} was not kept: {hint}") from None

    def __contains__(self, name):
        return name in self.arrays

    def __iter__(self):
        return iter(self.names())

    def __len__(self):
        return len(self.arrays)

    def names(self, pattern="*"):
        """The kept names matching ``pattern``, in the order the forward pass made them."""
        found = [n for n in self.arrays if fnmatch.fnmatchcase(n, pattern)]
        return sorted(found, key=_forward_order)

    def stack(self, pattern):
        """The kept arrays whose names match ``pattern``, stacked on a new first axis.

        ``trace.stack("layers.*.output")`` is [L, B, T, D] (layers in order); raises KeyError
        when nothing matches.
        """
        found = self.names(pattern)
        if not found:
            raise KeyError(f"no kept name matches {pattern!r}; kept: {', '.join(self.arrays)}")
        return np.stack([self.arrays[n] for n in found])

    def __repr__(self):
        if not self.arrays:
            return f"Trace({', '.join(map(repr, self.patterns))}: nothing kept yet)"
        width = max(map(len, self.arrays))
        lines = [f"Trace({', '.join(map(repr, self.patterns))}: {len(self.arrays)} arrays)"]
        for name in self.names():
            shape, meaning = NAMES[_template_of(name)]
            lines.append(f"  {name:<{width}}  {str(list(self.arrays[name].shape)):<18} "
                         f"{shape:<14} {meaning}")
        return "\n".join(lines)
