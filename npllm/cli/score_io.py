"""The input and output of ``npllm score`` and ``npllm perplexity``: their shared options; texts
from arguments, a file or stdin (plain text, JSONL, TSV) as :class:`Item` records with unique
ids; the writers (table, JSONL, TSV); and the output file, locked against a second writer and
resumed (:func:`resume_output`) without losing or doubling a record.
"""
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from npllm.errors import InputError, OutputError

EXIT_SOME_FAILED = 1
UTF8_BOM = b"\xef\xbb\xbf"


def add_input_arguments(p):
    inp = p.add_argument_group("input")
    inp.add_argument("-f", "--file", metavar="FILE",
                     help="read texts from FILE ('-' for stdin)")
    inp.add_argument("--input-format", choices=["auto", "text", "jsonl", "tsv"], default="auto",
                     help="text: a text per line; jsonl: a JSON object per line; tsv: tab-"
                          "separated with a header line; auto (default): by the file's suffix "
                          "(.jsonl/.ndjson/.json, .tsv), else text")
    inp.add_argument("--text-field", default=None, metavar="NAME",
                     help="JSONL/TSV field holding the text (default: text)")
    inp.add_argument("--context-field", default=None, metavar="NAME",
                     help="JSONL/TSV field holding each text's context (null/empty: none)")
    inp.add_argument("--id-field", default=None, metavar="NAME",
                     help="JSONL/TSV field holding each text's id (default: the line number); "
                          "ids must be unique, --resume relies on them")


def add_scoring_arguments(p):
    from npllm.score import DEFAULT_BATCH_SIZE
    sc = p.add_argument_group("scoring")
    sc.add_argument("--bos", default="auto", metavar="auto|none|TOKEN",
                    help="token put before every text so its first token has a context: auto "
                         "(default: the model's document-start token, for SmolLM2 "
                         "<|endoftext|>; never added twice), none (the first token is then "
                         "unscored), or a token such as '<|im_start|>' or an id")
    sc.add_argument("--base", choices=["e", "2"], default="e",
                    help="log base: e (nats, default) or 2 (bits: surprisal in bits)")
    sc.add_argument("--window", type=int, default=None, metavar="N",
                    help="tokens per forward pass (default: the model's context length); longer "
                         "texts are scored with a sliding window")
    sc.add_argument("--stride", type=int, default=None, metavar="N",
                    help="tokens the sliding window advances (default: window/2): each token "
                         "is scored once with at least window - stride tokens of context")
    sc.add_argument("--no-slide", action="store_true",
                    help="make texts longer than the window an error instead of sliding")
    sc.add_argument("--split-special-tokens", action="store_true",
                    help="score special-token strings written in a text (such as "
                         "'<|im_start|>') as plain text, their characters' ordinary tokens "
                         "(default: as the special tokens, the way chat transcripts were "
                         "trained)")
    sc.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                    help=f"texts per forward pass (default {DEFAULT_BATCH_SIZE}); padding does "
                         "not change the numbers")


# -- input --------------------------------------------------------------------------------------

@dataclass
class Item:
    """One input record: what to score, or why it cannot be."""
    id: object
    line: int | None
    text: str | None = None
    context: str | None = None
    error: str | None = None


def input_format(args, path):
    fmt = args.input_format
    if fmt == "auto":
        suffix = Path(path).suffix.lower() if path and path != "-" else ""
        fmt = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".tsv": "tsv"}.get(
            suffix, "text")
    if fmt == "text" and (args.text_field or args.context_field or args.id_field):
        raise ValueError("--text-field, --context-field and --id-field apply to JSONL or TSV "
                         "input; give --input-format jsonl or tsv (or a .jsonl/.tsv file)")
    return fmt


def read_lines(path):
    """The lines of FILE (or stdin for '-') as bytes, without their line ends."""
    if path == "-":
        from npllm.cli import stdin_is_terminal
        stdin_is_terminal("give texts as arguments or with -f FILE")
        data = sys.stdin.buffer.read()
    else:
        if Path(path).is_dir():
            raise InputError(f"{path} is a folder: give a file to read")
        data = Path(path).read_bytes()
    if data.startswith(UTF8_BOM):  # what some editors put first: not text to score
        data = data[len(UTF8_BOM):]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def decode(raw, n):
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, (f"line {n} is not valid UTF-8 ({e.reason}: byte 0x{raw[e.start]:02x} at "
                      f"byte {e.start})")


