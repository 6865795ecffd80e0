"""The lecture's plots, drawn from npllm's views (lecture 003; matplotlib, the ``plot`` extra).

| function | what it draws | command line |
|---|---|---|
| :func:`attention` | one layer's attention pattern, one head or their mean | ``npllm plot attention`` |
| :func:`heads` | every head of a layer as small multiples | ``npllm plot heads`` |
| :func:`next_token` | top-k next-token probabilities, before / after filters | ``npllm plot next-token`` |
| :func:`logit_lens` | every layer's top prediction at every position | ``npllm plot logit-lens`` |
| :func:`embeddings` | PCA scatter of words or sentences, with labels | ``npllm plot embeddings`` |
| :func:`positions` | sinusoidal encoding vs RoPE | ``npllm plot positions`` |

Each function returns a ``matplotlib.figure.Figure`` (Jupyter shows it) and writes it to
``path`` when given (PNG, SVG or PDF, by the file's extension). Figures are built without
``pyplot``, so nothing opens a window and nothing is shared between calls. matplotlib is
imported only here and only when a plot is asked for: ``pip install 'npllm[plot]'``.
"""
import math

import numpy as np

from npllm import inspect as views
from npllm.errors import NpllmError
from npllm.trace import Trace, kv_head

INSTALL_HINT = "pip install 'npllm[plot]'"


