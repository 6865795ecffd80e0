"""``npllm train``: train a small model from scratch, or fine-tune a model, on a text (lecture 004)."""
import argparse
import sys

EPILOG = """\
examples:
  npllm train --scratch -o tiny-stories
      a small Llama (D=128, L=4) and its tokenizer, from random weights, on npllm's shipped
      text; the loss starts near log V (a uniform guess) and falls as it learns
  npllm generate -m tiny-stories "The cat"
      what it learned (the folder is a Hugging Face model folder: transformers loads it too)
  npllm train notes.txt -m HuggingFaceTB/SmolLM2-135M-Instruct --steps 20 -o tuned
      fine-tune a model on a text file
  npllm train --scratch -o tiny-stories --steps 400 --resume
      continue the run saved in tiny-stories (weights, AdamW's moments, step) up to step 400
  npllm train --scratch -o tiny-stories --plot loss.png
      also draw the loss curve (needs matplotlib)

each step: batch-size windows of seq-len tokens, the mean cross-entropy of every next token,
its gradient for every weight (backpropagation, in NumPy), global-norm clipping, one AdamW
step; the learning rate warms up linearly, then follows half a cosine down to lr x min-lr-ratio.
"""


def add_parser(sub):
    p = sub.add_parser(
        "train", help="train a model from scratch or fine-tune one on a text (AdamW, in NumPy)",
        description="Train a language model on a text: from scratch (--scratch, a small Llama "
                    "and its tokenizer) or by fine-tuning a model (-m). Checkpoints are Hugging "
                    "Face model folders (config.json, model.safetensors, tokenizer) plus the "
                    "optimizer's state, so a run can be resumed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="?", default=None, metavar="TEXT_FILE",
                   help="a UTF-8 text file to train on; default: npllm's shipped text (short "
                        "stories, public domain)")
    p.add_argument("-m", "--model", default=None, metavar="NAME",
                   help="the model to fine-tune: a local folder, a .gguf file or a Hugging Face "
                        "repo id; default: SmolLM2-135M-Instruct (ignored with --scratch)")
    p.add_argument("--scratch", action="store_true",
                   help="train a new small model from random weights (and a new tokenizer "
                        "trained on the text) instead of fine-tuning --model")
    p.add_argument("-o", "--out", metavar="FOLDER",
                   help="write checkpoints to FOLDER (at the end and every --save-every steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out (same text)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps in all (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="tokens per sequence (default 128; shortened for a short text)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 3e-3 from scratch, 1e-4 fine-tuning)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up steps (default: a tenth of --steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine's floor, as a fraction of --lr (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW's decoupled weight decay, matrices only (default 0.1)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the gradients' global norm to this (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, batches)")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="also checkpoint every N steps")
    p.add_argument("--plot", metavar="FILE", help="draw the loss curve to FILE (PNG, SVG, PDF)")
    p.add_argument("--engine", default=None, choices=["numba", "reference"],
                   help="what computes each step's gradients: numba (default, fast, every core) "
                        "or reference (the readable NumPy backward pass); the same numbers. "
                        "Also NPLLM_ENGINE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args):
    import numpy as np

    from npllm.training import train
    from npllm.training.loop import TrainingError

    for name in ("steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.resume and not args.out:
        raise TrainingError("--resume needs --out FOLDER, the run to continue")
    from pathlib import Path
    text = None if args.text is None else Path(args.text)
    if text is not None and not text.is_file():
        raise TrainingError(f"{text} is not a file: give the path of a UTF-8 text file")
    result = train(args.model, text, scratch=args.scratch, out=args.out, resume=args.resume,
                   steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                   warmup=args.warmup, min_lr_ratio=args.min_lr_ratio,
                   weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                   save_every=args.save_every, plot=args.plot, progress=not args.quiet,
                   engine=args.engine)
    losses = result.losses
    if losses:
        first, last = losses[0], float(np.mean(losses[-min(10, len(losses)):]))
        print(f"loss {first:.3f} -> {last:.3f} (mean of the last {min(10, len(losses))} steps; "
              f"log V = {np.log(result.model.config.vocab_size):.3f}), "
              f"{result.tokens_per_second:,.0f} tokens/s")
    if result.folder is not None:
        print(f"saved: {result.folder} (npllm.load or transformers' from_pretrained)")
    if args.plot:
        print(f"loss curve: {args.plot}")
    sys.stdout.flush()
    return 0
