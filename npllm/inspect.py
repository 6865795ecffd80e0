r"""Look at the model: its anatomy (lecture 000) and what it computes (lecture 003).

- **Anatomy**: :func:`parameter_table` (every tensor: name, shape, count, group, tied),
  :func:`parameter_summary` (totals by embeddings / attention / MLP / norms and their shares),
  :func:`lecture_000` (the answers to lecture 000's exercises).
- **Views**: :func:`next_token` (the top-k next tokens with their probabilities, before and
  after temperature / top-k / top-p), :func:`logit_lens` (what each layer would predict),
  :func:`embedding_pca` (words and sentences in two dimensions, PCA by SVD),
  :func:`positional_encodings` (sinusoidal vs RoPE).

Every view returns plain NumPy arrays in a small dataclass that prints as a table; the
:mod:`npllm.plot` functions draw them. Everything runs on NumPy alone (no torch). On the default
model the numbers come from the Q4_1-quantized GGUF weights dequantized to float32: close to,
not equal to, the Hub's bfloat16 weights.
"""
from dataclasses import dataclass, field, replace

import numpy as np

from npllm.equations import (apply_rope, decoder_parameter_counts, filter_logits, lm_head,
                             rms_norm, rope_cos_sin, rope_inverse_frequencies, sinusoidal_encoding, softmax)
from npllm.trace import Trace

GROUPS = ("embeddings", "attention", "mlp", "norms", "lm_head")


# -- helpers ---------------------------------------------------------------------------------

def encode(model, text, chat=False):
    """Token ids of ``text`` (a string, or already a list of ids).

    ``chat=True`` wraps the text as one user message in the model's chat template and opens the
    assistant's turn, as lecture 003 does before asking for the next token.
    """
    if not isinstance(text, str):
        ids = [int(i) for i in text]
    else:
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids instead of text")
        if chat:
            text = model.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                       add_generation_prompt=True)
        ids = model.tokenizer.encode(text)
    if not ids:
        raise ValueError("the text gives no token: give at least one character")
    return ids


