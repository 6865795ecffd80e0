"""Fuzzing (issue 18): damaged files and inputs give a clean ``NpllmError`` or a clean record,
never a traceback, a hang or a half-written output.

Hypothesis damages a tiny model's files (safetensors headers, GGUF, config.json,
tokenizer.json, tokenizer_config.json) and ``npllm score``'s JSONL/TSV input: truncation, bit
flips, bytes overwritten, wrong JSON types, huge numbers. In the CI profile each test runs the
profile's examples (quick); ``NPLLM_FUZZ_EXAMPLES=N`` raises every test to N examples for a
long local run (``HYPOTHESIS_PROFILE=dev NPLLM_FUZZ_EXAMPLES=2500 pytest tests/test_fuzz.py``).
"""
import io
import json
import os
import shutil
import struct
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gguf import write_tiny_gguf
from tiny_models import tiny_llama

import npllm
from npllm.cli import main
from npllm.errors import NpllmError
from npllm.model.config import LlamaConfig
from npllm.model.weights import load_weights
from npllm.tokenizer import Tokenizer

EXAMPLES = int(os.environ.get("NPLLM_FUZZ_EXAMPLES", 0)) or settings().max_examples
fuzz = settings(max_examples=EXAMPLES, suppress_health_check=list(HealthCheck))

JSON_LEAVES = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
               | st.floats(allow_nan=False) | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


def damage(data, focus=None):
    """Damaged copies of ``data``: cut, bits flipped, bytes overwritten or appended. ``focus``
    (an end offset) makes half of the positions fall in ``data[:focus]`` (a file's header)."""
    n = len(data)
    focus = min(focus or n, n)
    where = st.one_of(st.integers(0, focus - 1), st.integers(0, n - 1))

    def flip(flips):
        out = bytearray(data)
        for at, bit in flips:
            out[at] ^= 1 << bit
        return bytes(out)

    def overwrite(args):
        at, blob = args
        return data[:at] + blob + data[at + len(blob):]

    return st.one_of(
        where.map(lambda at: data[:at]),
        st.lists(st.tuples(where, st.integers(0, 7)), min_size=1, max_size=6).map(flip),
        st.tuples(where, st.binary(min_size=1, max_size=12)).map(overwrite),
        st.binary(min_size=1, max_size=64).map(lambda tail: data + tail),
    )


class Files(dict):
    """A model folder's files by name (a short repr: hypothesis prints its arguments)."""

    def __repr__(self):
        return f"<the files of {len(self)} names>"


@pytest.fixture(scope="module")
def tiny_files():
    folder = tiny_llama()
    return folder, Files({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})


def folder_with(files, name, data):
    """A fresh model folder (the tiny model's files) whose ``name`` holds ``data``."""
    folder = Path(tempfile.mkdtemp(prefix="npllm-fuzz-"))
    for other, content in files.items():
        (folder / other).write_bytes(data if other == name else content)
    return folder


def clean(call):
    """``call()``; an ``NpllmError`` is a clean outcome, anything else fails the test."""
    try:
        with redirect_stderr(io.StringIO()):
            return call()
    except NpllmError as e:
        assert str(e).strip(), "an error with no message"
        return e


# -- safetensors ---------------------------------------------------------------------------------

