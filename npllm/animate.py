"""Lecture 003's attention-output pictures, from the real weights: a heatmap and an animation.

Lecture 003 hooks each layer's ``self_attn`` and plots ``out @ out.T`` (``plot_attention_layer``):
the attention block's output vectors [T, D] compared with each other by dot product, a [T, T]
map of which positions the block has made alike. It then regenerates the picture after every
predicted token (``generate_w_attention_layer_plot``, layers 0 and 29, ``" 2 + 2 - 3 = "``, 15
tokens), clearing the notebook cell to animate it. Here:

| function | what it draws | command line |
|---|---|---|
| :func:`output_similarity` | the [T, T] array ``out @ out.T`` of one layer | |
| :func:`attention_output` | its heatmap (the lecture's ``plot_attention_layer``) | ``npllm plot attention-output`` |
| :func:`attention_output_animation` | one frame per generated token, several layers side by side, written as a GIF or an HTML player | ``npllm plot animation`` |

``out`` is the trace's ``layers.{i}.attn_output``, the block's output after ``o_proj``: what the
lecture's hook receives from transformers' ``LlamaAttention``. Unlike an attention pattern this
map is not causal-masked and not normalised: row t, column s is :math:`o_t \\cdot o_s` (symmetric;
future positions appear because both vectors exist once the whole prefix has run).
Generation uses :func:`npllm.generate` (greedy) and each frame one traced forward pass of the
prefix; the lecture re-encodes the decoded text at every step instead, which can split it into
other tokens. Needs matplotlib and Pillow (the ``plot`` extra).
"""
import base64
import io
from pathlib import Path

import numpy as np

from npllm import inspect as views
from npllm.errors import NpllmError
from npllm.trace import Trace

FORMATS = (".gif", ".html")
INSTALL_HINT = "pip install 'npllm[plot]'"


def _layer(model, layer):
    L = model.config.num_hidden_layers
    if not -L <= layer < L:
        raise ValueError(f"layer must be in [0, {L}) (or negative from the end), got {layer}")
    return layer % L


def output_similarity(model, ids, layers):
    r"""``out @ out.T`` of each layer's attention output for the token ids (lecture 003).

    .. math::
        A^{(i)} = O^{(i)} O^{(i)\top},\qquad O^{(i)} = \text{attention block output of layer } i\ [T, D]

    ``ids`` [T]; ``layers`` a list of layer indices -> dict layer -> [T, T] (float32).
    """
    layers = [_layer(model, i) for i in layers]
    trace = Trace(*(f"layers.{i}.attn_output" for i in layers))
    model(np.asarray(ids)[None], trace=trace)
    return {i: trace[f"layers.{i}.attn_output"][0] @ trace[f"layers.{i}.attn_output"][0].T
            for i in layers}


