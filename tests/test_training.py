"""npllm.training.train and ``npllm train``: a from-scratch run on the shipped text learns (loss
well below log V), fine-tuning lowers a text's loss, checkpoints load in npllm and in
transformers with the same logits, and a resumed run equals an uninterrupted one."""
import json

import numpy as np
import pytest
import torch

import npllm
from npllm.cli import main
from npllm.training import loss_curve, shipped_text, train
from npllm.training.loop import TrainingError
from tiny_models import load_reference, tiny_llama

# A short run: 100 steps of 8 x 64 tokens (~10 s on one core). The default run is 200 x 8 x 128.
SHORT = dict(steps=100, batch_size=8, seq_len=64, progress=False)


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scratch")
    return train(scratch=True, out=out, **SHORT)


def test_from_scratch_the_loss_falls_well_below_log_v(scratch_run):
    log_v = np.log(scratch_run.model.config.vocab_size)
    losses = np.array(scratch_run.losses)
    assert len(losses) == SHORT["steps"]
    # Random weights (std 0.02) give almost uniform predictions: the loss starts at log V.
    assert abs(losses[0] - log_v) < 0.05
    # Well below: less than the entropy of the text's token frequencies (what a model that
    # ignores the context could reach), so the model predicts from the context.
    ids = scratch_run.model.tokenizer.encode(shipped_text())
    p = np.bincount(ids) / len(ids)
    unigram_entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    assert unigram_entropy < log_v
    assert losses[-10:].mean() < unigram_entropy - 0.5
    assert losses[-10:].mean() < 0.6 * log_v


def test_checkpoint_loads_in_npllm_and_transformers_with_the_same_logits(scratch_run):
    folder = scratch_run.folder
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "optimizer.safetensors", "trainer_state.json"} <= names
    model = npllm.load(str(folder))
    ids = np.array(model.tokenizer.encode("The cat sat in the sun."))
    for name, w in scratch_run.model.weights.items():
        np.testing.assert_array_equal(model.weights[name], w, err_msg=name)
    reference = load_reference(folder)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)[None]).logits[0].numpy()
    # The same float32 weights through two float32 forward passes (as tests/test_forward.py).
    np.testing.assert_allclose(model(ids), expected, rtol=1e-4, atol=1e-4)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(folder).encode("The cat sat in the sun.") == ids.tolist()


def test_the_trained_model_produces_words_of_the_text(scratch_run):
    model = npllm.load(str(scratch_run.folder))
    out = npllm.generate(model, "The cat", max_new_tokens=20, temperature=0)
    words = set(shipped_text().split())
    produced = out.text.split()
    assert produced and sum(w in words for w in produced) >= len(produced) // 2


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # A constant learning rate (no warm-up, the cosine's floor at 1): then 3 steps, saved, and
    # 3 more resumed are the same 6 steps as one run (a cosine would depend on the run's length).
    settings = dict(scratch=True, batch_size=2, seq_len=32, warmup=0, min_lr_ratio=1.0,
                    progress=False)
    straight = train(out=tmp_path / "straight", steps=6, **settings)
    train(out=tmp_path / "resumed", steps=3, **settings)
    resumed = train(out=tmp_path / "resumed", steps=6, resume=True, **settings)
    assert resumed.losses == straight.losses  # the same batches, weights and AdamW moments
    for name, w in straight.model.weights.items():
        np.testing.assert_array_equal(resumed.model.weights[name], w, err_msg=name)
    state = json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())
    assert state["step"] == 6 and len(state["losses"]) == 6


def test_fine_tuning_a_loaded_model_lowers_the_loss_of_its_text(tmp_path):
    model = npllm.load(str(tiny_llama()))
    text = tmp_path / "notes.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    result = train(model, text, steps=8, batch_size=2, seq_len=16, lr=1e-2, warmup=0,
                   progress=False, out=tmp_path / "tuned")
    assert result.losses[-1] < result.losses[0] - 0.5
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["pad_token_id"] == 2  # the source model's, so transformers freezes the same row
    assert (tmp_path / "tuned" / "tokenizer_config.json").is_file()
    # The model passed in is left as it was.
    np.testing.assert_array_equal(model.weights["model.norm.weight"],
                                  npllm.load(str(tiny_llama())).weights["model.norm.weight"])


def test_loss_curve_is_drawn(tmp_path):
    fig = loss_curve([6.0, 5.0, 4.0], tmp_path / "loss.png", start_loss=6.2)
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert fig.axes[0].get_xlabel() == "step"


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(scratch=True, out=tmp_path, resume=True, progress=False)


def test_a_missing_text_file_is_refused_not_trained_on(tmp_path):
    with pytest.raises(TrainingError, match="notes.txt is not a file"):
        train(scratch=True, text=str(tmp_path / "notes.txt"), progress=False)


def test_zero_steps_give_the_untrained_model_at_log_v():
    run = train(scratch=True, steps=0, progress=False)
    assert run.losses == []
    ids = np.array(run.model.tokenizer.encode(shipped_text()[:400]))
    loss = -np.mean(run.model(ids[:-1], targets=ids[1:]))
    assert abs(loss - np.log(run.model.config.vocab_size)) < 0.05  # a uniform guess


def test_cli_trains_from_scratch_and_saves(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--scratch", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                 "-o", str(out), "-q", "--plot", str(tmp_path / "loss.png")]) == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and "tokens/s" in printed and str(out) in printed
    assert (out / "model.safetensors").is_file() and (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["train", "--resume"], "--resume needs --out"),
    (["train", "missing.txt", "--scratch"], "missing.txt is not a file"),
    (["train", "--scratch", "--steps", "0"], "--steps must be at least 1"),
])
def test_cli_errors_are_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(TrainingError, match="batch_size and seq_len >= 1"):
        train(scratch=True, batch_size=0, progress=False)
    from npllm.training import scratch_config
    with pytest.raises(TrainingError, match="smaller than the tokenizer's"):
        train(scratch=True, config=scratch_config(100), steps=1, progress=False)
