"""Weights: safetensors files -> ``dict[str, np.ndarray]`` of float32 arrays with HF tensor names.

The safetensors format is simple enough to read by hand, and npllm does, because it decides how
much memory loading costs::

    [8 bytes: N, little-endian uint64][N bytes: JSON header][tensor data ...]

    header = {"model.norm.weight": {"dtype": "F32", "shape": [576], "data_offsets": [0, 2304]},
              ..., "__metadata__": {"format": "pt"}}

``data_offsets`` count from the end of the header. npllm maps each file into memory with
``numpy.memmap`` and takes every tensor as a view at its offsets:

- float32 tensors are returned as those views: zero copies, so loading takes milliseconds and the
  operating system pages the weights in as the forward pass touches them.
  (``safetensors.safe_open(..., framework="numpy").get_tensor`` would copy each tensor into a new
  array: loading would read the whole file and hold every tensor twice while the file is cached.)
- bfloat16 and float16 tensors are widened to float32 once, at load. NumPy has no bfloat16;
  ``ml_dtypes`` gives it one. Widening bf16 is exact and simple: a bfloat16 is the upper 16 bits of
  a float32, so the float32 is the same 16 bits followed by 16 zero bits.

All returned arrays are read-only (``flags.writeable`` is False): the weights are shared, and an
in-place update by mistake would otherwise change the model (or fail on the memory map).

Expected tensors (names and shapes as in transformers' ``LlamaForCausalLM``; letters as in
``npllm/__init__.py``)::

    model.embed_tokens.weight                       [V, D]
    model.layers.{i}.input_layernorm.weight         [D]
    model.layers.{i}.self_attn.q_proj.weight        [H*Dh, D]
    model.layers.{i}.self_attn.k_proj.weight        [K*Dh, D]
    model.layers.{i}.self_attn.v_proj.weight        [K*Dh, D]
    model.layers.{i}.self_attn.o_proj.weight        [D, H*Dh]
    model.layers.{i}.post_attention_layernorm.weight [D]
    model.layers.{i}.mlp.gate_proj.weight           [F, D]
    model.layers.{i}.mlp.up_proj.weight             [F, D]
    model.layers.{i}.mlp.down_proj.weight           [D, F]
    model.norm.weight                               [D]
    lm_head.weight                                  [V, D]  (tied: the embedding array itself)

Other tensors in the files (e.g. old checkpoints' ``rotary_emb.inv_freq``) are ignored.
Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling runs code.

**Packed weights.** A folder imported from a GGUF file also holds ``model.ggml.safetensors``
(:data:`PACKED_FILE`): the quantized matrices as the GGUF stored them, blocks of 32 weights
sharing a scale, as uint8 tensors [N, bytes per row] under the HF names, rows in the HF order;
its metadata names each tensor's ggml type (``{"format": "npllm-ggml-blocks", "ggml_types":
"{\"model.layers.0.mlp.up_proj.weight\": \"Q4_1\", ...}"}``). The engine
(:func:`npllm.engine.packed.load_packed`) maps it into memory like the float32 file; decoding
reads those blocks instead of the float32 matrices (6.4x fewer bytes for Q4_1, 3.8x for Q8_0),
with the same weight values. It is never read as float32 weights.
"""
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from npllm.errors import WeightsError
from npllm.model.family_config import embedding_name, family_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PACKED_FILE = "model.ggml.safetensors"  # the quantized matrices in their GGUF blocks (see above)
PACKED_FORMAT = "npllm-ggml-blocks"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Bytes per element of every safetensors dtype (to check the header's offsets against the shapes).
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4,
               "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
               "C64": 8}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def expected_shapes(config):
    """``{name: (shape, symbolic shape)}`` of every tensor ``config`` implies, in model order
    (the other families' names: :func:`npllm.model.family_config.family_shapes`)."""
    if config.model_type not in ("llama", "mistral"):
        return family_shapes(config)
    V, D, F = config.vocab_size, config.hidden_size, config.intermediate_size
    H, K, Dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    shapes = {"model.embed_tokens.weight": ((V, D), "[V, D]")}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": ((D,), "[D]"),
            p + "self_attn.q_proj.weight": ((H * Dh, D), "[H*Dh, D]"),
            p + "self_attn.k_proj.weight": ((K * Dh, D), "[K*Dh, D]"),
            p + "self_attn.v_proj.weight": ((K * Dh, D), "[K*Dh, D]"),
            p + "self_attn.o_proj.weight": ((D, H * Dh), "[D, H*Dh]"),
            p + "post_attention_layernorm.weight": ((D,), "[D]"),
            p + "mlp.gate_proj.weight": ((F, D), "[F, D]"),
            p + "mlp.up_proj.weight": ((F, D), "[F, D]"),
            p + "mlp.down_proj.weight": ((D, F), "[D, F]"),
        })
    shapes["model.norm.weight"] = ((D,), "[D]")
    shapes["lm_head.weight"] = ((V, D), "[V, D]")
    return shapes


