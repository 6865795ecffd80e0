r"""``npllm.train``: the training loop of lecture 004 ("T predictions and T losses per step").

Each step draws ``batch_size`` windows of ``seq_len + 1`` tokens from the text, computes the mean
cross-entropy of every next token and its gradient (:func:`npllm.training.loss_and_grads`, or
the training engine that computes the same numbers faster, chosen once by
:func:`npllm.training.backprop_engine`), clips the gradient's global norm, and takes one AdamW
step at the scheduled learning rate (linear warm-up, then cosine decay). Two ways to start:

- from scratch (``scratch=True``): a byte-level BPE tokenizer is trained on the text and a small
  Llama (:func:`scratch_config`) is drawn at random, as transformers initialises one; the loss
  starts near :math:`\log V` (a uniform guess) and falls as the model learns the text;
- fine-tuning: a loaded model (``npllm.load``) continues training on the text.

Checkpoints (``out=FOLDER``) are a Hugging Face model folder: ``config.json``,
``model.safetensors`` (float32), the tokenizer files, which ``npllm.load`` and transformers'
``AutoModelForCausalLM.from_pretrained`` both read; plus ``optimizer.safetensors`` (AdamW's
moments) and ``trainer_state.json`` (step, losses, settings), from which ``resume=True``
continues. Batches depend only on (seed, step), so a resumed run equals an uninterrupted one.
"""
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from npllm.equations import clip_by_global_norm, warmup_cosine_lr
from npllm.errors import NpllmError
from npllm.training.optim import AdamW, parameters

SHIPPED_TEXT = Path(__file__).resolve().parent.parent / "data" / "little_stories.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
END_OF_TEXT = "<|endoftext|>"


class TrainingError(NpllmError):
    """Unusable training settings or data (too short a text, a checkpoint that does not match)."""


@dataclass
class Settings:
    """What a run was asked to do (saved in trainer_state.json; ``resume`` checks it)."""
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    min_lr_ratio: float
    weight_decay: float
    betas: tuple
    grad_clip: float
    seed: int


@dataclass
class TrainResult:
    """What ``npllm.train`` returns: the trained model, the loss of every step, the speed."""
    model: object
    losses: list = field(default_factory=list)
    tokens_per_second: float = 0.0
    folder: Path = None


def shipped_text():
    """The small text npllm ships for training from scratch (public domain, ~6 KB)."""
    return SHIPPED_TEXT.read_text(encoding="utf-8")