def _figure(width, height):
    """A new figure (constrained layout) from matplotlib's object-oriented API."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise NpllmError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT} "
                         f"(or pip install matplotlib)") from e
    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def _finish(fig, path):
    # Labels are the model's text, drawn as typed: matplotlib would read "$5 or $6" as math
    # (italics, no dollar signs) and fail on a lone "$".
    from matplotlib.text import Text
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _short(text, n=48):
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _label(token, n=14):
    """A token as a tick label: quoted, so leading spaces show (' +' is a space and a plus)."""
    token = "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)
    return f"'{token}'" if len(token) <= n else f"'{token[:n - 1]}…'"


def _labels(tokens):
    return [_label(t) for t in tokens]


# -- attention -------------------------------------------------------------------------------

def _pattern(model, text, layer, chat):
    ids = views.encode(model, text, chat)
    L = model.config.num_hidden_layers
    if not -L <= layer < L:
        raise ValueError(f"layer must be in [0, {L}) (or negative from the end), got {layer}")
    layer %= L
    trace = Trace(f"layers.{layer}.pattern")
    model(np.asarray(ids), trace=trace)
    return trace[f"layers.{layer}.pattern"][0], views.token_strings(model, ids), layer  # [H,T,T]


def _heatmap(fig, ax, pattern, tokens, annotate):
    """Attention weights [T, S] with the masked future in grey; returns the image."""
    T, S = pattern.shape
    future = np.arange(S)[None, :] > np.arange(T)[:, None] + (S - T)
    shown = np.ma.masked_where(future, pattern)
    import matplotlib
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    labels = _labels(tokens)
    ticks = T <= 48
    ax.set_xticks(range(S), labels if ticks else [], rotation=90, fontsize=8)
    ax.set_yticks(range(T), labels if ticks else [], fontsize=8)
    if annotate:
        for i in range(T):
            for j in range(S):
                if not future[i, j]:
                    v = pattern[i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
    return image


def attention(model, text, layer=0, head=None, chat=False, path=None):
    """Heatmap of one layer's attention pattern softmax(QK^T/sqrt(Dh) + M) for ``text``:
    row t is how query token t spreads its attention over the key tokens; the future (masked,
    weight 0) is grey. ``head=None`` averages the H heads (as lecture 003 does)."""
    patterns, tokens, layer = _pattern(model, text, layer, chat)
    H, T, _ = patterns.shape
    c = model.config
    if head is None:
        pattern, what = patterns.mean(axis=0), f"mean of the {H} heads"
    else:
        if not 0 <= head < H:
            raise ValueError(f"head must be in [0, {H}), got {head}")
        g = kv_head(head, H, c.num_key_value_heads)
        pattern, what = patterns[head], f"head {head} (reads K/V head {g})"
    size = min(9.0, 2.5 + 0.45 * T)
    fig = _figure(size + 1.2, size)
    ax = fig.add_subplot()
    image = _heatmap(fig, ax, pattern, tokens, annotate=T <= 16)
    ax.set_title(f"Attention, layer {layer}, {what}\n{_short(repr(text))}", fontsize=10)
    ax.set_xlabel("key token (attended to); grey: the future, masked")
    ax.set_ylabel("query token (attending)")
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    return _finish(fig, path)


def heads(model, text, layer=0, chat=False, path=None):
    """All H heads of one layer as small multiples, each titled with the K/V head it reads
    (grouped-query attention: query head h reads K/V head h // (H / K))."""
    patterns, tokens, layer = _pattern(model, text, layer, chat)
    H, T, _ = patterns.shape
    K = model.config.num_key_value_heads
    cols = math.ceil(math.sqrt(H))
    rows = math.ceil(H / cols)
    cell = min(3.6, 1.2 + 0.22 * T)
    fig = _figure(cols * cell + 1.0, rows * cell + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.set_axis_off()
            continue
        image = _heatmap(fig, ax, patterns[h], tokens, annotate=False)
        ax.set_title(f"head {h} (K/V head {kv_head(h, H, K)})", fontsize=9)
        if h % cols:
            ax.set_yticks([])
        if h < H - cols:
            ax.set_xticks([])
    fig.suptitle(f"Attention of every head, layer {layer}: {_short(repr(text))}", fontsize=11)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    return _finish(fig, path)


# -- next token, logit lens ------------------------------------------------------------------

def next_token(model, text, k=20, temperature=1.0, top_k=0, top_p=1.0, chat=False, path=None):
    """Bar chart of the k most likely next tokens (lecture 003), with their probabilities
    after temperature / top-k / top-p beside them when any filter is on."""
    view = views.next_token(model, text, k, temperature, top_k, top_p, chat)
    filtered = (temperature, top_k, top_p) != (1.0, 0, 1.0)
    fig = _figure(min(16.0, max(6.0, 0.5 * len(view.ids) + 2.5)), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(view.ids))
    width = 0.4 if filtered else 0.7
    ax.bar(x - (width / 2 if filtered else 0), view.before, width, color="#9ecae1",
           edgecolor="black", label="softmax(logits)")
    if filtered:
        ax.bar(x + width / 2, view.after, width, color="#08519c", edgecolor="black",
               label=f"after {view.settings} ({view.kept:,} token{'s' if view.kept != 1 else ''} "
                     f"kept)")
    for xi, p in zip(x, view.before):
        ax.text(xi - (width / 2 if filtered else 0), p, f"{p:.2f}", ha="center", va="bottom",
                fontsize=7)
    ax.set_xticks(x, _labels(view.tokens), rotation=45, ha="right", fontsize=9)
    ax.set_ylabel("probability")
    ax.set_xlabel("next token")
    ax.set_ylim(0, min(1.05, max(view.before.max(), view.after.max() if filtered else 0) * 1.15
                       + 0.02))
    ax.grid(axis="y", linestyle="--", alpha=0.6)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Top {len(view.ids)} next tokens after {_short(repr(view.text), 60)}",
                 fontsize=10)
    return _finish(fig, path)


def logit_lens(model, text, layers=None, chat=False, last=16, path=None):
    """The logit lens as a table: a row per layer, a column per input position (the ``last``
    ones when the text is longer), each cell the token that layer would predict next,
    coloured by its probability."""
    view = views.logit_lens(model, text, k=1, layers=layers, chat=chat)
    start = max(0, len(view.tokens) - last)
    tokens, top = view.tokens[start:], [row[start:] for row in view.top]
    probs = view.probs[:, start:, 0]
    L, T = len(view.layers), len(tokens)
    fig = _figure(max(6.0, 1.05 * T + 2.2), 0.32 * L + 2.0)
    ax = fig.add_subplot()
    image = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower",
                      interpolation="nearest")
    for i in range(L):
        for j in range(T):
            ax.text(j, i, _label(top[i][j], 8), ha="center", va="center",
                    fontsize=8, color="white" if probs[i, j] > 0.55 else "black")
    ax.set_xticks(range(T), _labels(tokens), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(L), [str(l) for l in view.layers], fontsize=7)
    ax.set_xlabel("input token (each column predicts the token after it)"
                  + (f"; the last {T} of {len(view.tokens)} tokens" if start else ""))
    ax.set_ylabel("layer")
    ax.set_title(f"Logit lens: each layer's top next token, {_short(repr(text))}", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="probability of the top token")
    return _finish(fig, path)


# -- embeddings, positions -------------------------------------------------------------------

