"""Lecture 003's out @ out.T pictures (issue 17): the heatmap's numbers are the traced attention
output's, and the animation has one valid frame per generated token, from one command.

The reference for out @ out.T is transformers' own LlamaAttention output on the same weights
(a forward hook on ``self_attn``, as the lecture does), computed at test time on a tiny model.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import npllm
from conftest import assert_close
from npllm import animate
from npllm.cli import main
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tiny_folder():
    return tiny_llama()


def test_output_similarity_is_the_lectures_hook_on_transformers(tiny_folder):
    from transformers import AutoModelForCausalLM
    model = npllm.load(str(tiny_folder))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float64).eval()
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    outputs = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o: outputs.append(o[0]))
             for layer in hf.model.layers]
    with torch.no_grad():
        hf(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    L = model.config.num_hidden_layers
    ours = animate.output_similarity(model, ids, list(range(L)))
    for i in range(L):
        out = outputs[i][0].numpy()
        expected = out @ out.T
        # float32 forward through i + 1 layers vs float64, then a dot product over D: relative
        # to the map's scale (entries near 0 have no relative precision).
        assert_close(ours[i], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # Negative control: the layer's input compared with itself is another map.
    assert not np.allclose(ours[L - 1], ours[0], rtol=1e-2)


def test_attention_output_heatmap_from_python_and_cli(tiny_folder, tmp_path, capsys):
    model = npllm.load(str(tiny_folder))
    fig = animate.attention_output(model, "the quick brown fox", layer=-1,
                                   path=tmp_path / "a.png")
    assert len(fig.axes) == 2  # the map and its colour bar
    out = tmp_path / "b.png"
    assert main(["plot", "attention-output", "the fox", "-m", str(tiny_folder),
                 "-o", str(out)]) == 0
    for path in (tmp_path / "a.png", out):
        with Image.open(path) as image:
            image.verify()


def frames_of(path):
    with Image.open(path) as image:
        assert image.format == "GIF" and image.is_animated
        frames = []
        for k in range(image.n_frames):
            image.seek(k)
            frames.append(np.asarray(image.convert("L"), dtype=np.float32))
    return frames


@pytest.mark.real_model
def test_the_animation_command_on_the_default_model(tmp_path, capsys):
    """One command, the default model, layers 0 and 29: one valid, non-blank frame per token."""
    out = tmp_path / "animation.gif"
    assert main(["plot", "animation", " 2 + 2 - 3 = ", "--layers", "0", "29", "--tokens", "4",
                 "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "4 frames, one per generated token" in err
    generation = npllm.generate(npllm.load(), " 2 + 2 - 3 = ", max_new_tokens=4)
    frames = frames_of(out)
    assert len(frames) == len(generation.ids) == 4
    for frame in frames:
        assert frame.shape[1] > 600 and frame.shape[0] > 300 and frame.std() > 10
    assert not np.array_equal(frames[0], frames[-1])  # the map grows with the text


def test_the_animation_as_an_html_player(tiny_folder, tmp_path):
    import base64
    import io
    import re
    model = npllm.load(str(tiny_folder))
    path = tmp_path / "a.html"
    generation = animate.attention_output_animation(model, "the fox", path, layers=(0, 1),
                                                    max_new_tokens=3, progress=False)
    html = path.read_text(encoding="utf-8")
    frames = re.findall(r'"data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(frames) == len(generation.ids) == 3
    for frame in frames:
        with Image.open(io.BytesIO(base64.b64decode(frame))) as image:
            image.verify()


def test_animation_errors_are_one_line(tiny_folder, tmp_path, capsys):
    assert main(["plot", "animation", "fox", "-m", str(tiny_folder), "-o",
                 str(tmp_path / "a.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".gif or .html" in err  # before the model loads
    assert main(["plot", "animation", "fox", "-m", str(tiny_folder), "--layers", "9",
                 "-o", str(tmp_path / "a.gif")]) == 2
    assert "layer must be in" in capsys.readouterr().err
