"""``npllm generate PROMPT``: continue a text, streaming the tokens as they come (lecture 002)."""
import json
import sys


def add_sampling_arguments(parser, max_new_tokens):
    """Decoding options shared by ``generate`` and ``chat``."""
    from npllm.cli import add_model_argument
    add_model_argument(parser)
    g = parser.add_argument_group(
        "decoding", "greedy unless a sampling option is given (temperature 0 is greedy); "
                    "lecture 003 samples with --temperature 0.2 --top-p 0.9")
    g.add_argument("-n", "--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"at most N new tokens (default {max_new_tokens})")
    g.add_argument("-t", "--temperature", type=float, default=None, metavar="T",
                   help="sample at temperature T > 0 (0: greedy)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample from the K most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the smallest set of tokens with probability >= P, in (0, 1]")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the sampler: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (not shown; repeatable)")
    g.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute the whole prefix at every step instead of using the KV cache "
                        "(same tokens, slower: lecture 002's timing)")
    g.add_argument("--truncate", action="store_true",
                   help="drop the oldest prompt tokens when prompt + N exceed the context "
                        "(default: an error)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no model-loading messages and no summary line on stderr")


def add_special_tokens_argument(parser):
    """``--allow-special-tokens``, shared by ``chat`` and ``generate --chat``."""
    parser.add_argument("--allow-special-tokens", action="store_true",
                        help="let special-token strings typed in a message (such as "
                             "'<|im_start|>system') be the special tokens, as transformers "
                             "does; by default they are plain text, so a message cannot open a "
                             "turn of another role")


def sampling_options(args):
    """The keyword arguments of ``npllm.generate.generate`` given on the command line, checked
    (a bad value is an error before the model is loaded)."""
    from npllm.generate import check_sampling
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                stop=args.stop, use_cache=args.use_cache, truncate=args.truncate)


def add_parser(sub):
    p = sub.add_parser(
        "generate", help="continue a text, streaming tokens as they come",
        description="Generate text after PROMPT, printing each piece as soon as it is decoded. "
                    "Greedy by default; sampling options as in transformers.")
    p.add_argument("prompt", nargs="?", default=None,
                   help="the text to continue ('-' or absent: read it from stdin)")
    add_sampling_arguments(p, max_new_tokens=128)
    p.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user message in the model's chat template")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="with --chat: the system message")
    add_special_tokens_argument(p)
    p.add_argument("--steps", action="store_true",
                   help="show each step: chosen token, its probability, the top candidates")
    p.add_argument("--candidates", type=int, default=5, metavar="N",
                   help="with --steps: how many candidates per step (default 5)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, ids, finish reason, timing, steps)")
    p.set_defaults(func=run)


def read_prompt(args):
    prompt = args.prompt
    if prompt is None or prompt == "-":
        from npllm.cli import stdin_is_terminal
        if stdin_is_terminal("give a PROMPT as an argument") and prompt is None:
            raise ValueError("give a PROMPT (or pipe it on stdin)")
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):  # the newline that echo and editors add
            prompt = prompt[:-1]
    if not prompt:  # spaces are text: they are scored, and continued, like any other
        raise ValueError("the prompt is empty: give some text to continue")
    return prompt


def format_steps(steps):
    """A table, one row per generated token."""
    rows = [f"{'step':>4}  {'id':>6}  {'prob':>6}  {'token':<16}  top candidates (prob)"]
    for i, s in enumerate(steps):
        top = "  ".join(f"{c[1]!r} {c[2]:.3f}" for c in s.candidates)
        rows.append(f"{i:>4}  {s.token_id:>6}  {s.prob:6.3f}  {s.text!r:<16}  {top}")
    return "\n".join(rows)


def run(args):
    from npllm.cli import load_model
    from npllm.generate import chat_prompt_ids, generate

    options = sampling_options(args)
    if args.candidates < 1:
        raise ValueError(f"--candidates must be >= 1, got {args.candidates}")
    if args.system and not args.chat:
        raise ValueError("--system needs --chat")
    if args.allow_special_tokens and not args.chat:
        raise ValueError("--allow-special-tokens applies to --chat (a plain prompt's special-"
                         "token strings are always the special tokens)")
    prompt = prompt_text = read_prompt(args)
    model = load_model(args)
    if args.chat:
        prompt = chat_prompt_ids(model, prompt, system=args.system,
                                 allow_special_tokens=args.allow_special_tokens)

    def show(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(model, prompt, args.max_new_tokens, record_steps=args.steps,
                      n_candidates=args.candidates, stream=None if args.json else show,
                      **options)
    if args.json:
        shown = model.tokenizer.decode(result.prompt_ids) if args.chat else prompt_text
        print(json.dumps({"model": model.source, "prompt": shown, **result.to_dict()},
                         ensure_ascii=False))
        return 0
    print()
    if args.steps:
        print(format_steps(result.steps))
    if not args.quiet:
        print(f"[{summary(result)}]", file=sys.stderr)
    return 0


def summary(result):
    """``12 tokens, eos, first token after 0.41 s, then 35.2 tokens/s``: the first token's time
    holds the prompt's forward pass; the rate is that of the tokens after it (lecture 002's
    decoding speed). A first generation's compilation of the kernels, when it took a second or
    more, is said apart: it is in neither."""
    rate = result.decode_tokens_per_second
    after = f", then {rate:.1f} tokens/s" if rate == rate else ""  # NaN: a single token
    compiled = (f" (before it, {result.compile_seconds:.1f} s compiling the kernels: once per "
                f"installation)" if result.compile_seconds >= 1 else "")
    return (f"{len(result.ids)} tokens, {result.finish_reason}, first token after "
            f"{result.first_token_seconds:.2f} s{compiled}{after}")

