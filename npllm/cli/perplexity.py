"""``npllm perplexity FILE``: token-weighted perplexity of a corpus, with its standard error.

Every document is scored alone (document-start token first, sliding window when it is longer
than the model's context); the perplexity pools all scored tokens: exp(total NLL / tokens).
"""
import argparse
import json
import re
import sys

from npllm.cli import load_model, stdin_is_terminal
from npllm.cli.score_io import (EXIT_SOME_FAILED, add_input_arguments, add_scoring_arguments,
                                decode, input_format, parse_bos, read_items, read_lines)
from npllm.errors import InputError
from npllm.model.hub import DEFAULT_MODEL

EPILOG = """\
examples:
  npllm perplexity corpus.txt
      every line is a document (blank lines are skipped)
  npllm perplexity --split paragraph book.txt
      documents separated by blank lines
  npllm perplexity --split file --window 1024 --stride 512 wiki.test.raw
      the whole file as one text, scored with a sliding window of 1024 tokens
  npllm perplexity -f docs.jsonl --text-field body --format json
      one document per JSON record; the result as JSON

numbers:
  perplexity = exp(NLL), NLL = -(sum of the log-probabilities of every scored token) / (number
  of scored tokens): long documents weigh more. Its standard error comes from the per-document
  losses (documents are the independent units; with one document, from the per-token losses,
  which understates it), by the delta method; the 95% interval is exp(NLL +- 1.96 SE(NLL)).
  Bits per byte = total bits / UTF-8 bytes: comparable across tokenizers.

exit status: 0 all documents scored, 1 some failed (counted, left out), 2 bad usage.
"""


def add_parser(sub):
    from npllm.cli import add_model_argument
    p = sub.add_parser(
        "perplexity", help="token-weighted perplexity of a corpus, with its standard error",
        description="Corpus perplexity: every document is scored alone, all their tokens are "
                    "pooled, and the standard error says how precise the figure is.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="text files ('-' for stdin); documents per --split")
    add_input_arguments(p)
    p.add_argument("--split", choices=["line", "paragraph", "file"], default="line",
                   help="plain-text documents: a line each (default), paragraphs separated by "
                        "blank lines, or the whole file")
    p.add_argument("--format", choices=["table", "json"], default="table",
                   help="table for people (default) or one JSON object, full precision")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no model-loading messages on stderr")
    add_scoring_arguments(p)
    add_model_argument(p)
    p.set_defaults(func=run)


def documents(args):
    """(texts, problems): the documents of every input file, and the lines that failed."""
    paths = list(args.files) + ([args.file] if args.file else [])
    if not paths:
        if stdin_is_terminal("give a FILE to measure"):
            raise ValueError("give a FILE to measure (or '-' / a pipe for stdin)")
        paths = ["-"]
    texts, problems, any_line = [], [], False
    for path in paths:
        if input_format(args, path) != "text":
            if args.split != "line":
                raise ValueError("--split applies to plain-text input; JSONL/TSV hold one "
                                 "document per record")
            items, _ = read_items(args, path)
            any_line = any_line or bool(items)
            for item in items:
                if item.error:
                    problems.append(f"{path}: {item.error}")
                else:
                    texts.append(item.text)
            continue
        lines = read_lines(path)
        any_line = any_line or bool(lines)
        good = []
        for n, raw in enumerate(lines, 1):
            text, error = decode(raw, n)
            if error:
                problems.append(f"{path}: {error}")
            else:
                good.append(text)
        if args.split == "line":
            texts += [t for t in good if t.strip()]
        elif args.split == "paragraph":
            texts += [p.strip("\n") for p in re.split(r"\n\s*\n", "\n".join(good)) if p.strip()]
        elif "\n".join(good).strip():
            texts.append("\n".join(good))
    if not texts and not problems:
        shown = ", ".join("stdin" if p == "-" else p for p in paths)
        raise InputError(f"nothing to score: {shown} "
                         + ("is empty" if not any_line else "has only blank lines"))
    return texts, problems


def run(args):
    from npllm import __version__
    from npllm.score import (BAR_FORMAT, CorpusPerplexity, ScoreError, check_settings, corpus_stats,
                             iter_scores, resolve_bos)

    texts, problems = documents(args)
    model = load_model(args)
    bos = resolve_bos(model, parse_bos(args.bos))
    _, window, stride, batch_size = check_settings(model, "e", args.window, args.stride,
                                                    args.batch_size)
    ok = []
    from tqdm import tqdm
    bar = tqdm(total=len(texts), unit="doc", desc="npllm perplexity", file=sys.stderr,
               disable=args.quiet, dynamic_ncols=True, bar_format=BAR_FORMAT)
    try:
        for i, r in iter_scores(model, texts, bos=bos, window=window, stride=stride,
                                slide=not args.no_slide, batch_size=batch_size,
                                split_special_tokens=args.split_special_tokens,
                                on_progress=bar.update):
            if isinstance(r, ScoreError):
                problems.append(f"document {i + 1}: {r}")
            else:
                ok.append(r)
    finally:
        bar.close()
    if not ok:
        raise ScoreError("no document could be scored" + (f": {problems[0]}" if problems else
                                                          ": the input is empty"))
    result = CorpusPerplexity(**corpus_stats(ok), n_failed=len(problems), bos=bos,
                              window=window, stride=stride)
    model_name = args.model or DEFAULT_MODEL
    if args.format == "json":
        d = result.to_dict()
        d["errors"] = problems
        print(json.dumps({"npllm_version": __version__, "model": model_name,
                          "source": model.source, "split": args.split, **d},
                         ensure_ascii=False, indent=2))
    else:
        print(f"model           {model_name}\nweights         {model.source}")
        print(result)
    for p in problems:
        print(f"npllm perplexity: skipped {p}", file=sys.stderr)
    return EXIT_SOME_FAILED if problems else 0