def _byte_level_alphabet():
    """GPT-2's byte-level BPE spells byte b as a character: printable bytes as themselves, the
    others as chr(256 + n) in order. Returns character -> byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in printable]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


_BYTES = None


def token_strings(model, ids):
    """Each id decoded on its own (``" runs"``, ``"<|im_start|>"``), as the lecture labels plots.

    A token that holds only part of a character (the first bytes of an emoji: byte-level BPE
    splits rare characters into bytes) cannot be decoded alone; it is shown as its bytes,
    ``"\\xf0\\x9f"``, instead of the replacement character.
    """
    global _BYTES
    if model.tokenizer is None:
        return [f"#{int(i)}" for i in ids]
    out = []
    for i in ids:
        text = model.tokenizer.decode([int(i)])
        if "\ufffd" in text:
            _BYTES = _BYTES or _byte_level_alphabet()
            spelling = model.tokenizer.id_to_token(int(i))
            if all(c in _BYTES for c in spelling):
                text = bytes(_BYTES[c] for c in spelling).decode("utf-8", "backslashreplace")
        out.append(text)
    return out


def show_token(s):
    """A token made visible in a table or a plot: a space becomes ``·``, a newline ``\\n``."""
    s = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)
    return s.replace(" ", "·") or "∅"


def top_k_ids(probs, k):
    """The ids of the k largest entries of the last axis, largest first (ties: lower id first)."""
    probs = np.asarray(probs)
    k = min(k, probs.shape[-1])
    part = np.argpartition(-probs, k - 1, axis=-1)[..., :k]
    order = np.lexsort((part, -np.take_along_axis(probs, part, axis=-1)), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


# -- anatomy (lecture 000) -------------------------------------------------------------------

def _group(name):
    if name in ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.wpe.weight"):
        return "embeddings"  # GPT-2's learned positions counted with the token embeddings
    if name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in name or ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name or ".ln_" in name:
        return "norms"
    raise ValueError(f"npllm does not know which part of the model {name!r} belongs to")


_LAYER_ORDER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                "mlp.down_proj")


def parameter_table(model):
    """Every weight tensor of the model, in the order of the forward pass.

    A list of dicts: ``name`` (the Hugging Face name), ``shape``, ``count`` (its number of
    parameters), ``group`` (embeddings, attention, mlp, norms, lm_head) and ``tied``: True for
    the LM head when it is the embedding matrix itself (SmolLM2: ``tie_word_embeddings``), which
    is then counted once, under embeddings, as transformers' ``num_parameters()`` does.
    """
    w = model.weights
    if model.config.model_type not in ("llama", "mistral"):  # loaded in the forward's order
        return _rows({n: a.shape for n, a in w.items()}, w["lm_head.weight"] is w[
            "transformer.wte.weight" if model.config.model_type == "gpt2" else
            "model.embed_tokens.weight"])
    layer_names = [n for n in w if n.startswith("model.layers.")]

    def layer_key(name):  # (layer, place in the forward pass, name)
        part = name.split(".", 3)[3]
        place = next((i for i, p in enumerate(_LAYER_ORDER) if part.startswith(p)),
                     len(_LAYER_ORDER))
        return int(name.split(".")[2]), place, part

    ordered = (["model.embed_tokens.weight"] + sorted(layer_names, key=layer_key)
               + ["model.norm.weight", "lm_head.weight"])
    missing = set(w) - set(ordered)
    if missing:
        raise ValueError(f"unexpected weights {sorted(missing)}")
    tied = w["lm_head.weight"] is w["model.embed_tokens.weight"]
    return _rows({n: w[n].shape for n in ordered}, tied)


def _rows(shapes, tied):
    return [{"name": n, "shape": tuple(shape), "count": int(np.prod(shape)), "group": _group(n),
             "tied": tied and n == "lm_head.weight"} for n, shape in shapes.items()]


def parameter_counts(config):
    """:func:`npllm.equations.decoder_parameter_counts` for ``config``'s family: its biases,
    norms, MLP and position table."""
    c, family = config, config.model_type
    gpt2 = family == "gpt2"
    return decoder_parameter_counts(
        c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
        c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.tie_word_embeddings,
        qkv_bias=getattr(c, "qkv_bias", False), o_bias=gpt2, gated=not gpt2, mlp_bias=gpt2,
        norm_bias=family in ("stablelm", "gpt2"),
        norms_per_layer=1 if getattr(c, "parallel_residual", False) else 2,
        positions=c.max_position_embeddings if gpt2 else 0)


def config_summary(config):
    """:class:`ParameterSummary` of the model ``config`` describes, without its weights: the
    tensors' names and shapes as its safetensors files hold them (lecture 000 on StableLM 3B
    without downloading 5.6 GB)."""
    from npllm.model.weights import expected_shapes

    shapes = {n: shape for n, (shape, _) in expected_shapes(config).items()}
    return _summary(config, _rows(shapes, config.tie_word_embeddings))


def model_tree(config):
    """The model's tensors as a tree, from its config alone: embeddings, one layer's tensors with
    their shapes (every layer has the same), the final norm and the LM head."""
    from npllm.model.weights import expected_shapes

    shapes = {n: symbols + " = " + str(list(shape))
              for n, (shape, symbols) in expected_shapes(config).items()}
    total = parameter_counts(config)["total"]
    layer0 = [n for n in shapes if n.startswith(("model.layers.0.", "transformer.h.0."))]
    prefix = layer0[0].rsplit(".0.", 1)[0] if layer0 else "model.layers"
    c = config
    lines = [f"{config.model_type}  ({total:,} parameters; {c.num_attention_heads} query / "
             f"{c.num_key_value_heads} key-value heads of width {c.head_dim}, D={c.hidden_size}, "
             f"F={c.intermediate_size}, V={c.vocab_size})"]
    outside = [n for n in shapes if ".0." not in n and not n.startswith(prefix + ".")]
    for n in [n for n in outside if "embed" in n or ".wte" in n or ".wpe" in n]:
        lines.append(f"  {n:<48} {shapes[n]}")
    lines.append(f"  {prefix}: {c.num_hidden_layers} x")
    lines += [f"    {n.split('.0.', 1)[1]:<46} {shapes[n]}" for n in layer0]
    for n in [n for n in outside if not ("embed" in n or ".wte" in n or ".wpe" in n)]:
        tied = n == "lm_head.weight" and c.tie_word_embeddings
        lines.append(f"  {n:<48} {shapes[n]}" + ("  (tied to the embeddings)" if tied else ""))
    return "\n".join(lines)


@dataclass
class ParameterSummary:
    """Totals by part of the model (lecture 000, exercise "the number of parameters").

    ``groups`` maps embeddings, attention, mlp, norms, lm_head to parameter counts (lm_head is 0
    when tied), ``total`` is their sum and equals transformers' ``num_parameters()``;
    ``shares`` are the fractions of ``total``; ``rows`` is :func:`parameter_table`.
    """
    groups: dict
    total: int
    rows: list = field(repr=False)

    @property
    def shares(self):
        return {g: n / self.total for g, n in self.groups.items()}

    def to_dict(self):
        return {"total": self.total, "groups": self.groups, "shares": self.shares,
                "tensors": [{**r, "shape": list(r["shape"])} for r in self.rows]}

    def table(self, tensors=False):
        """The table as text: by part (default), or every tensor with ``tensors=True``, where
        the L layers' tensors of one name are folded into one line ``layers.*.``."""
        lines = []
        if tensors:
            folded = {}
            for r in self.rows:
                key = r["name"].replace("." + r["name"].split(".")[2] + ".", ".*.", 1) \
                    if r["name"].startswith(("model.layers.", "transformer.h.")) else r["name"]
                entry = folded.setdefault(key, {**r, "n": 0})
                entry["n"] += 1
            lines.append(f"{'tensor':<48} {'shape':>16} {'parameters':>14}  part")
            for name, r in folded.items():
                shape = ("" if r["n"] == 1 else f"{r['n']} x ") + str(list(r["shape"]))
                count = "(tied)" if r["tied"] else f"{r['n'] * r['count']:,}"
                lines.append(f"{name:<48} {shape:>16} {count:>14}  {r['group']}")
            lines.append("")
        lines.append(f"{'part':<12} {'parameters':>14} {'share':>7}")
        for g, n in self.groups.items():
            note = "  (tied to the embeddings: counted there)" if g == "lm_head" and n == 0 \
                and any(r["tied"] for r in self.rows) else ""
            lines.append(f"{g:<12} {n:>14,} {_percent(n / self.total):>7}{note}")
        lines.append(f"{'total':<12} {self.total:>14,} {'100.0%':>7}")
        return "\n".join(lines)

    __str__ = table


