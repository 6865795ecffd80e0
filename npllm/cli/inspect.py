"""``npllm inspect``: the model's module tree, shapes and parameter counts (lecture 000)."""
import json


def add_parser(sub):
    from npllm.cli import add_model_argument
    p = sub.add_parser("inspect", help="print the model's modules, shapes and parameter counts",
                       description="Print the model the way lecture 000 does: its modules with "
                                   "shapes, and parameter counts by part with their shares.")
    add_model_argument(p)
    p.add_argument("--json", action="store_true", help="the config and counts as JSON")
    p.set_defaults(func=run)


def run(args):
    import npllm
    model = npllm.load(args.model, backend=args.backend)
    if args.json:
        print(json.dumps({"source": model.source, "config": model.config.to_dict(),
                          "parameters": model.num_parameters()}, indent=2))
    else:
        print(model)
