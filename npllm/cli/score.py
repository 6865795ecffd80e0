"""``npllm score``: the log-probability of each text, factor by factor (lecture 000's chain rule).

Texts come from the arguments, a file (``-f FILE``) or stdin: plain text (a line each), JSONL
(fields chosen with ``--text-field``, ``--context-field``, ``--id-field``) or TSV with a header.
Results go out as a readable table, JSONL (first record: metadata) or TSV (a row per token).
A line that cannot be scored becomes an error record and the run goes on; the exit status is 1
when some failed. Every record is flushed as soon as it is written, and ``--resume`` continues
an interrupted ``-o FILE`` run: the result is the file one uninterrupted run would have written.
"""
import argparse
import io
import os
import sys
from pathlib import Path

from npllm.cli.score_io import (EXIT_SOME_FAILED, JsonlWriter, TableWriter, TsvWriter,
                                add_input_arguments, add_scoring_arguments, gather_items,
                                lock_output, parse_bos, put_in_input_order, resume_output)
from npllm.errors import OutputError
from npllm.model.hub import DEFAULT_MODEL

EPILOG = """\
examples:
  npllm score "He runs fast"
      the factors P(He) x P( runs | He) x P( fast | He runs), their numbers and the total
  npllm score "The keys to the cabinet are" "The keys to the cabinet is" --base 2
      two texts, surprisal in bits
  npllm score --context "The capital of France is" " Paris" " Lyon"
      only the continuations are scored, each conditioned on the context
  npllm score -f sentences.txt --format jsonl -o scores.jsonl
      a line each, with a progress bar; run it again with --resume after an interruption
  npllm score -f items.jsonl --text-field sentence --context-field prefix --id-field item \\
      --format tsv > surprisal.tsv
      one TSV row per token (id, token, log_prob, ...): ready for R or pandas
  cat texts.txt | npllm score --format jsonl --quiet | jq .total

numbers:
  log_probs are log P(token | everything before it), in nats (--base e) or bits (--base 2);
  total is their sum, log P(text | context); perplexity = exp(-mean in nats); bits per byte =
  -total in bits / UTF-8 bytes of the scored text. The BOS (document-start) token put before
  every text is named in the metadata; with --bos none the first token is unscored (null).
  The default model's weights are the Q4_1 GGUF of SmolLM2-135M-Instruct, dequantized: close
  to, not equal to, the Hub's bfloat16 weights.

exit status: 0 all texts scored, 1 some texts failed (see the error records), 2 bad usage.
"""


def add_parser(sub):
    from npllm.cli import add_model_argument
    p = sub.add_parser(
        "score", help="log-probability of texts, token by token (the chain rule)",
        description="Score texts with a language model: log P(text) = sum of log P(token | "
                    "tokens before it). Prints the product of conditionals for people, JSONL or "
                    "TSV for scripts.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="texts to score (each argument is one text); without TEXT or -f, "
                        "texts are read from stdin, a line each")
    add_input_arguments(p)
    p.add_argument("-c", "--context", default=None, metavar="TEXT",
                   help="a context (prefix) for every text: only the text after it is scored, "
                        "conditioned on it (JSONL/TSV: --context-field gives one per record)")
    out = p.add_argument_group("output")
    out.add_argument("--format", choices=["table", "jsonl", "tsv"], default="table",
                     help="table: the factors for people (default); jsonl: one JSON record per "
                          "text after a metadata record, full precision; tsv: one row per "
                          "token with a header, full precision, NA for unscored")
    out.add_argument("-o", "--output", metavar="FILE",
                     help="write to FILE instead of stdout (refuses to overwrite an existing "
                          "file unless --force or --resume)")
    out.add_argument("--resume", action="store_true",
                     help="continue an interrupted run: keep the records already in -o FILE, "
                          "skip their ids, score the rest (same settings required)")
    out.add_argument("--force", action="store_true", help="overwrite -o FILE if it exists")
    out.add_argument("--words", action="store_true",
                     help="add word-level scores (token scores summed over whitespace-"
                          "delimited words)")
    out.add_argument("--rank", action="store_true",
                     help="add each token's rank in the predicted distribution (1 = the most "
                          "likely token)")
    out.add_argument("--entropy", action="store_true",
                     help="add the entropy of each predicted distribution (in --base units)")
    out.add_argument("--greedy", action="store_true",
                     help="add whether each token is the model's most likely one (argmax)")
    out.add_argument("-q", "--quiet", action="store_true",
                     help="no progress bar and no model-loading messages on stderr")
    add_scoring_arguments(p)
    add_model_argument(p)
    from npllm import distributed
    distributed.add_arguments(p)
    p.set_defaults(func=run)