def _percent(share):
    """19.7%, and two decimals for the small shares (norms: 0.03%) so they do not read as 0."""
    return f"{100 * share:.2f}%" if 0 < share < 0.01 else f"{100 * share:.1f}%"


def module_tree(config, weights):
    """The model as transformers prints it, with shapes, parameter counts and shares."""
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
        return f"{count:>13,}  {_percent(count / total):>6}"

    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    Hd, Kd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    lines = [
        f"LlamaForCausalLM  ({total:,} parameters, float32, "
        f"{c.num_attention_heads} query / {c.num_key_value_heads} key-value heads of width {c.head_dim})",
        "  (model): LlamaModel",
        f"    (embed_tokens): Embedding({V}, {D})".ljust(64) + share(embed),
        f"    (layers): {c.num_hidden_layers} x LlamaDecoderLayer",
        "      (self_attn): LlamaAttention".ljust(64) + share(attn),
        f"        (q_proj): Linear({D} -> {Hd})",
        f"        (k_proj): Linear({D} -> {Kd})",
        f"        (v_proj): Linear({D} -> {Kd})",
        f"        (o_proj): Linear({Hd} -> {D})",
        f"        RoPE(head_dim={c.head_dim}, theta={c.rope_theta:g})",
        "      (mlp): LlamaMLP".ljust(64) + share(mlp),
        f"        (gate_proj): Linear({D} -> {F})",
        f"        (up_proj): Linear({D} -> {F})",
        f"        (down_proj): Linear({F} -> {D})",
        "        (act_fn): SiLU",
        f"      (input_layernorm): RMSNorm({D}, eps={c.rms_norm_eps:g})",
        f"      (post_attention_layernorm): RMSNorm({D}, eps={c.rms_norm_eps:g})",
        f"    (norm): RMSNorm({D}, eps={c.rms_norm_eps:g})".ljust(64) + share(norms) + "  (all norms)",
        f"  (lm_head): Linear({D} -> {V})".ljust(64)
        + (" tied to embed_tokens (shares its matrix)" if tied else share(head)),
    ]
    return "\n".join(lines)