def load_weights(folder, config):
    """Load the float32 weights of the model in ``folder`` (single or sharded safetensors).

    Returns ``{HF name: array}`` in model order with ``lm_head.weight`` always present: when
    ``config.tie_word_embeddings`` is true or the files have no ``lm_head.weight``, it is the same
    array object as ``model.embed_tokens.weight`` (transformers' tied embeddings). Raises
    :class:`~npllm.errors.WeightsError` naming the file and tensor for anything missing, mis-shaped,
    truncated, corrupt or unsafe.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder} is not a folder; pass the model folder that holds "
                           "config.json and the *.safetensors files")
    files = safetensors_files(folder)
    tensors = {}  # name -> (file, header entry, data start)
    for path in files:
        header, data_start, _ = read_safetensors_header(path)
        for name, entry in header.items():
            tensors.setdefault(name, (path, entry, data_start))
    if config.model_type == "gpt2":  # the Hub's gpt2 files omit the "transformer." prefix
        tensors = {(n if n.startswith(("transformer.", "lm_head.")) else "transformer." + n): t
                   for n, t in tensors.items()}

    shapes = expected_shapes(config)
    tied = config.tie_word_embeddings or "lm_head.weight" not in tensors
    if tied:
        del shapes["lm_head.weight"]
    _check_names_and_shapes(folder, files, tensors, shapes, config)

    maps = {}
    weights = {}
    for name in shapes:
        path, entry, data_start = tensors[name]
        if path not in maps:
            # A plain ndarray view of the read-only map (not the np.memmap subclass, whose
            # results of arithmetic and astype would still claim to be memory maps).
            maps[path] = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
        weights[name] = _as_float32(name, path, maps[path], entry, data_start)
    weights["lm_head.weight"] = weights[embedding_name(config)] if tied else weights.pop(
        "lm_head.weight")
    return conv1d_to_linear(weights) if config.model_type == "gpt2" else weights


def conv1d_to_linear(weights):
    """GPT-2's weights with every Conv1D matrix in ``nn.Linear``'s layout [out, in].

    GPT-2's ``Conv1D`` stores its matrix as [in, out] and computes ``x @ W + b``; every other
    family (and every forward pass in npllm) uses ``x @ W.T + b`` with W [out, in]. Turned once
    here, at load, so :func:`npllm.model.gpt2.forward` reads like the others. The transposes are
    views: no copy.
    """
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
              ".mlp.c_proj.weight")
    return {name: w.T if name.endswith(conv1d) else w for name, w in weights.items()}


def safetensors_files(folder):
    """The checkpoint files of ``folder``, chosen as transformers does (index, then single file)."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index ({type(e).__name__}: "
                               f"{e}); re-download the model") from None
        outside = [n for n in names if not isinstance(n, str) or not n or Path(n).is_absolute()
                   or ".." in Path(n).parts or Path(n).name != n]
        if outside:
            raise WeightsError(f"{index} names shard(s) outside the model folder "
                               f"({', '.join(map(repr, outside[:3]))}); a shard must be a file "
                               "name in the folder itself: the index is damaged or was not "
                               "written by save_pretrained, download the model again")
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index} lists shard(s) that are not in {folder}: "
                               f"{', '.join(missing)}; the download is incomplete, download again")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != PACKED_FILE)
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(
            f"{folder} holds only PyTorch pickle checkpoints ({', '.join(pickles)}). npllm refuses "
            "to load them: unpickling a file can run arbitrary code hidden in it. If you trust the "
            "file, convert it once to safetensors with transformers:\n"
            "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"    AutoModelForCausalLM.from_pretrained('{folder}').save_pretrained('OUT')\n"
            f"    AutoTokenizer.from_pretrained('{folder}').save_pretrained('OUT')\n"
            "(save_pretrained writes model.safetensors; on transformers < 5 add "
            "safe_serialization=True) and load OUT instead.")
    raise WeightsError(f"{folder} has no weights: expected {SINGLE_FILE}, or {INDEX_FILE} with its "
                       "shards, as transformers' save_pretrained writes them")