def run(args):
    if args.resume and not args.output:
        raise ValueError("--resume continues an output file: give it with -o FILE")
    if args.resume and args.format == "table":
        raise ValueError("--resume needs a machine format: --format jsonl or tsv")
    out_path = Path(args.output) if args.output else None
    if out_path and out_path.is_dir():
        raise OutputError(f"{out_path} is a folder: give -o a file name")
    if out_path and out_path.exists() and out_path.stat().st_size and not (
            args.resume or args.force):
        raise OutputError(f"{out_path} exists: add --resume to continue it, --force to "
                          "overwrite it, or give another -o FILE")
    items, fmt, source = gather_items(args)

    locked = [lock_output(out_path)] if out_path else []
    try:
        return score_items(args, items, fmt, source, out_path, locked)
    finally:
        for f in locked:
            f.close()
        if out_path and out_path.exists() and not out_path.stat().st_size and locked:
            out_path.unlink()  # nothing was written: leave no empty file behind


def score_items(args, items, fmt, source, out_path, locked):
    from npllm import __version__
    from npllm.score import BAR_FORMAT, ScoreError, check_settings, iter_scores, resolve_bos

    from npllm.cli import load_model
    model = load_model(args)
    bos = resolve_bos(model, parse_bos(args.bos))
    base, window, stride, batch_size = check_settings(model, args.base, args.window,
                                                      args.stride, args.batch_size)
    extras = [name for name, on in (("ranks", args.rank), ("entropies", args.entropy),
                                    ("is_greedy", args.greedy)) if on]
    metadata = {
        "npllm_version": __version__, "model": args.model or DEFAULT_MODEL,
        "source": model.source, "bos": bos.to_dict(), "base": base,
        "unit": "nats" if base == "e" else "bits", "window": window, "stride": stride,
        "slide": not args.no_slide, "batch_size": batch_size, "extras": extras,
        "input": source, "input_format": fmt,
        "fields": {"text": args.text_field, "context": args.context_field, "id": args.id_field},
        "context": args.context, "n_inputs": len(items),
        "split_special_tokens": args.split_special_tokens,
    }

    if args.format == "jsonl":
        writer = JsonlWriter(None, args.words)
    elif args.format == "tsv":
        writer = TsvWriter(None, extras, out_path)
    else:
        writer = TableWriter(None, args.words, len(items) > 1)
    stream, resumed = sys.stdout, None
    if out_path:
        f = locked[0]
        if args.resume:
            f, resumed = resume_output(f, out_path, writer, metadata, items)
            if f is not locked[0]:
                locked.append(f)
        if resumed is None:
            # a file written since the first check (with --resume: one with no complete record)
            if f.seek(0, os.SEEK_END) and not (args.force or args.resume):
                raise OutputError(f"{out_path} exists: add --resume to continue it, --force to "
                                  "overwrite it, or give another -o FILE")
            f.truncate(0)
        stream = io.TextIOWrapper(f, encoding="utf-8", newline="\n")
    writer.stream = stream

    skip = set()
    if resumed is not None:
        skip = {i for i, item in enumerate(items)
                if item.id is not None and writer.key(item.id) in resumed.done}
        if not args.quiet:
            print(f"npllm score: {resumed.report(out_path, len(items) - len(skip))}",
                  file=sys.stderr)
    bar = None
    if args.file is not None or not args.texts:
        from tqdm import tqdm
        bar = tqdm(total=len(items) - len(skip), unit="text", desc="npllm score",
                   file=sys.stderr, disable=args.quiet, dynamic_ncols=True,
                   bar_format=BAR_FORMAT)
    failed = 0
    try:
        if resumed is None:
            writer.start(metadata)
        pairs = [(it.text, it.context) if it.error is None else (None, None) for it in items]
        settings = dict(bos=bos, base=base, window=window, stride=stride,
                        slide=not args.no_slide, batch_size=batch_size, with_rank=args.rank,
                        with_entropy=args.entropy, with_greedy=args.greedy,
                        split_special_tokens=args.split_special_tokens)
        from npllm import distributed
        if distributed.wanted(args):  # on a Dask cluster: the same records, in input order
            results = distributed.cli_results(args, pairs, out_path=out_path, skip=skip,
                                              **settings)
        else:
            results = iter_scores(model, pairs, skip=skip,
                                  on_progress=None if bar is None else bar.update, **settings)
        for i, result in results:
            item = items[i]
            if item.error is not None:
                writer.error(item, item.error)
                failed += 1
            elif isinstance(result, ScoreError):
                where = f"line {item.line}: " if item.line is not None else \
                    f"text {item.id}: "
                writer.error(item, where + str(result))
                failed += 1
            else:
                writer.score(item, result)
    finally:
        if bar is not None:
            bar.close()
        if stream is not sys.stdout:
            stream.flush()
            stream.detach()
    if resumed is not None and resumed.errors:  # their new records came last
        locked.append(put_in_input_order(f, out_path, writer, metadata, items))
    if failed:
        where = f" (error records in {out_path})" if out_path else ""
        print(f"npllm score: {failed} of {len(items)} texts could not be scored{where}",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0