def parameter_summary(model):
    """Parameter counts by part and their shares; checked against the formulas of
    :func:`npllm.equations.decoder_parameter_counts` (:func:`parameter_counts`)."""
    return _summary(model.config, parameter_table(model))


def _summary(config, rows):
    groups = {g: sum(r["count"] for r in rows if r["group"] == g and not r["tied"])
              for g in GROUPS}
    summary = ParameterSummary(groups, sum(groups.values()), rows)
    tied = any(r["tied"] for r in rows)
    config = config if tied == config.tie_word_embeddings else replace(
        config, tie_word_embeddings=tied)  # no lm_head.weight in the files: tied
    expected = parameter_counts(config)
    assert {g: expected[g] for g in GROUPS} == groups, (expected, groups)
    return summary


@dataclass
class Lecture000:
    """The answers to lecture 000's exercises ("Dissecting an LLM", "The number of parameters")
    on one model; ``str()`` writes them out."""
    printout: str
    attention_shapes: dict
    mlp_shapes: dict
    lm_head_shape: tuple
    tied: bool
    text: str
    tokens: list
    last_hidden_state_shape: tuple
    summary: ParameterSummary

    def to_dict(self):
        s = self.summary
        return {"attention_shapes": {k: list(v) for k, v in self.attention_shapes.items()},
                "mlp_shapes": {k: list(v) for k, v in self.mlp_shapes.items()},
                "lm_head_shape": list(self.lm_head_shape), "tied": self.tied,
                "text": self.text, "tokens": self.tokens,
                "last_hidden_state_shape": list(self.last_hidden_state_shape),
                "num_parameters": s.total, "attention_parameters": s.groups["attention"],
                "mlp_parameters": s.groups["mlp"], "attention_share": s.shares["attention"],
                "mlp_share": s.shares["mlp"]}

    def __str__(self):
        s = self.summary

        def shapes(d):
            return "\n".join(f"     {k:<44} {list(v)}" for k, v in d.items())

        V, D = self.lm_head_shape
        return "\n".join([
            "Dissecting an LLM",
            "1. The model:",
            "\n".join("     " + line for line in self.printout.splitlines()),
            "2. Attention parameters of one layer ([out, in], as torch.nn.Linear stores them;",
            "   every layer has the same):",
            shapes(self.attention_shapes),
            "3. MLP parameters of one layer:",
            shapes(self.mlp_shapes),
            f"4. LM head: lm_head.weight {[V, D]}, i.e. the lecture's W in R^(d x |V|) = "
            f"{D} x {V}" + (" (tied: the embedding matrix itself)" if self.tied else ""),
            f"5. {self.text!r} -> tokens {self.tokens}; last hidden state "
            f"{list(self.last_hidden_state_shape)} = [batch, tokens, width]",
            "The number of parameters",
            f"1. num_parameters() = {s.total:,}",
            f"2. attention {s.groups['attention']:,} ({100 * s.shares['attention']:.1f}%), "
            f"MLP {s.groups['mlp']:,} ({100 * s.shares['mlp']:.1f}%), embeddings "
            f"{s.groups['embeddings']:,} ({100 * s.shares['embeddings']:.1f}%), norms "
            f"{s.groups['norms']:,} ({100 * s.shares['norms']:.2f}%)",
        ])


