"""``npllm plot``: the lecture's plots as PNG files (lecture 003; needs matplotlib).

    npllm plot attention "2 + 2 =" --layer 0 -o attention.png
    npllm plot heads "2 + 2 =" --layer 0 -o heads.png
    npllm plot next-token " 2 + 2 = " --chat --temperature 0.2 --top-p 0.9 -o next.png
    npllm plot logit-lens "The capital of France is" -o lens.png
    npllm plot embeddings Cat Dog Bird Machine Car -o words.png
    npllm plot positions --positions 64 -C 10000 -o positions.png
    npllm plot attention-output " 2 + 2 = " --layer 0 -o out.png
    npllm plot animation " 2 + 2 - 3 = " --layers 0 29 --tokens 15 -o animation.gif
"""
import sys

KINDS = {
    "attention": "one layer's attention pattern (one head, or the mean of all heads)",
    "heads": "every head of one layer as small multiples",
    "next-token": "bar chart of the most likely next tokens, before/after sampling filters",
    "logit-lens": "what each layer would predict at each position",
    "embeddings": "PCA scatter of words or sentences",
    "positions": "sinusoidal positional encoding vs RoPE",
    "attention-output": "lecture 003's out @ out.T heatmap of one layer's attention output",
    "animation": "lecture 003's out @ out.T per generated token, as a GIF or HTML player",
}


def add_parser(sub):
    from npllm.cli import add_model_argument

    p = sub.add_parser("plot", help="draw the lecture's plots (attention, next token, ...) to PNG",
                       description="Draw a plot of the model to an image file (PNG, SVG or PDF "
                                   "by extension). Needs matplotlib: pip install 'npllm[plot]'.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)

    def kind(name, text=True):
        k = kinds.add_parser(name, help=KINDS[name], description=KINDS[name].capitalize() + ".")
        if text:
            k.add_argument("text", help="the text to run through the model ('-': read stdin)")
        add_model_argument(k)
        out = f"{name}.gif" if name == "animation" else f"{name}.png"
        k.add_argument("-o", "--output", metavar="FILE", default=None,
                       help=f"the image to write (default: {out})")
        k.set_defaults(func=run, default_output=out)
        return k

    def chat(k):
        k.add_argument("--chat", action="store_true",
                       help="wrap the text in the chat template as a user message first")

    for name in ("attention", "heads"):
        k = kind(name)
        k.add_argument("-l", "--layer", type=int, default=0,
                       help="layer, from 0 (negative: from the end; default 0)")
        if name == "attention":
            k.add_argument("--head", type=int, default=None,
                           help="query head, from 0 (default: the mean of all heads)")
        chat(k)

    k = kind("next-token")
    k.add_argument("-k", type=int, default=20, help="how many tokens to show (default 20)")
    k.add_argument("--temperature", type=float, default=1.0, help="default 1.0 (off)")
    k.add_argument("--top-k", type=int, default=0, help="default 0 (off)")
    k.add_argument("--top-p", type=float, default=1.0, help="default 1.0 (off)")
    chat(k)

    k = kind("logit-lens")
    chat(k)

    k = kind("attention-output")
    k.add_argument("-l", "--layer", type=int, default=0,
                   help="layer, from 0 (negative: from the end; default 0)")
    chat(k)

    k = kind("animation")
    k.add_argument("--layers", type=int, nargs="+", default=[0, -1], metavar="LAYER",
                   help="layers drawn side by side (default: 0 -1, the first and the last)")
    k.add_argument("--tokens", type=int, default=15,
                   help="tokens to generate greedily, one frame each (default 15)")
    k.add_argument("--seconds", type=float, default=0.6, help="seconds per frame (default 0.6)")
    k.description += " -o FILE.gif writes an animated GIF, -o FILE.html a page with a player."
    chat(k)

    k = kinds.add_parser("embeddings", help=KINDS["embeddings"],
                         description="PCA scatter of the mean vector of each text.")
    k.add_argument("texts", nargs="+", metavar="TEXT", help="two or more words or sentences")
    add_model_argument(k)
    k.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="the image to write (default: embeddings.png)")
    k.add_argument("--compare", nargs="+", metavar="TEXT", default=None,
                   help="more texts drawn in the same plane (e.g. the sentences shuffled)")
    k.add_argument("--hidden-state", type=int, default=0,
                   help="0: token embeddings (default); -1: last hidden state; i: "
                        "transformers' hidden_states[i]")
    k.add_argument("--positional", choices=["add", "multiply"], default=None,
                   help="combine the embeddings with the sinusoidal encoding first")
    k.add_argument("-C", type=float, default=1.0,
                   help="constant of the sinusoidal encoding (default 1, as in the lecture)")
    k.set_defaults(func=run)

    k = kind("positions", text=False)
    k.add_argument("--positions", type=int, default=64, help="how many positions (default 64)")
    k.add_argument("-C", type=float, default=10000.0,
                   help="constant of the sinusoidal encoding (default 10000)")


def _text(args):
    if args.text == "-":
        from npllm.cli import stdin_is_terminal
        stdin_is_terminal("give the text as an argument instead of '-'")
        return sys.stdin.read()
    return args.text


def run(args):
    import npllm
    from npllm import plot

    text = _text(args) if args.kind in ("attention", "heads", "next-token", "logit-lens",
                                        "attention-output", "animation") \
        else None  # read before the model is loaded: a closed stdin fails at once
    path = args.output or getattr(args, "default_output", f"{args.kind}.png")
    if args.kind == "animation":  # a wrong extension fails before the model loads
        from npllm.animate import check_animation_path
        check_animation_path(path)
    model = npllm.load(args.model, backend=args.backend)
    if args.kind == "attention":
        plot.attention(model, text, args.layer, args.head, args.chat, path=path)
    elif args.kind == "heads":
        plot.heads(model, text, args.layer, args.chat, path=path)
    elif args.kind == "next-token":
        plot.next_token(model, text, args.k, args.temperature, args.top_k, args.top_p,
                        args.chat, path=path)
    elif args.kind == "logit-lens":
        plot.logit_lens(model, text, chat=args.chat, path=path)
    elif args.kind == "embeddings":
        plot.embeddings(model, args.texts, args.compare, args.hidden_state, args.positional,
                        args.C, path=path)
    elif args.kind == "positions":
        plot.positions(model, args.positions, args.C, path=path)
    elif args.kind == "attention-output":
        from npllm import animate
        animate.attention_output(model, text, args.layer, args.chat, path=path)
    elif args.kind == "animation":
        from npllm import animate
        generation = animate.attention_output_animation(
            model, text, path, args.layers, args.tokens, args.chat, args.seconds)
        print(f"npllm plot animation: {len(generation.ids)} frames, one per generated token: "
              f"{generation.text!r}", file=sys.stderr)
    print(f"npllm plot {args.kind}: wrote {path}", file=sys.stderr)
