"""``npllm inspect``: the model's module tree, shapes and parameter counts (lecture 000).

    npllm inspect                   # module tree, then parameters by part with their shares
    npllm inspect --tensors         # ... and every weight tensor (layers folded)
    npllm inspect --lecture-000     # the answers to lecture 000's exercises
    npllm inspect --json            # all of it as JSON, for scripts
    npllm inspect --config stablelm-3b-4e1t   # a model from its config alone: no weights
    npllm inspect --config path/to/config.json

``--config`` takes a config.json (or a folder holding one) or the name of a config npllm ships:
lecture 000's models (:data:`CONFIGS`), so its exercises run without downloading the weights.
"""
from pathlib import Path
import json


def add_parser(sub):
    from npllm.cli import add_model_argument
    p = sub.add_parser("inspect", help="print the model's modules, shapes and parameter counts",
                       description="Print the model the way lecture 000 does: its modules with "
                                   "shapes, and parameter counts by part with their shares.")
    add_model_argument(p)
    p.add_argument("--tensors", action="store_true",
                   help="also list every weight tensor: name, shape, count, part")
    p.add_argument("--lecture-000", nargs="?", const="He runs", default=None, metavar="TEXT",
                   help="answer lecture 000's exercises (the last hidden state is for TEXT, "
                        "default 'He runs')")
    p.add_argument("--config", metavar="FILE_OR_NAME", default=None,
                   help="describe the model of a config.json (or folder) without loading weights; "
                        "or one of the configs npllm ships: " + ", ".join(CONFIGS))
    p.add_argument("--json", action="store_true",
                   help="the config, every tensor, the totals by part and (with --lecture-000) "
                        "the answers, as JSON")
    p.set_defaults(func=run)


CONFIGS = {"stablelm-3b-4e1t": "stabilityai/stablelm-3b-4e1t",
           "phi-3-mini-4k-instruct": "microsoft/Phi-3-mini-4k-instruct", "gpt2": "gpt2",
           "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def shipped_config(name):
    """The path of a config npllm ships (by short name or Hub id), or None."""
    by_id = {hub.lower(): short for short, hub in CONFIGS.items()}
    short = by_id.get(name.lower(), name.lower())
    return Path(__file__).resolve().parents[1] / "data" / "configs" / f"{short}.json" \
        if short in CONFIGS else None


def run_config(args):
    from npllm.errors import ConfigError
    from npllm.inspect import config_summary, model_tree
    from npllm.model.family_config import read_config

    path = shipped_config(args.config) or Path(args.config)
    if not path.exists():
        raise ConfigError(f"--config {args.config}: no such file or folder, and not one of the "
                          f"configs npllm ships ({', '.join(CONFIGS)})")
    config = read_config(path)
    summary = config_summary(config)
    if args.json:
        print(json.dumps({"config": config.to_dict(), "parameters": summary.total,
                          **summary.to_dict()}, indent=2))
        return
    print(model_tree(config))
    print()
    print(summary.table(tensors=args.tensors))


def run(args):
    import npllm
    if args.config is not None:
        return run_config(args)
    from npllm.inspect import lecture_000, parameter_summary

    model = npllm.load(args.model, backend=args.backend)
    summary = parameter_summary(model)
    answers = lecture_000(model, args.lecture_000) if args.lecture_000 is not None else None
    if args.json:
        out = {"source": model.source, "config": model.config.to_dict(),
               "parameters": model.num_parameters(), **summary.to_dict()}
        if answers is not None:
            out["lecture_000"] = answers.to_dict()
        print(json.dumps(out, indent=2))
    elif answers is not None:
        print(answers)
    else:
        print(model)
        print()
        print(summary.table(tensors=args.tensors))