def lecture_000(model, text="He runs"):
    """Answer lecture 000's exercises on ``model`` (the lecture uses StableLM 3B; npllm's
    default model is SmolLM2-135M-Instruct).

    The last hidden state is what transformers returns as ``hidden_states[-1]``: the output of
    the final RMSNorm, one D-wide vector per token, [1, T, D].
    """
    from npllm.model.family_config import embedding_name

    w = model.weights
    layer0 = "transformer.h.0." if model.config.model_type == "gpt2" else "model.layers.0."
    ids = encode(model, text)
    trace = Trace("norm")
    model(np.asarray(ids)[None], trace=trace)
    return Lecture000(
        printout=repr(model),
        attention_shapes={n: tuple(w[n].shape) for n in w
                          if n.startswith(layer0) and _group(n) == "attention"},
        mlp_shapes={n: tuple(w[n].shape) for n in w
                    if n.startswith(layer0) and _group(n) == "mlp"},
        lm_head_shape=tuple(w["lm_head.weight"].shape),
        tied=w["lm_head.weight"] is w[embedding_name(model.config)],
        text=text, tokens=token_strings(model, ids),
        last_hidden_state_shape=trace["norm"].shape,
        summary=parameter_summary(model))


# -- views (lecture 003) ---------------------------------------------------------------------

@dataclass
class NextToken:
    """The next-token distribution after a text: the ``k`` most likely tokens.

    ``ids``, ``tokens``: the k most likely next tokens (before filtering), most likely first;
    ``before``: their probabilities softmax(logits); ``after``: their probabilities once
    temperature, top-k and top-p have reshaped the distribution (0 for a token cut off);
    ``kept``: how many tokens of the whole vocabulary survive the filters.
    """
    text: str
    ids: np.ndarray
    tokens: list
    before: np.ndarray
    after: np.ndarray
    kept: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def settings(self):
        return f"temperature={self.temperature:g}, top_k={self.top_k}, top_p={self.top_p:g}"

    def to_dict(self):
        return {"text": self.text, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "kept": self.kept,
                "tokens": [{"id": int(i), "token": t, "before": float(b), "after": float(a)}
                           for i, t, b, a in zip(self.ids, self.tokens, self.before, self.after)]}

    def __str__(self):
        kept = f"{self.kept:,} token{'s' if self.kept != 1 else ''} kept"
        lines = [f"next token after {self.text!r}  ({self.settings}: {kept})",
                 f"{'rank':>4} {'id':>6}  {'token':<16} {'before':>8} {'after':>8}"]
        for r, (i, t, b, a) in enumerate(zip(self.ids, self.tokens, self.before, self.after)):
            lines.append(f"{r + 1:>4} {int(i):>6}  {show_token(t):<16} {b:>8.4f} {a:>8.4f}")
        return "\n".join(lines)


