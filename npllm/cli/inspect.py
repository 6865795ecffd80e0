"""``npllm inspect``: the model's module tree, shapes and parameter counts (lecture 000).

    npllm inspect                   # module tree, then parameters by part with their shares
    npllm inspect --tensors         # ... and every weight tensor (layers folded)
    npllm inspect --lecture-000     # the answers to lecture 000's exercises
    npllm inspect --json            # all of it as JSON, for scripts
"""
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
    p.add_argument("--json", action="store_true",
                   help="the config, every tensor, the totals by part and (with --lecture-000) "
                        "the answers, as JSON")
    p.set_defaults(func=run)


def run(args):
    import npllm
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