def scratch_config(vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=384, max_position_embeddings=256,
                   **overrides):
    """A small Llama for training from scratch: D=128, L=4, H=4, K=2, F=384, tied embeddings."""
    from npllm.model.config import LlamaConfig
    d = dict(model_type="llama", vocab_size=vocab_size, hidden_size=hidden_size,
             num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
             num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size,
             max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    d.update(overrides)
    return LlamaConfig.from_dict(d)


def train_tokenizer(text, vocab_size=512):
    """A byte-level BPE tokenizer (SmolLM2's kind) trained on ``text``: a ``tokenizers.Tokenizer``
    with ``<|endoftext|>`` at id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def init_weights(config, seed=0):
    """Random weights as transformers initialises a Llama (``initializer_range`` 0.02): every
    matrix N(0, 0.02^2), every norm gain 1. ``{HF name: float32 array}``, tied if the config says."""
    from npllm.model.weights import expected_shapes
    rng = np.random.default_rng(seed)
    weights = {}
    for name, (shape, _) in expected_shapes(config).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weights[name] = (np.ones(shape, np.float32) if len(shape) == 1
                         else (0.02 * rng.standard_normal(shape)).astype(np.float32))
    weights["lm_head.weight"] = (weights["model.embed_tokens.weight"] if config.tie_word_embeddings
                                 else weights.pop("lm_head.weight"))
    return weights


def batch(ids, batch_size, seq_len, seed, step):
    """``batch_size`` random windows of the token stream ``ids``: inputs [B, T] and their next
    tokens [B, T]. The same (seed, step) always gives the same batch."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(ids) - seq_len, batch_size)
    windows = np.stack([ids[s:s + seq_len + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:]


def train(model=None, text=None, *, scratch=False, out=None, resume=False, steps=200,
          batch_size=8, seq_len=128, lr=None, warmup=None, min_lr_ratio=0.1, weight_decay=0.1,
          betas=(0.9, 0.95), grad_clip=1.0, seed=0, save_every=None, plot=None, progress=True,
          vocab_size=512, config=None, engine=None):
    r"""Train a model on a text with AdamW; return a :class:`TrainResult`.

    model: a ``npllm.Model``, or a name for ``npllm.load`` (None: the default model), fine-tuned;
      ignored with ``scratch=True``.
    text: the training text (a string), or a text file (a ``pathlib.Path``, or a string naming
      an existing file); None: npllm's shipped text (:func:`shipped_text`).
    scratch: train a new small model (:func:`scratch_config`, or ``config``) and a new tokenizer
      of ``vocab_size`` tokens on the text, from random weights.
    out: a folder for checkpoints (written every ``save_every`` steps and at the end);
      resume: continue the run saved in ``out`` (weights, AdamW's moments, step, losses).
    steps, batch_size, seq_len: the run's length and each step's [batch_size, seq_len] tokens
      (seq_len is shortened to fit a short text). ``steps=0`` returns the untrained model.
    lr, warmup, min_lr_ratio: peak learning rate (default 3e-3 from scratch, 1e-4 fine-tuning),
      warm-up steps (default steps // 10), and the cosine's floor as a fraction of lr.
    weight_decay, betas, grad_clip: AdamW's (matrices only) and the global-norm clipping bound.
    plot: a path for the loss curve (PNG, SVG...; needs matplotlib).
    progress: a tqdm bar with the loss and tokens/s.
    engine: what computes each step's loss and gradients, ``"numba"`` or ``"reference"`` (None:
      ``$NPLLM_ENGINE``, else ``"numba"``), chosen once (:func:`npllm.training.backprop_engine`);
      the optimizer's update follows the same choice.
    """
    import npllm
    from npllm.engine.training import backprop_engine, trainable_weights
    from npllm.model import Model
    from npllm.tokenizer import Tokenizer

    if steps < 0 or batch_size < 1 or seq_len < 1 or (lr is not None and lr <= 0):
        raise TrainingError(f"steps must be >= 0, batch_size and seq_len >= 1 and lr > 0; got "
                            f"steps={steps}, batch_size={batch_size}, seq_len={seq_len}, lr={lr}")
    out = Path(out) if out is not None else None
    if resume and (out is None or not (out / "trainer_state.json").is_file()):
        raise TrainingError(f"nothing to resume: {out} holds no trainer_state.json; start the "
                            "run without resume (or give the folder of the run to continue)")
    text = _read_text(text)
    if resume:  # the model, tokenizer and settings are the checkpoint's
        state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
        model = npllm.load(str(out), packed=False)
        settings = Settings(**{**state["settings"], "steps": steps,
                               "betas": tuple(state["settings"]["betas"])})
        pad, losses, start = state.get("padding_idx"), state["losses"], state["step"]
        scratch = state.get("scratch", False)
    else:
        if scratch:
            backend = train_tokenizer(text, vocab_size)
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": END_OF_TEXT,
                          "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT,
                          "model_max_length": 256}
            tokenizer = Tokenizer(backend, tok_config, [0])
            config = config or scratch_config(backend.get_vocab_size())
            if config.vocab_size < backend.get_vocab_size():
                raise TrainingError(f"config.vocab_size {config.vocab_size} is smaller than the "
                                    f"tokenizer's {backend.get_vocab_size()}: use "
                                    "scratch_config(vocab_size) or a larger vocab_size")
            model = Model(config, init_weights(config, seed), tokenizer, source="random weights")
            pad = None
        else:
            model = model if isinstance(model, Model) else npllm.load(model, packed=False)
            pad = _pad_token_id(model)
        settings = Settings(steps, batch_size, seq_len, lr or (3e-3 if scratch else 1e-4),
                            steps // 10 if warmup is None else warmup, min_lr_ratio, weight_decay,
                            tuple(betas), grad_clip, seed)
        losses, start = [], 0
    if model.tokenizer is None:
        raise TrainingError(f"{model.source} has no tokenizer.json: npllm needs it to turn the "
                            "text into tokens")
    ids = _token_stream(model, text, scratch)
    settings.seq_len = min(settings.seq_len, len(ids) - 1, model.config.context_length)

    # Writable float32 copies (the loaded weights may be read-only maps of the file); a tied
    # pair stays one array, and each layer's q/k/v and gate/up lie one after another in memory.
    weights = trainable_weights(model.weights, model.config)
    model = Model(model.config, weights, model.tokenizer, source=model.source, folder=model.folder)
    opt = AdamW(weights, settings.lr, settings.betas, weight_decay=settings.weight_decay,
                engine=engine)
    loss_and_grads = backprop_engine(engine)
    if resume:
        opt.load_state_dict(_load_tensors(out / "optimizer.safetensors"))

    tokens = settings.batch_size * settings.seq_len
    bar = _progress(progress, settings.steps, start)
    began, done = time.perf_counter(), 0
    for step in range(start, settings.steps):
        x, y = batch(ids, settings.batch_size, settings.seq_len, settings.seed, step)
        loss, grads = loss_and_grads(weights, model.config, x, y, padding_idx=pad)
        names = list(parameters(weights))
        clipped, _ = clip_by_global_norm([grads[n] for n in names], settings.grad_clip)
        lr_now = warmup_cosine_lr(step, settings.lr, settings.warmup, settings.steps,
                                  settings.min_lr_ratio)
        opt.step(weights, dict(zip(names, clipped)), lr_now)
        losses.append(loss)
        done += 1
        speed = done * tokens / (time.perf_counter() - began)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:,.0f}")
        if out is not None and save_every and (step + 1) % save_every == 0 and step + 1 < settings.steps:
            save_checkpoint(out, model, opt, settings, losses, pad, scratch)
    if bar is not None:
        bar.close()
    if out is not None:
        save_checkpoint(out, model, opt, settings, losses, pad, scratch)
        model.folder = out
    if plot is not None:
        loss_curve(losses, plot, start_loss=np.log(model.config.vocab_size) if scratch else None)
    speed = done * tokens / max(time.perf_counter() - began, 1e-9)
    return TrainResult(model, losses, speed if done else 0.0, out)


def save_checkpoint(folder, model, optimizer, settings, losses, padding_idx=None, scratch=False):
    """Write a Hugging Face model folder (config.json, model.safetensors, tokenizer files) plus
    optimizer.safetensors and trainer_state.json into ``folder``."""
    from safetensors.numpy import save_file

    from npllm.model.weights import save_weights
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["pad_token_id"] = padding_idx
    config["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_weights(model.weights, folder / "model.safetensors")
    _save_tokenizer(model, folder)
    save_file(optimizer.state_dict(), str(folder / "optimizer.safetensors"))
    state = {"step": optimizer.step_count, "losses": [float(x) for x in losses],
             "padding_idx": padding_idx, "scratch": scratch, "settings": asdict(settings)}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    return folder


def loss_curve(losses, path=None, start_loss=None):
    """The loss of every step (a matplotlib Figure; written to ``path`` if given), with the
    uniform guess's log V drawn when ``start_loss`` is given."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise TrainingError("the loss curve needs matplotlib, which is not installed: "
                            "pip install 'npllm[plot]' (or pip install matplotlib)") from e
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, label="training loss")
    if start_loss is not None:
        ax.axhline(start_loss, color="gray", ls="--", lw=1, label="log V (uniform guess)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean cross-entropy (nats)")
    ax.legend()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _read_text(text):
    if text is None:
        return shipped_text()
    path = Path(text) if isinstance(text, (str, Path)) and len(str(text)) < 4096 else None
    try:
        is_file = path is not None and path.is_file()
    except OSError:  # a text too long to be a file name
        is_file = False
    if is_file:
        return path.read_text(encoding="utf-8")
    if isinstance(text, Path) or (isinstance(text, str) and "\n" not in text
                                  and Path(text).suffix in (".txt", ".md", ".text")):
        raise TrainingError(f"{text} is not a file: give the path of a UTF-8 text file")
    return text


def _token_stream(model, text, scratch):
    ids = np.array(model.tokenizer.encode(text), np.int64)
    if scratch:  # documents end with <|endoftext|> (the paragraphs of the shipped text)
        ids = np.concatenate([ids, [0]])
    if len(ids) < 2:
        raise TrainingError(f"the text is {len(ids)} token long: training needs at least 2 "
                            "(one to read, one to predict)")
    return ids


def _pad_token_id(model):
    """transformers' pad_token_id from the model's config.json (its embedding row is frozen)."""
    path = Path(model.folder) / "config.json" if model.folder else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("pad_token_id")


def _save_tokenizer(model, folder):
    source = Path(model.folder) if model.folder else None
    if source is not None and source.resolve() != folder.resolve():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
    if not (folder / "tokenizer.json").is_file():  # a tokenizer trained in this run
        model.tokenizer.backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(
            json.dumps(model.tokenizer.config, indent=2) + "\n", encoding="utf-8")


def _load_tensors(path):
    from safetensors.numpy import load_file
    if not Path(path).is_file():
        raise TrainingError(f"{path} is missing: the checkpoint cannot be resumed without "
                            "AdamW's state; start a new run instead")
    return load_file(str(path))


def _progress(enabled, total, initial):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step")