def parse_text(lines):
    for n, raw in enumerate(lines, 1):
        text, error = decode(raw, n)
        yield Item(n, n, text, None, error)


def field_value(record, name, what, n):
    if name not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise LookupError(f"line {n} has no field {name!r} for the {what} (its fields: {fields})")
    return record[name]


def check_id(value, name, n):
    """A record's id: a string or a whole number (JSON true, 7.0, null or an object would
    print alike in TSV or be unreadable by a later --resume)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise LookupError(f"line {n}: field {name!r} (the id) must be a non-empty string or a "
                          f"whole number, got {json.dumps(value)[:40]}")
    return value


def make_item(record, n, text_field, context_field, id_field):
    """An Item from one JSONL object or TSV row (a dict). Its id is the --id-field's value, else
    the line number; a line whose id cannot be read has none (None), so that it never takes
    the id of another line."""
    item_id = n
    try:
        if id_field:
            item_id = None
            item_id = check_id(field_value(record, id_field, "id", n), id_field, n)
        text = field_value(record, text_field, "text", n)
        context = field_value(record, context_field, "context", n) if context_field else None
    except LookupError as e:
        return Item(item_id, n, error=str(e))
    if not isinstance(text, str):
        return Item(item_id, n, error=f"line {n}: field {text_field!r} must be a string, got "
                                      f"{json.dumps(text)[:40]}")
    if context is not None and not isinstance(context, str):
        return Item(item_id, n, error=f"line {n}: field {context_field!r} must be a string or "
                                      f"null, got {json.dumps(context)[:40]}")
    return Item(item_id, n, text, context or None)


def parse_jsonl(lines, text_field, context_field, id_field):
    for n, raw in enumerate(lines, 1):
        no_id = None if id_field else n  # a line number is no user id: it could be one
        line, error = decode(raw, n)
        if error:
            yield Item(no_id, n, error=error)
            continue
        if not line.strip():
            yield Item(no_id, n, error=f"line {n} is empty (expected a JSON object)")
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else \
                "nested too deeply"
            yield Item(no_id, n, error=f"line {n} is not valid JSON: {why}")
            continue
        if not isinstance(record, dict):
            yield Item(no_id, n, error=f"line {n} is not a JSON object: {line[:40]}")
            continue
        yield make_item(record, n, text_field, context_field, id_field)


def parse_tsv(lines, text_field, context_field, id_field):
    if not lines:
        return
    header, error = decode(lines[0], 1)
    if error:
        raise ValueError(f"the TSV header: {error}")
    columns = header.split("\t")
    for name, what in ((text_field, "text"), (context_field, "context"), (id_field, "id")):
        if name and name not in columns:
            raise ValueError(f"the TSV header has no column {name!r} for the {what} (its "
                             f"columns: {', '.join(columns)}); choose one with --{what}-field")
    for n, raw in enumerate(lines[1:], 2):
        no_id = None if id_field else n
        line, error = decode(raw, n)
        if error:
            yield Item(no_id, n, error=error)
            continue
        cells = line.split("\t")
        if len(cells) != len(columns):
            yield Item(no_id, n, error=f"line {n} has {len(cells)} tab-separated cells, the header "
                                   f"has {len(columns)}")
            continue
        yield make_item(dict(zip(columns, cells)), n, text_field, context_field, id_field)


def read_items(args, path):
    """Items from FILE/stdin in the chosen format; (items, input format)."""
    fmt = input_format(args, path)
    lines = read_lines(path)
    text_field = args.text_field or "text"
    if fmt == "text":
        return list(parse_text(lines)), fmt
    parse = parse_jsonl if fmt == "jsonl" else parse_tsv
    return list(parse(lines, text_field, args.context_field, args.id_field)), fmt


def gather_items(args):
    from npllm.cli import stdin_is_terminal
    if args.texts and args.file:
        raise ValueError("give texts as arguments or with -f FILE, not both")
    if args.texts:
        if args.text_field or args.context_field or args.id_field:
            raise ValueError("--text-field, --context-field and --id-field apply to JSONL or "
                             "TSV input (-f FILE), not to texts given as arguments")
        items, fmt, source = [Item(i, None, t) for i, t in enumerate(args.texts, 1)], \
            "arguments", "arguments"
    else:
        path = args.file or "-"
        if path == "-" and stdin_is_terminal("give texts as arguments or with -f FILE"):
            raise ValueError("nothing to score: give texts as arguments, -f FILE, or pipe "
                             "text into stdin (a text per line)")
        items, fmt = read_items(args, path)
        source = "stdin" if path == "-" else path
    if args.context is not None:
        if getattr(args, "context_field", None):
            raise ValueError("give --context or --context-field, not both")
        for item in items:
            item.context = args.context
    if not items:
        raise InputError(f"nothing to score: {source} is empty")
    seen = {}
    for item in items:  # ids identify records for --resume: they must be unique
        if item.id is None:  # a line whose id could not be read
            continue
        key = str(item.id)
        if item.error is None and key in seen:
            item.error = (f"line {item.line}: id {item.id!r} was already used at line "
                          f"{seen[key]}; ids must be unique")
        seen.setdefault(key, item.line)
    return items, fmt, source


# -- output -------------------------------------------------------------------------------------

def tsv_cell(value):
    if value is None:
        return "NA"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n") \
        .replace("\r", "\\r")


class JsonlWriter:
    resumable = True

    def __init__(self, stream, words):
        self.stream, self.words = stream, words

    def _write(self, record):
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()

    @staticmethod
    def key(item_id):
        return json.dumps(item_id, ensure_ascii=False)

    def start(self, metadata):
        self._write({"type": "metadata", **metadata})

    def score(self, item, result):
        self._write({"type": "score", "id": item.id, "line": item.line,
                     **result.to_dict(words=self.words)})

    def error(self, item, message):
        self._write({"type": "error", "id": item.id, "line": item.line, "error": message,
                     "text": item.text, "context": item.context})

    @staticmethod
    def read_records(data, metadata, path):
        """A JSONL file's records: ``(head, [(key, is_error, raw bytes)], dropped bytes)``.
        ``head`` is the metadata line; reading stops at the first line that is not a complete
        record (the half line a killed run leaves), whose bytes and the rest are dropped."""
        lines, records, end = data.split(b"\n"), [], 0
        if len(lines) < 2:  # not even the metadata record was finished: start afresh
            return None, [], len(data)
        for i, raw in enumerate(lines[:-1]):  # the piece after the last newline is incomplete
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError, RecursionError):
                if i == 0:
                    raise OutputError(f"{path} does not start with npllm's metadata record: not "
                                      "an npllm score file; give another -o FILE") from None
                break
            if i == 0:
                check_metadata(record, metadata, path)
            elif record.get("type") in ("score", "error") and "id" in record:
                records.append((JsonlWriter.key(record["id"]), record["type"] == "error",
                                raw + b"\n"))
            else:
                break
            end += len(raw) + 1
        return lines[0] + b"\n", records, len(data) - end


def check_metadata(found, wanted, path):
    if found.get("type") != "metadata":
        raise OutputError(f"{path} does not start with npllm's metadata record: not an npllm "
                          "score file; give another -o FILE")
    keys = ("source", "bos", "base", "window", "stride", "slide", "batch_size", "extras",
            "input_format", "fields", "context", "split_special_tokens")
    defaults = {"split_special_tokens": False}  # files written before the option existed
    diff = [k for k in keys if found.get(k, defaults.get(k)) != wanted.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {json.dumps(found.get(k))} in the file, "
                          f"{json.dumps(wanted.get(k))} now" for k in diff)
        raise OutputError(f"cannot resume {path}: it was written with other settings ({shown}); "
                          "rerun with the same options, or write a new file")


class TsvWriter:
    """One row per token. TSV has no room for metadata: with ``-o FILE`` it goes to
    ``FILE.meta.json`` beside it (what ``--resume`` checks the settings against)."""
    resumable = True

    def __init__(self, stream, extras, out_path=None):
        self.stream, self.extras = stream, extras
        self.meta_path = Path(f"{out_path}.meta.json") if out_path else None

    def columns(self):
        return (["id", "line", "token_index", "token", "token_id", "start", "end", "log_prob",
                 "context_length"] + [name for name, on in (("rank", "ranks"),
                                                            ("entropy", "entropies"),
                                                            ("is_greedy", "is_greedy"))
                                      if on in self.extras] + ["error"])

    def _write(self, rows):
        self.stream.write("".join("\t".join(tsv_cell(c) for c in row) + "\n" for row in rows))
        self.stream.flush()

    @staticmethod
    def key(item_id):
        return tsv_cell(item_id)

    def start(self, metadata):
        if self.meta_path is not None:
            self.meta_path.write_text(json.dumps({"type": "metadata", **metadata},
                                                 ensure_ascii=False, indent=1) + "\n",
                                      encoding="utf-8")
        self._write([self.columns()])

    def score(self, item, r):
        rows = []
        for i in range(r.n_tokens):
            row = [item.id, item.line, i, r.tokens[i], r.token_ids[i], r.offsets[i][0],
                   r.offsets[i][1], r.log_probs[i], r.context_lengths[i]]
            row += [getattr(r, name)[i] for name in ("ranks", "entropies", "is_greedy")
                    if name in self.extras]
            rows.append(row + [None])
        self._write(rows)

    def error(self, item, message):
        n = len(self.columns())
        self._write([[item.id, item.line] + [None] * (n - 3) + [message]])

    def read_records(self, data, metadata, path):
        """Like :meth:`JsonlWriter.read_records`, a record being the rows of one id; the last
        id's rows are dropped too (the rows of a record are one write, which a kill may cut at
        a line end)."""
        lines = data.split(b"\n")
        header = "\t".join(self.columns()).encode()
        if len(lines) < 2:  # not even the header was finished
            return None, [], len(data)
        try:
            found = json.loads(self.meta_path.read_text(encoding="utf-8"))
            if not isinstance(found, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError):
            raise OutputError(f"cannot resume {path}: its settings file {self.meta_path} is "
                              "missing or damaged; write a new file") from None
        check_metadata(found, metadata, path)
        if lines[0] != header:
            raise OutputError(f"cannot resume {path}: its header is not the one these options "
                              "write; rerun with the same options, or write a new file")
        groups = []  # [key, is_error, rows] per consecutive id
        for raw in lines[1:-1]:
            cells = raw.split(b"\t")
            key, is_error = cells[0], cells[-1] != b"NA"
            if groups and groups[-1][0] == key and not is_error and not groups[-1][1]:
                groups[-1][2].append(raw)
            else:
                groups.append([key, is_error, [raw]])
        records = [(key.decode("utf-8", "replace"), is_error,
                    b"".join(r + b"\n" for r in rows)) for key, is_error, rows in groups[:-1]]
        end = len(lines[0]) + 1 + sum(len(raw) for _, _, raw in records)
        return lines[0] + b"\n", records, len(data) - end


class TableWriter:
    resumable = False

    def __init__(self, stream, words, several):
        self.stream, self.words, self.several, self.first = stream, words, several, True

    def start(self, metadata):
        pass

    def _heading(self, item):
        if not self.first:
            self.stream.write("\n")
        self.first = False
        if self.several:
            where = f"line {item.line}" if item.line is not None else f"text {item.id}"
            label = where if item.id == item.line or item.line is None else \
                f"{where}, id {item.id}"
            self.stream.write(f"[{label}]\n")

    def score(self, item, result):
        self._heading(item)
        self.stream.write(result.explain() + "\n")
        if self.words:
            self.stream.write("\nwords:\n")
            for w in result.words:
                lp = "unscored" if w.log_prob is None else f"{w.log_prob:.4f}"
                self.stream.write(f"  {w.word!r:<30} {lp:>12} {result.unit} "
                                  f"({w.n_tokens} tokens)\n")
        self.stream.flush()

    def error(self, item, message):
        self._heading(item)
        self.stream.write(f"error: {message}\n")
        self.stream.flush()


# -- the output file: one writer at a time, resumed without losing or doubling a record ----------

def lock_output(path):
    """Open ``path`` for writing (created if missing, never truncated here) and lock it against
    other npllm runs (an exclusive ``flock``); the open binary file.

    A second run writing the same file is refused at once, before it loads a model. The lock
    belongs to the file the path names when it is taken: a path that a resumed run meanwhile
    replaced with its compacted copy (see :func:`resume_output`) is opened again.
    """
    if path.is_dir():
        raise OutputError(f"{path} is a folder: give -o a file name")
    try:
        import fcntl
    except ImportError:  # Windows: no flock; a second writer is not detected there
        fcntl = None
    for _ in range(3):
        f = open(path, "a+b")
        if fcntl is None:
            return f
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OutputError(f"{path} is being written by another npllm run: wait for it to "
                              "finish (then --resume continues it), or give another -o FILE") \
                from None
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                return f
        except FileNotFoundError:
            pass
        f.close()
    raise OutputError(f"{path} keeps being replaced by another program; give another -o FILE")


@dataclass
class Resumed:
    """What ``--resume`` found in the output file: the keys of the records it kept."""
    done: set
    kept: int = 0
    dropped_bytes: int = 0
    errors: int = 0

    def report(self, path, to_score):
        parts = [f"kept {self.kept} record{'s' * (self.kept != 1)}"]
        if self.dropped_bytes:
            parts.append(f"dropped an incomplete end of {self.dropped_bytes} bytes")
        if self.errors:
            parts.append(f"dropped {self.errors} error record{'s' * (self.errors != 1)} to "
                         "try again")
        return f"resuming {path}: {', '.join(parts)}; {to_score} to score"


def resume_output(f, path, writer, metadata, items):
    """Continue the output file ``f`` (locked, at ``path``): keep its complete score records,
    drop an incomplete end and the error records (their lines are scored again; the run then
    puts every record back in input order, :func:`put_in_input_order`), check that every kept
    record is one of the input's ids, once. Returns ``(file to append to, Resumed)``; the file
    is ``f``, or the compacted copy that replaced it (locked too: both stay open until the run
    ends)."""
    f.seek(0)
    data = f.read()
    if not data:
        return f, None
    head, records, dropped = writer.read_records(data, metadata, path)
    if head is None:
        return f, None
    wanted = Counter(writer.key(item.id) for item in items if item.id is not None)
    done = Counter(key for key, is_error, _ in records if not is_error)
    for key, n in done.items():
        if n > wanted[key]:
            what = (f"holds {n} records for id {key}" if wanted[key] else
                    f"holds a record for id {key}, which is not in the input")
            raise OutputError(f"cannot resume {path}: it {what}, so it is not the output of "
                              "one run on this input; give the same input, or write a new "
                              "file")
    errors = sum(is_error for _, is_error, _ in records)
    kept = [raw for _, is_error, raw in records if not is_error]
    if errors:  # the records in the middle go: write the rest beside it, then swap them
        tmp = path.with_name(f".{path.name}.resume-{os.getpid()}")
        with open(tmp, "wb") as out:
            out.write(head + b"".join(kept))
            out.flush()
            os.fsync(out.fileno())
        new = lock_output(tmp)
        os.replace(tmp, path)
        f = new
    elif dropped:
        f.truncate(len(data) - dropped)
    return f, Resumed(set(done), len(kept), dropped, errors)


def put_in_input_order(f, path, writer, metadata, items):
    """After a resumed run whose error records were scored again (their records written after
    the others), put every record back in the input's order, so that the file is the one an
    uninterrupted run writes: a copy written beside it, locked, then swapped in, as
    :func:`resume_output` does. Returns the file to keep locked (``f`` or the copy)."""
    f.seek(0)
    head, records, _ = writer.read_records(f.read(), metadata, path)
    places = {}  # key -> the input positions of the items written under it, in order
    for i, item in enumerate(items):
        places.setdefault(writer.key(item.id), []).append(i)
    taken = Counter()

    def place(key):
        taken[key] += 1
        found = places.get(key, ())
        return found[taken[key] - 1] if taken[key] <= len(found) else len(items)
    ordered = sorted(records, key=lambda record: place(record[0]))
    if ordered == records:
        return f
    tmp = path.with_name(f".{path.name}.order-{os.getpid()}")
    with open(tmp, "wb") as out:
        out.write(head + b"".join(raw for _, _, raw in ordered))
        out.flush()
        os.fsync(out.fileno())
    new = lock_output(tmp)
    os.replace(tmp, path)
    return new


def parse_bos(value):
    return int(value) if value.isdigit() else value
