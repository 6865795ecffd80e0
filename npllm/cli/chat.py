"""``npllm chat``: a multi-turn conversation in the model's chat template (lecture 003).

In a terminal it asks for each message; from a pipe it reads one message per line::

    echo "What is the capital of France?" | npllm chat

``/reset`` forgets the conversation (the system message stays), ``/quit`` ends it. Greedy by
default, so a conversation can be repeated; lecture 003's settings are
``--temperature 0.2 --top-p 0.9`` (add ``--seed`` to repeat a sampled conversation).
"""
import json
import sys

COMMANDS = {"/reset": "forget the conversation so far (the system message stays)",
            "/quit": "end the chat (also /exit, Ctrl-D)", "/help": "list the commands"}


def add_parser(sub):
    from npllm.cli.generate import add_sampling_arguments, add_special_tokens_argument
    p = sub.add_parser(
        "chat", help="a multi-turn conversation using the model's chat template",
        description="Chat with the model. In a terminal, type a message and press Enter; from a "
                    "pipe, every line is one user message. Commands: "
                    + "; ".join(f"{c}: {h}" for c, h in COMMANDS.items()) + ".")
    add_sampling_arguments(p, max_new_tokens=256)
    add_special_tokens_argument(p)
    p.add_argument("-s", "--system", default=None, metavar="TEXT",
                   help="the system message (default: the chat template's own, if any)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per turn (user, reply, finish reason, tokens, timing)")
    p.set_defaults(func=run)


def read_messages(interactive):
    """User lines: from the terminal with a prompt, or from stdin one per line."""
    if not interactive:
        for line in sys.stdin:
            yield line.rstrip("\r\n")
        return
    while True:
        try:
            yield input("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave
            print(file=sys.stderr)
            return


def run(args):
    import numpy as np

    from npllm.cli import load_model, stdin_is_terminal
    from npllm.cli.generate import sampling_options
    from npllm.generate import ContextLengthError, chat

    options = sampling_options(args)
    interactive = stdin_is_terminal("npllm chat reads its messages from stdin (a terminal or a "
                                    "pipe); give it one, e.g. echo Hello | npllm chat")
    # One generator for the whole conversation: with --seed, every reply can be repeated.
    options["seed"] = np.random.default_rng(args.seed)
    model = load_model(args)
    if interactive:
        print(f"Chatting with {model.source}. Type a message; /reset starts over, /quit ends.",
              file=sys.stderr)

    # The last reply: its KV cache holds the conversation so far, so the next turn runs only
    # the new message (generate's cache_from).
    history, last, failed = [], None, False
    for line in read_messages(interactive):
        message = line.strip()
        if not message:
            continue
        if message in ("/quit", "/exit"):
            break
        if message == "/reset":
            history, last = [], None
            print("(conversation reset)", file=sys.stderr)
            continue
        if message == "/help" or (message.startswith("/") and " " not in message):
            if message != "/help":
                print(f"unknown command {message}", file=sys.stderr)
            for command, what in COMMANDS.items():
                print(f"  {command:<7} {what}", file=sys.stderr)
            continue

        messages = history + [{"role": "user", "content": message}]
        stream = None if args.json else _print_piece
        try:
            result = chat(model, messages, args.max_new_tokens, system=args.system,
                          stream=stream, cache_from=last,
                          allow_special_tokens=args.allow_special_tokens, **options)
        except ContextLengthError as e:
            print(f"npllm chat: error: {e}. Type /reset to start over.", file=sys.stderr)
            failed = True
            continue
        except KeyboardInterrupt:
            if not interactive:
                raise
            print("\n(reply interrupted, not kept)", file=sys.stderr)
            continue
        history = messages + [{"role": "assistant", "content": result.text}]
        last = result if result.cache is not None else None  # None with --no-cache
        if args.json:
            print(json.dumps({"user": message, "reply": result.text,
                              "finish_reason": result.finish_reason, "tokens": len(result.ids),
                              "prompt_tokens": len(result.prompt_ids),
                              "reused_prompt_tokens": result.reused_tokens,
                              "seconds": result.seconds}, ensure_ascii=False), flush=True)
        else:
            print(flush=True)
            if result.finish_reason == "length" and not args.quiet:
                print(f"(reply cut after {len(result.ids)} tokens; raise --max-new-tokens)",
                      file=sys.stderr)
            if interactive:
                print(file=sys.stderr)
    return 2 if failed and not interactive else 0


def _print_piece(piece):
    sys.stdout.write(piece)
    sys.stdout.flush()