def _figure(n_panels, T):
    """A figure from matplotlib's object-oriented API (no pyplot: no window, no shared state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise NpllmError(f"plotting needs matplotlib, which is not installed: "
                         f"{INSTALL_HINT}") from e
    size = min(7.0, 2.6 + 0.28 * T)
    return Figure(figsize=(n_panels * (size + 1.0), size + 0.9), layout="constrained", dpi=100)


def _label(token, n=14):
    """A token as a tick label: quoted (leading spaces show), '$' escaped (no mathtext)."""
    token = "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)
    token = token if len(token) <= n else token[:n - 1] + "…"
    return "'" + token.replace("$", r"\$") + "'"


def _draw(fig, maps, tokens, title):
    labels = [_label(t) for t in tokens]
    T = len(tokens)
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (layer, a) in zip(axes, maps.items()):
        image = ax.imshow(a, cmap="magma", interpolation="nearest")
        ticks = T <= 40
        ax.set_xticks(range(T), labels if ticks else [], rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels if ticks else [], fontsize=7)
        ax.set_title(f"Attention layer output, layer {layer}: out @ out.T", fontsize=9)
        ax.set_xlabel("input token")
        ax.set_ylabel("input token")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def attention_output(model, text, layer=0, chat=False, path=None):
    """Heatmap of ``out @ out.T`` for one layer's attention output on ``text`` (lecture 003's
    ``plot_attention_layer``). Returns the figure; writes it to ``path`` when given."""
    ids = views.encode(model, text, chat)
    maps = output_similarity(model, ids, [layer])
    fig = _draw(_figure(1, len(ids)), maps, views.token_strings(model, ids),
                _label(text, 60)[1:-1])
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _png(fig, dpi):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def attention_output_frames(model, prompt, layers=(0, -1), max_new_tokens=15, chat=False,
                            dpi=80, progress=True):
    """The animation's frames as PNG bytes, one per generated token, and the generation.

    Frame k shows ``out @ out.T`` of each of ``layers`` for the prompt and the k tokens
    generated before it, and names the token the model predicts from there (greedy), as
    lecture 003's ``generate_w_attention_layer_plot`` does at each of its steps.
    """
    from tqdm import tqdm

    import npllm
    prompt_ids = views.encode(model, prompt, chat)
    generation = npllm.generate(model, prompt_ids, max_new_tokens=max_new_tokens)
    all_ids = list(prompt_ids) + list(generation.ids)
    frames = []
    for k in tqdm(range(len(generation.ids)), desc="frames", unit="frame", disable=not progress):
        ids = all_ids[:len(prompt_ids) + k]
        maps = output_similarity(model, ids, layers)
        predicted = _label(views.token_strings(model, [generation.ids[k]])[0])
        fig = _draw(_figure(len(maps), len(ids)), maps, views.token_strings(model, ids),
                    f"step {k + 1} of {len(generation.ids)}: predicted token {predicted}")
        frames.append(_png(fig, dpi))
    return frames, generation


def _gif(frames, path, seconds_per_frame):
    from PIL import Image
    images = [Image.open(io.BytesIO(f)).convert("RGB") for f in frames]
    size = (max(i.width for i in images), max(i.height for i in images))
    padded = []
    for image in images:  # frames grow with the text; pad them to the largest on white
        canvas = Image.new("RGB", size, "white")
        canvas.paste(image, (0, 0))
        padded.append(canvas)
    padded[0].save(path, save_all=True, append_images=padded[1:], loop=0,
                   duration=int(seconds_per_frame * 1000))


PLAYER = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body style="font-family: sans-serif">
<p>{title}</p>
<button id="play">play</button>
<input id="frame" type="range" min="0" max="{last}" value="0" style="width: 60%">
<span id="label">1 / {count}</span>
<div><img id="image" alt="frame"></div>
<script>
const frames = {frames};
const slider = document.getElementById("frame"), image = document.getElementById("image");
const label = document.getElementById("label");
function show(k) {{
  slider.value = k;
  image.src = frames[k];
  label.textContent = (k + 1) + " / " + frames.length;
}}
slider.oninput = () => show(Number(slider.value));
let timer = null;
document.getElementById("play").onclick = () => {{
  if (timer) {{ clearInterval(timer); timer = null; return; }}
  timer = setInterval(() => show((Number(slider.value) + 1) % frames.length), {milliseconds});
}};
show(0);
</script></body></html>
"""


def _html(frames, path, seconds_per_frame, title):
    import html
    import json
    uris = ["data:image/png;base64," + base64.b64encode(f).decode("ascii") for f in frames]
    Path(path).write_text(PLAYER.format(title=html.escape(title), last=len(uris) - 1,
                                        count=len(uris), frames=json.dumps(uris),
                                        milliseconds=int(seconds_per_frame * 1000)),
                          encoding="utf-8")


def check_animation_path(path):
    """The animation's format from ``path``'s extension; NpllmError unless .gif or .html."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise NpllmError(f"the animation is written as GIF or HTML: give a path ending in "
                         f".gif or .html, got {str(path)!r}")
    return suffix


def attention_output_animation(model, prompt, path, layers=(0, -1), max_new_tokens=15,
                               chat=False, seconds_per_frame=0.6, dpi=80, progress=True):
    """Write lecture 003's animation: one frame per generated token, ``layers`` side by side.

    ``path`` ending in ``.gif``: an animated GIF; ``.html``: a page with the frames and a
    play button / slider (works offline). Returns the :class:`npllm.generate.Generation`; its
    ``ids`` are the frames' predicted tokens, one frame each.
    """
    suffix = check_animation_path(path)
    frames, generation = attention_output_frames(model, prompt, layers, max_new_tokens, chat,
                                                 dpi, progress)
    if not frames:
        raise NpllmError("the model generated no token (it ended its turn at once): "
                         "try another prompt")
    if suffix == ".gif":
        _gif(frames, path, seconds_per_frame)
    else:
        _html(frames, path, seconds_per_frame, f"out @ out.T per generated token: {prompt!r}")
    return generation