def _annotate(ax, points, labels, color, placed, fontsize=10):
    """Label each point beside it: right, left, then further down, whichever first overlaps
    no label already placed (labels are placed from the top of the plot down)."""
    to_pixels = ax.transData.transform
    scale = ax.figure.dpi / 72  # points -> pixels
    height, width = 1.2 * fontsize * scale, 0.55 * fontsize * scale
    order = sorted(range(len(labels)), key=lambda i: -points[i][1])
    line = 1.3 * fontsize
    for i in order:
        (px, py), label = to_pixels(points[i]), labels[i]
        w = width * len(label)
        for k in range(40):  # right above, left above, right below, left below, ...
            dx = 6 if k % 2 == 0 else -6
            dy = 4 - line * (k // 2)
            left = px + dx * scale - (w if dx < 0 else 0)
            box = (left, py + dy * scale, left + w, py + dy * scale + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in placed):
                break
        placed.append(box)
        ax.annotate(label, points[i], xytext=(dx, dy), textcoords="offset points",
                    ha="left" if dx > 0 else "right", fontsize=fontsize, color=color)


def embeddings(model, texts, compare=None, hidden_state=0, positional=None, C=1.0,
               compare_name="compared", path=None):
    """PCA scatter of texts (lecture 003), each point labelled. ``compare``: other texts (e.g.
    the same sentences shuffled, named ``compare_name`` in the legend) drawn in green in the
    *same* plane. See :func:`npllm.inspect.text_vectors` for ``hidden_state``, ``positional``
    and ``C``."""
    texts = list(texts)
    view = views.embedding_pca(model, texts, hidden_state, positional, C)
    fig = _figure(8.0, 6.0)
    ax = fig.add_subplot()
    ax.scatter(view.coords[:, 0], view.coords[:, 1], s=80, color="#1f77b4", label="texts",
               zorder=3)
    xy = np.zeros((0, 2))
    if compare:
        other = views.text_vectors(model, list(compare), hidden_state, positional, C)
        xy = view.project(other)
        ax.scatter(xy[:, 0], xy[:, 1], s=80, color="#2ca02c", marker="s", label=compare_name,
                   zorder=2)
        ax.legend(fontsize=9)
    ax.margins(0.25, 0.15)
    placed = []
    _annotate(ax, view.coords, view.labels, "black", placed)
    _annotate(ax, xy, list(compare or []), "#2ca02c", placed, fontsize=9)
    ax.grid(True, alpha=0.5)
    ax.set_xlabel(f"PC1 ({100 * view.explained[0]:.0f}% of the variance)")
    ax.set_ylabel(f"PC2 ({100 * view.explained[1]:.0f}% of the variance)")
    ax.set_title(f"2-D PCA of the {view.description}", fontsize=10)
    return _finish(fig, path)


def positions(model=None, n_positions=64, C=10000.0, config=None, path=None):
    """Sinusoidal encoding vs RoPE: the sinusoidal code of each position (heatmap), RoPE's
    rotation of each coordinate pair (cosine of the angle), and how a position compares with
    position 0 under each (RoPE: the score of equal query and key at that offset)."""
    view = views.positional_encodings(model, n_positions, C, config)
    fig = _figure(11.0, 8.5)
    axes = fig.subplot_mosaic([["sin", "rope"], ["sim", "sim"]], height_ratios=[1.2, 1.0])
    a, b, c = axes["sin"], axes["rope"], axes["sim"]
    T, D = view.sinusoidal.shape
    # Even dimensions (sin) first, then odd ones (cos): interleaved, the two patterns would
    # alias into stripes at screen resolution.
    half = (D + 1) // 2
    shown = np.concatenate([view.sinusoidal[:, 0::2], view.sinusoidal[:, 1::2]], axis=1)
    image = a.imshow(shown, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto",
                     interpolation="nearest")
    a.axvline(half - 0.5, color="black", linewidth=1)
    a.set_xticks([0, half // 2, half, half + half // 2],
                 ["k=0", f"sin, k={half // 2}", "k=0", f"cos, k={half // 2}"], fontsize=8)
    a.set_title(f"Sinusoidal PE, C={view.C:g}: sin | cos of p / C^(2k/{D})", fontsize=10)
    a.set_xlabel(f"dimension 2k (left half) | 2k+1 (right half), k < {half}")
    a.set_ylabel("position p")
    image = b.imshow(np.cos(view.rope_angles), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto",
                     interpolation="nearest")
    b.set_title(f"RoPE: cos(p·ω_i), ω_i = θ^(-2i/Dh), θ={view.theta:g}", fontsize=10)
    b.set_xlabel(f"coordinate pair i (0 to {view.rope_angles.shape[1] - 1})")
    b.set_ylabel("position p")
    fig.colorbar(image, ax=[a, b], shrink=0.8, label="value")
    p = np.arange(T)
    c.plot(p, view.sinusoidal_similarity, label="sinusoidal: PE_p · PE_0 / |PE_0|²")
    c.plot(p, view.rope_similarity, label="RoPE: R_p x · R_0 x / |x|² (x = ones)")
    c.axhline(0, color="grey", linewidth=0.8)
    c.set_xlabel("position p (RoPE: offset m - n)")
    c.set_ylabel("similarity to position 0")
    c.set_title("How far apart two positions look", fontsize=10)
    c.legend(fontsize=8)
    c.grid(alpha=0.5)
    return _finish(fig, path)
