"""Plots (issue 7): every plot, from Python and from the command line, writes a valid image of
sensible size that is not blank; a missing matplotlib gives a clear message.

Most plots run on a tiny model (fast); the issue's own command runs on the default model.
What each plot shows was checked by eye (see docs/plots.md, whose figures the docs build draws
from the default model).
"""
import sys

import numpy as np
import pytest
from PIL import Image

import npllm
from npllm import plot
from npllm.cli import main
from npllm.errors import NpllmError
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return npllm.load(str(tiny_llama()))


def check_image(path, min_size=(300, 250), max_size=(4000, 4000)):
    """A PNG that opens, has a sensible size and shows something (not one flat colour)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], \
        (width, height)
    assert pixels.std() > 10, "the image is (almost) blank"
    return width, height


PLOTS = {
    "attention": lambda m, p: plot.attention(m, "The quick brown fox", layer=1, path=p),
    "attention-head": lambda m, p: plot.attention(m, "The quick brown fox", layer=-1, head=3,
                                                  path=p),
    "heads": lambda m, p: plot.heads(m, "The quick brown fox", layer=0, path=p),
    "next-token": lambda m, p: plot.next_token(m, "The quick brown", k=12, path=p),
    "next-token-filtered": lambda m, p: plot.next_token(m, "Hello", k=10, temperature=0.7,
                                                        top_p=0.9, chat=True, path=p),
    "logit-lens": lambda m, p: plot.logit_lens(m, "The quick brown fox", path=p),
    "embeddings": lambda m, p: plot.embeddings(m, ["cat", "dog", "bird", "machine"],
                                               compare=["car"], path=p),
    "embeddings-hidden": lambda m, p: plot.embeddings(m, ["the cat sat", "sat the cat", "a dog"],
                                                      hidden_state=-1, path=p),
    "positions": lambda m, p: plot.positions(m, n_positions=32, C=100.0, path=p),
}


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_plot_from_python_writes_a_valid_png(tiny, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig = PLOTS[name](tiny, path)
    check_image(path)
    assert fig.axes, "the function returns the figure"


def test_attention_plot_shows_the_pattern_with_the_future_masked(tiny, tmp_path):
    fig = plot.attention(tiny, "The quick brown fox", layer=0, head=1)
    image = fig.axes[0].images[0]
    shown = image.get_array()
    T = shown.shape[0]
    future = np.triu(np.ones((T, T), bool), 1)
    assert (shown.mask == future).all()  # masked exactly on the future, drawn grey
    np.testing.assert_allclose(shown.sum(axis=1), 1, atol=1e-5)  # rows are distributions
    assert "head 1 (reads K/V head 0)" in fig.axes[0].get_title()


def test_figures_can_be_svg_too(tiny, tmp_path):
    plot.positions(tiny, n_positions=16, path=tmp_path / "p.svg")
    assert (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


CLI = {
    "attention": ["attention", "The quick brown fox", "--layer", "1", "--head", "2"],
    "heads": ["heads", "The quick brown fox", "-l", "-1"],
    "next-token": ["next-token", "The quick", "-k", "8", "--temperature", "0.5", "--top-k", "4"],
    "logit-lens": ["logit-lens", "The quick brown fox", "--chat"],
    "embeddings": ["embeddings", "cat", "dog", "bird", "--compare", "car",
                   "--positional", "multiply"],
    "positions": ["positions", "--positions", "40", "-C", "1"],
}


@pytest.mark.parametrize("kind", sorted(CLI))
def test_plot_command_writes_a_valid_png(tiny, tmp_path, kind, capsys):
    out = tmp_path / f"{kind}.png"
    argv = ["plot", *CLI[kind], "-m", str(tiny.folder), "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().err
    check_image(out)


def test_plot_command_reads_stdin_and_has_a_default_name(tiny, tmp_path, monkeypatch):
    import io
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("The quick brown fox"))
    assert main(["plot", "attention", "-", "-m", str(tiny.folder)]) == 0
    check_image(tmp_path / "attention.png")


def test_plot_command_errors_are_one_line(tiny, tmp_path, capsys):
    assert main(["plot", "attention", "fox", "-m", str(tiny.folder), "--layer", "7",
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "layer must be in [0, 2)" in capsys.readouterr().err
    assert main(["plot", "embeddings", "cat", "-m", str(tiny.folder),
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.real_model
def test_the_issue_command_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["plot", "attention", "2 + 2 =", "--layer", "0", "-o", str(out)]) == 0
    width, height = check_image(out)
    assert width > height * 0.8  # a square heatmap plus its colour bar


def test_missing_matplotlib_gives_a_clear_message(tiny, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` now fails
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(NpllmError, match=r"needs matplotlib.*pip install 'npllm\[plot\]'"):
        plot.positions(tiny, n_positions=8)
    assert main(["plot", "positions", "-m", str(tiny.folder), "-o", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "npllm plot: error: plotting needs matplotlib" in err and "npllm[plot]" in err
    assert not (tmp_path / "p.png").exists()