def read_safetensors_header(path):
    """Parse and check the header of a safetensors file without reading its tensor data.

    Returns ``(tensors, data_start, metadata)``: ``tensors`` maps each name to its header entry
    ``{"dtype", "shape", "data_offsets"}``, ``data_start`` is the file offset of the data block.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
            raw = f.read(n) if n is not None and 0 < n <= min(MAX_HEADER_BYTES, size - 8) else None
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    fix = "re-download it (or re-run the conversion that wrote it)"
    if n is None:
        raise WeightsError(f"{path} is truncated or not a safetensors file: it has {size} bytes, "
                           f"fewer than the 8-byte header length; {fix}")
    if raw is None:
        what = "truncated" if n <= MAX_HEADER_BYTES else "not a safetensors file (or corrupt)"
        raise WeightsError(f"{path} is {what}: its first 8 bytes announce a {n}-byte header but "
                           f"the file has {size} bytes; {fix}")
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as e:
        raise WeightsError(f"{path} is not a valid safetensors file (corrupt header: {e}); {fix}") \
            from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype, str) or end < begin or not all(
                    isinstance(x, int) and x >= 0 for x in [*shape, begin, end]):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path} is not a valid safetensors file: bad header entry for "
                               f"tensor {name}: {entry!r}; {fix}") from None
        itemsize = DTYPE_SIZES.get(dtype)
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise WeightsError(f"{path} is corrupt: tensor {name} ({dtype}, shape {tuple(shape)}) "
                               f"should take {math.prod(shape) * itemsize} bytes, its offsets give "
                               f"{end - begin}; {fix}")
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise WeightsError(f"{path} is truncated: its header describes {data_end} bytes of tensor "
                           f"data but the file holds {size - data_start}; {fix}")
    return header, data_start, metadata


def save_weights(weights, path):
    """Write ``weights`` to one float32 safetensors file at ``path``, atomically.

    Every tensor is written as float32 (HF names are kept as given). A tied ``lm_head.weight``
    (the same array object as ``model.embed_tokens.weight``) is left out, as save_pretrained does:
    write ``tie_word_embeddings: true`` in config.json. The file is first written next to ``path``
    and then renamed onto it, so an interrupted save never leaves a half file under the final name.
    transformers reads the result (metadata ``{"format": "pt"}``).
    """
    from safetensors.numpy import save_file

    path = Path(path)
    embed = weights.get("model.embed_tokens.weight")
    tensors = {name: np.ascontiguousarray(w, dtype=np.float32) for name, w in weights.items()
               if not (name == "lm_head.weight" and w is embed)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _check_names_and_shapes(folder, files, tensors, shapes, config):
    where = files[0].name if len(files) == 1 else f"the {len(files)} safetensors shards of {folder}"
    problems = []
    for name, (shape, symbols) in shapes.items():
        if name not in tensors:
            problems.append(f"{name} is missing (expected {symbols} = {shape})")
            continue
        path, entry, _ = tensors[name]
        found = tuple(entry["shape"])
        if found != shape:
            problems.append(f"{name} in {path.name} has shape {found}, "
                            f"expected {symbols} = {shape}")
        elif entry["dtype"] not in FLOAT_DTYPES:
            problems.append(f"{name} in {path.name} is stored as {entry['dtype']}; npllm reads "
                            "float32, float16 and bfloat16 tensors (quantized checkpoints are not "
                            "supported; for a GGUF file pass the .gguf path instead)")
    layers = [int(m.group(1)) for m in map(re.compile(r"model\.layers\.(\d+)\.").match, tensors)
              if m]
    if layers and max(layers) >= config.num_hidden_layers:
        problems.append(f"the files hold layers up to model.layers.{max(layers)} but config.json "
                        f"says num_hidden_layers = {config.num_hidden_layers}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise WeightsError(f"the weights in {where} do not match config.json "
                           f"({config.model_type}: V={config.vocab_size}, D={config.hidden_size}, "
                           f"F={config.intermediate_size}, L={config.num_hidden_layers}, "
                           f"H={config.num_attention_heads}, K={config.num_key_value_heads}, "
                           f"Dh={config.head_dim}):\n  " + "\n  ".join(shown)
                           + "\nAre config.json and the weights from the same model?")


def _as_float32(name, path, mapped, entry, data_start):
    """The tensor as a float32 array: a view of the memory map for F32, widened otherwise."""
    begin, end = entry["data_offsets"]
    raw = mapped[data_start + begin:data_start + end]
    shape = tuple(entry["shape"])
    dtype = entry["dtype"]
    if dtype == "F32":
        array = raw.view("<f4").reshape(shape)
        if (data_start + begin) % 4:  # unaligned (never in files safetensors writes): copy
            array = np.array(array, dtype=np.float32)
    elif dtype == "BF16":
        import ml_dtypes  # gives NumPy a bfloat16 dtype
        array = raw.view(ml_dtypes.bfloat16).reshape(shape).astype(np.float32)
    elif dtype == "F16":
        array = raw.view("<f2").reshape(shape).astype(np.float32)
    else:
        assert dtype == "F64", dtype
        array = raw.view("<f8").reshape(shape).astype(np.float32)
    array.flags.writeable = False
    return array