def safetensors_with_header(data, change):
    """``data`` with its JSON header changed by ``change(header) -> header`` (length fixed)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    blob = json.dumps(change(header)).encode()
    return struct.pack("<Q", len(blob)) + blob + data[8 + n:]


def header_changes(data):
    n = struct.unpack("<Q", data[:8])[0]
    names = sorted(k for k in json.loads(data[8:8 + n]) if k != "__metadata__")

    def set_field(args):
        name, key, value = args

        def change(header):
            if key is None:
                header[name] = value
            else:
                header[name][key] = value
            return header
        return safetensors_with_header(data, change)

    huge = st.integers(2**31, 2**66)
    return st.one_of(
        st.tuples(st.sampled_from(names), st.sampled_from([None, "dtype", "shape",
                                                           "data_offsets"]),
                  JSON_VALUES).map(set_field),
        st.tuples(st.sampled_from(names), st.just("data_offsets"),
                  st.tuples(st.integers(0, 2**20), huge).map(list)).map(set_field),
        st.tuples(st.sampled_from(names), st.just("shape"),
                  st.lists(huge, min_size=1, max_size=3)).map(set_field),
        st.integers(2**20, 2**64 - 1).map(lambda size: struct.pack("<Q", size) + data[8:]),
    )


@fuzz
@given(data=st.data())
def test_fuzz_safetensors(tiny_files, data):
    folder, files = tiny_files
    original = files["model.safetensors"]
    n = struct.unpack("<Q", original[:8])[0]
    damaged = data.draw(st.one_of(damage(original, focus=8 + n), header_changes(original)))
    work = folder_with({"config.json": files["config.json"]}, "model.safetensors", damaged)
    try:
        config = LlamaConfig.from_file(work / "config.json")
        clean(lambda: load_weights(work, config))
    finally:
        shutil.rmtree(work)


# -- GGUF ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory):
    import gguf
    q = gguf.GGMLQuantizationType
    path = write_tiny_gguf(tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf", tiny_llama(),
                           qtypes={"attn_q.weight": q.Q8_0, "ffn_up.weight": q.Q4_1})
    return path.read_bytes()


@fuzz
@given(data=st.data())
def test_fuzz_gguf(tiny_gguf_bytes, data, monkeypatch_env):
    original = tiny_gguf_bytes  # its metadata (the tokenizer's too) fills the first ~12 KB
    damaged = data.draw(damage(original, focus=min(len(original), 12_000)))
    work = Path(tempfile.mkdtemp(prefix="npllm-fuzz-gguf-"))
    try:
        path = work / "damaged.gguf"
        path.write_bytes(damaged)
        os.environ["NPLLM_HOME"] = str(work / "home")
        clean(lambda: npllm.load(str(path), backend="numpy"))
        leftovers = [p.name for p in (work / "home").rglob(".*") if "tmp-" in p.name]
        assert leftovers == [], "a failed import left its temporary folder"
    finally:
        shutil.rmtree(work)


@pytest.fixture
def monkeypatch_env():
    saved = os.environ.get("NPLLM_HOME")
    yield
    if saved is None:
        os.environ.pop("NPLLM_HOME", None)
    else:
        os.environ["NPLLM_HOME"] = saved


# -- config.json ---------------------------------------------------------------------------------

@fuzz
@given(data=st.data())
def test_fuzz_config_json(tiny_files, data):
    folder, files = tiny_files
    config = json.loads(files["config.json"])
    keys = sorted(config) + ["rope_parameters", "rope_scaling", "head_dim", "model_type"]
    changed = dict(config)
    for key, value in data.draw(st.lists(st.tuples(st.sampled_from(keys), JSON_VALUES),
                                         min_size=1, max_size=3)):
        changed[key] = value
    raw = data.draw(st.one_of(st.just(json.dumps(changed).encode()),
                              damage(files["config.json"])))
    work = folder_with(files, "config.json", raw)
    try:
        clean(lambda: npllm.load(str(work), backend="numpy"))
    finally:
        shutil.rmtree(work)


# -- tokenizer.json and tokenizer_config.json ----------------------------------------------------

@fuzz
@given(data=st.data())
def test_fuzz_tokenizer_files(tiny_files, data):
    folder, files = tiny_files
    name = data.draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json"]))
    if name == "tokenizer_config.json" and data.draw(st.booleans()):
        config = json.loads(files[name])
        for key, value in data.draw(st.lists(st.tuples(st.sampled_from(
                ["bos_token", "eos_token", "pad_token", "chat_template", "add_bos_token",
                 "add_eos_token", "unk_token"]), JSON_VALUES), min_size=1, max_size=3)):
            config[key] = value
        raw = json.dumps(config).encode()
    else:
        raw = data.draw(damage(files[name], focus=2000))
    work = folder_with({k: v for k, v in files.items()
                        if k.startswith("tokenizer") or k.endswith("config.json")}, name, raw)
    try:
        tok = clean(lambda: Tokenizer.from_folder(work))
        if not isinstance(tok, NpllmError):
            clean(lambda: tok.decode(tok.encode("Hello, world <|im_start|>")))
            clean(lambda: tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  allow_special_tokens=False))
    finally:
        shutil.rmtree(work)


# -- npllm score's input: JSONL and TSV ----------------------------------------------------------

LINES = st.one_of(
    st.binary(max_size=40),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={"id": JSON_VALUES, "text": JSON_VALUES | st.text(),
                                        "ctx": JSON_VALUES}).map(
        lambda d: json.dumps(d).encode()),
    st.integers(1, 3000).map(lambda depth: b"[" * depth + b"]" * depth),
)


@fuzz
@given(lines=st.lists(LINES, max_size=6), fmt=st.sampled_from(["jsonl", "tsv"]),
       with_id=st.booleans(), cut=st.booleans())
def test_fuzz_score_input(tiny_files, lines, fmt, with_id, cut):
    folder, _ = tiny_files
    if fmt == "tsv":  # a header, then cells (tabs and odd bytes included)
        lines = [b"id\ttext\tctx"] + [line.replace(b"\n", b" ") for line in lines]
    data = b"\n".join(line.replace(b"\n", b" ") for line in lines) + (b"" if cut else b"\n")
    work = Path(tempfile.mkdtemp(prefix="npllm-fuzz-in-"))
    try:
        src, out = work / f"in.{fmt}", work / "out.jsonl"
        src.write_bytes(data)
        argv = ["score", "-m", str(folder), "-f", str(src), "--format", "jsonl", "-q", "-o",
                str(out), "--context-field", "ctx"] + (["--id-field", "id"] if with_id else [])
        err = io.StringIO()
        with redirect_stderr(err):
            status = main(argv)
        assert "Traceback" not in err.getvalue()
        if status == 2:  # refused before any scoring: one line, and no output file
            assert err.getvalue().count("\n") == 1 and not out.exists()
            return
        assert status in (0, 1)
        # JSONL's lines end with "\n" only (str.splitlines would also cut at U+0085 or U+2028,
        # which JSON strings may hold as they are: found by this test)
        text = out.read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.split("\n")[:-1]]
        assert records[0]["type"] == "metadata"
        n_inputs = records[0]["n_inputs"]
        assert len(records) == 1 + n_inputs  # one record per input line, none half-written
        assert out.read_bytes().endswith(b"\n")
        assert status == (1 if any(r["type"] == "error" for r in records[1:]) else 0)
    finally:
        shutil.rmtree(work)