def next_token(model, text, k=10, temperature=1.0, top_k=0, top_p=1.0, chat=False):
    """The k most likely next tokens after ``text`` and their probabilities, before and after
    temperature / top-k / top-p (lecture 003's bar chart; lecture 002's sampling settings).

    The filters are :func:`npllm.equations.filter_logits` (transformers' order: temperature,
    then top-k, then top-p); the defaults switch them off. ``chat=True`` puts the text in the
    chat template first (:func:`encode`). Lecture 003 samples with temperature 0.2, top_p 0.9.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (how many tokens to show) must be a positive integer, got {k!r}")
    ids = encode(model, text, chat)
    logits = model(np.asarray(ids))[-1]  # [V]
    before = softmax(logits)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    after = softmax(filtered)
    top = top_k_ids(before, k)
    shown = text if isinstance(text, str) and not chat else "".join(token_strings(model, ids))
    return NextToken(shown, top, token_strings(model, top), before[top], after[top],
                     int(np.isfinite(filtered).sum()), temperature, top_k, top_p)


@dataclass
class LogitLens:
    """What each layer would predict if it were the last (the "logit lens").

    The residual stream after layer l goes through the final RMSNorm and the LM head:
    ``softmax(lm_head(rms_norm(h_l)))``. ``ids`` and ``probs`` are [L, T, k]: the top k
    predictions at every input position; ``tokens`` are the input tokens (position t predicts
    the token after ``tokens[t]``); ``top`` [L, T] the decoded top-1 predictions. The last
    layer's row is the model's own prediction.
    """
    tokens: list
    ids: np.ndarray
    probs: np.ndarray
    top: list
    layers: list

    def __str__(self):
        width = min(12, max(6, *(len(show_token(t)) for t in self.tokens)))
        head = f"{'layer':>5}  " + " ".join(f"{show_token(t)[:width]:<{width}}"
                                             for t in self.tokens)
        lines = ["logit lens: the top next-token prediction of each layer at each position",
                 head]
        for layer, row in zip(self.layers, self.top):
            lines.append(f"{layer:>5}  " + " ".join(f"{show_token(t)[:width]:<{width}}"
                                                     for t in row))
        return "\n".join(lines)


def logit_lens(model, text, k=1, layers=None, chat=False):
    """Decode every layer's residual stream with the final norm and LM head (see
    :class:`LogitLens`). ``layers``: which layers (default all)."""
    ids = encode(model, text, chat)
    L = model.config.num_hidden_layers
    layers = list(range(L)) if layers is None else [l % L for l in layers]
    trace = Trace(*(f"layers.{l}.output" for l in layers))
    model(np.asarray(ids), trace=trace)
    w, T = model.weights, len(ids)
    h = trace.stack("layers.*.output")[:, 0].reshape(-1, model.config.hidden_size)  # [L*T, D]
    h = rms_norm(h, w["model.norm.weight"], model.config.rms_norm_eps)
    top_ids, top_probs = [], []
    rows = max(T, 512 // T * T)  # whole layers at a time, one matmul for many (W is read once)
    for start in range(0, len(h), rows):
        probs = softmax(lm_head(h[start:start + rows], w["lm_head.weight"]))  # [rows, V]
        best = top_k_ids(probs, k)
        top_ids.append(best)
        top_probs.append(np.take_along_axis(probs, best, axis=-1))
    top_ids = np.concatenate(top_ids).reshape(len(layers), T, -1)
    top_probs = np.concatenate(top_probs).reshape(len(layers), T, -1)
    top = [token_strings(model, row[:, 0]) for row in top_ids]
    return LogitLens(token_strings(model, ids), top_ids, top_probs, top, layers)


@dataclass
class PCA:
    """Texts as points in the plane of their two main directions of variation.

    ``labels`` the texts; ``vectors`` [N, D] one vector per text; ``coords`` [N, 2] their
    coordinates on the first two principal components; ``components`` [2, D] those directions;
    ``explained`` the fraction of the variance each one carries; ``mean`` [D] the centre.
    """
    labels: list
    vectors: np.ndarray
    coords: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    mean: np.ndarray
    description: str = ""

    def project(self, vectors):
        """Coordinates of other vectors [M, D] in the same plane (same centre, same axes)."""
        return (np.asarray(vectors, np.float32) - self.mean) @ self.components.T

    def __str__(self):
        lines = [f"PCA of {self.description}: PC1 {100 * self.explained[0]:.1f}%, "
                 f"PC2 {100 * self.explained[1]:.1f}% of the variance"]
        for label, (x, y) in zip(self.labels, self.coords):
            lines.append(f"  {x:>8.3f} {y:>8.3f}  {label}")
        return "\n".join(lines)


def pca(vectors, labels=None, n_components=2, description=""):
    r"""Principal component analysis by SVD: :math:`X - \bar x = U \Sigma V^\top`, coordinates
    :math:`U \Sigma` (the first columns), explained variance :math:`\sigma_i^2 / \sum \sigma^2`.

    Signs are fixed so that each component's largest coordinate is positive (sklearn's
    convention), so the same input gives the same picture.
    """
    X = np.asarray(vectors, np.float64)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"PCA needs at least two vectors [N, D], got shape {X.shape}")
    mean = X.mean(axis=0)
    U, S, Vt = np.linalg.svd(X - mean, full_matrices=False)
    n = min(n_components, len(S))
    signs = np.sign(U[np.abs(U[:, :n]).argmax(axis=0), np.arange(n)])
    signs[signs == 0] = 1
    coords = U[:, :n] * S[:n] * signs
    components = Vt[:n] * signs[:, None]
    explained = S[:n] ** 2 / max((S ** 2).sum(), np.finfo(float).tiny)
    if n < n_components:  # fewer directions than asked (e.g. two points): pad with zeros
        coords = np.pad(coords, ((0, 0), (0, n_components - n)))
        components = np.pad(components, ((0, n_components - n), (0, 0)))
        explained = np.pad(explained, (0, n_components - n))
    labels = list(labels) if labels is not None else [str(i) for i in range(len(X))]
    return PCA(labels, X.astype(np.float32), coords.astype(np.float32),
               components.astype(np.float32), explained, mean.astype(np.float32), description)


def hidden_state_name(model, index):
    """The trace name of transformers' ``hidden_states[index]``: 0 is ``embeddings``,
    1 to L - 1 the outputs of layers 0 to L - 2, L (or -1) ``norm``, the last hidden state."""
    L = model.config.num_hidden_layers
    if not -(L + 1) <= index <= L:
        raise ValueError(f"hidden_state must be in [-{L + 1}, {L}] (this model has {L} layers), "
                         f"got {index}")
    index %= L + 1
    return "embeddings" if index == 0 else "norm" if index == L else f"layers.{index - 1}.output"


def text_vectors(model, texts, hidden_state=0, positional=None, C=1.0):
    """One vector per text: the mean over its tokens, as lecture 003 averages a sentence.

    ``hidden_state`` indexes the vectors as transformers' ``hidden_states`` does: 0 (default)
    the token embeddings (no context, no order: a shuffled sentence gives the same vector),
    -1 the last hidden state (after the final norm), where attention with RoPE has mixed in
    context and order; see :func:`hidden_state_name`. ``positional``: with ``hidden_state=0``,
    combine the embeddings with the sinusoidal encoding (constant ``C``) first, by ``"add"``
    (the transformer paper; the mean then forgets the order again, because the mean of the
    codes is the same for any permutation of the words) or ``"multiply"`` (what the lecture's
    plot does).
    """
    if positional not in (None, "add", "multiply"):
        raise ValueError(f"positional must be None, 'add' or 'multiply', got {positional!r}")
    name = hidden_state_name(model, hidden_state)
    if positional is not None and name != "embeddings":
        raise ValueError("positional applies to the token embeddings (hidden_state=0) only")
    all_ids = [encode(model, text) for text in texts]
    if name == "embeddings":
        out = []
        for ids in all_ids:
            x = model.weights["model.embed_tokens.weight"][ids]  # [T, D]
            if positional is not None:
                pe = sinusoidal_encoding(len(ids), x.shape[-1], C)
                x = x + pe if positional == "add" else x * pe
            out.append(x.mean(axis=0))
        return np.stack(out)
    # One batched forward pass: texts padded on the right (padding is never attended to, and
    # left out of the means), so each row equals the text run alone.
    T = max(map(len, all_ids))
    batch = np.zeros((len(all_ids), T), np.int64)
    mask = np.zeros((len(all_ids), T), np.int64)
    for row, ids in enumerate(all_ids):
        batch[row, :len(ids)], mask[row, :len(ids)] = ids, 1
    trace = Trace(name)
    model(batch, attention_mask=mask, trace=trace)
    weights = mask[:, :, None].astype(np.float32)
    return (trace[name] * weights).sum(axis=1) / weights.sum(axis=1)


def embedding_pca(model, texts, hidden_state=0, positional=None, C=1.0):
    """Lecture 003's PCA plots: each text's mean vector (:func:`text_vectors`) projected on
    the two principal components of the set (:func:`pca`)."""
    texts = list(texts)
    name = hidden_state_name(model, hidden_state)
    what = {"embeddings": "token embeddings", "norm": "last hidden states"}.get(
        name, f"hidden states ({name})")
    if positional is not None:
        what += f" {'plus' if positional == 'add' else 'times'} sinusoidal codes (C={C:g})"
    return pca(text_vectors(model, texts, hidden_state, positional, C), texts,
               description=f"mean {what}")


@dataclass
class PositionalEncodings:
    """Sinusoidal encoding vs RoPE for the first ``n_positions`` positions.

    ``sinusoidal`` [T, D]: the additive code of "Attention Is All You Need" with constant ``C``
    at the model's width D. ``rope_angles`` [T, Dh/2]: the angle p * omega_i by which RoPE
    rotates coordinate pair i at position p (theta from config.json). ``sinusoidal_similarity``
    [T]: PE_p . PE_0, how the code at distance p compares with position 0; ``rope_similarity``
    [T]: RoPE(x, p) . RoPE(x, 0) for the all-ones vector x, which is what a query and a key
    with the same content score at offset p (RoPE makes it depend on the offset only).
    """
    C: float
    theta: float
    sinusoidal: np.ndarray
    rope_angles: np.ndarray
    sinusoidal_similarity: np.ndarray
    rope_similarity: np.ndarray

    def __str__(self):
        T, D = self.sinusoidal.shape
        return (f"sinusoidal encoding [{T}, {D}] (C={self.C:g}); RoPE angles [{T}, "
                f"{self.rope_angles.shape[1]}] (theta={self.theta:g})\n"
                f"similarity to position 0, sinusoidal: "
                + " ".join(f"{s:.2f}" for s in self.sinusoidal_similarity[:8]) + " ...\n"
                "similarity at offset p, RoPE:         "
                + " ".join(f"{s:.2f}" for s in self.rope_similarity[:8]) + " ...")


def positional_encodings(model=None, n_positions=64, C=10000.0, config=None):
    """Compute :class:`PositionalEncodings` with the model's width, head width and RoPE theta
    (from ``model.config``, or a ``config``). Similarities are divided by the value at 0."""
    c = config if config is not None else model.config
    pe = sinusoidal_encoding(n_positions, c.hidden_size, C)
    inv_freq = rope_inverse_frequencies(c.head_dim, c.rope_theta)
    positions = np.arange(n_positions)
    angles = positions[:, None].astype(np.float32) * inv_freq  # [T, Dh/2]
    cos, sin = rope_cos_sin(positions, inv_freq)  # [T, Dh]
    rotated = apply_rope(np.ones((n_positions, c.head_dim), np.float32), cos, sin)
    rope_sim = rotated @ rotated[0]
    pe_sim = pe @ pe[0]
    return PositionalEncodings(float(C), float(c.rope_theta), pe, angles,
                               pe_sim / pe_sim[0], rope_sim / rope_sim[0])
