"""Integrity of the packed weights: ``model.ggml.safetensors`` is checked at every load.

A model imported from a GGUF file holds its weights twice: ``model.safetensors`` (float32, read
by scoring and by the prompt's forward pass) and ``model.ggml.safetensors`` (the quantized
blocks, read when decoding), the same weights bit for bit. A damaged packed file would make
generation silently disagree with scoring, so the import records in the file's own metadata

- ``npllm_data_bytes``: the length of the tensor data (the file's size follows from it);
- ``npllm_header_crc32``: a CRC-32 of the header (tensor names, shapes, offsets, and the
  metadata such as each tensor's ggml type, these three keys left out), in a canonical JSON
  form;
- ``npllm_data_crc32``: a CRC-32 of the tensor data,

and :func:`verify_packed` checks all three when the file is loaded. Why a CRC-32 of every byte
rather than a sample: decoding reads every byte of the file at every token anyway, and
``zlib.crc32`` runs at memory speed, so the check costs about one more read of the file, at
load (the operating system then has the file in its page cache for the first token). A CRC-32
detects every burst of up to 32 flipped bits and any other damage with probability
1 - 2^-32; it is no defence against someone who rewrites the file on purpose (nor is it meant
to be). A file written before npllm recorded these (an import of format 2) is checked for its
header only; importing it again records them.
"""
import json
import zlib
from pathlib import Path

import numpy as np

from npllm.errors import WeightsError

DATA_BYTES, DATA_CRC, HEADER_CRC = "npllm_data_bytes", "npllm_data_crc32", "npllm_header_crc32"
CHUNK = 1 << 24  # bytes per crc32 call: the GIL is released within each


def header_crc32(entries, metadata):
    """CRC-32 of a safetensors header: its tensor entries and its metadata (without this
    module's record), as canonical JSON: the same header gives the same number whatever the
    order of its keys in the file."""
    canonical = json.dumps({"tensors": {k: v for k, v in entries.items() if k != "__metadata__"},
                            "metadata": {k: v for k, v in metadata.items()
                                         if k not in (DATA_BYTES, DATA_CRC, HEADER_CRC)}},
                           sort_keys=True, separators=(",", ":"))
    return zlib.crc32(canonical.encode("utf-8"))


def data_crc32(buffers):
    """CRC-32 of the bytes of ``buffers`` (arrays or bytes), one after another."""
    crc = 0
    for buffer in buffers:
        view = memoryview(np.ascontiguousarray(buffer)).cast("B")
        for start in range(0, len(view), CHUNK):
            crc = zlib.crc32(view[start:start + CHUNK], crc)
    return crc


def record(entries, metadata, blocks):
    """The metadata an import adds to the packed file: ``{name: str}`` (safetensors metadata
    values are strings). ``entries``: the header's tensor entries; ``metadata``: the rest of
    its metadata; ``blocks``: the tensors' arrays in file order."""
    blocks = list(blocks)
    return {DATA_BYTES: str(sum(b.nbytes for b in blocks)),
            HEADER_CRC: f"{header_crc32(entries, metadata):08x}",
            DATA_CRC: f"{data_crc32(blocks):08x}"}


def verify_packed(path, header, data_start, metadata):
    """Check the packed-weights file ``path`` against the record its import wrote; raise
    :class:`~npllm.errors.WeightsError` naming the file and the fix (re-import) on a mismatch.

    ``header``, ``data_start``, ``metadata``: what
    :func:`npllm.model.weights.read_safetensors_header` read from it. Returns True when the
    record was checked, False for a file without one (written by an older npllm).
    """
    path = Path(path)
    fix = (f"re-import the model (delete {path.parent} and load it again; a folder written "
           "by `npllm convert`: convert the GGUF file again)")
    if DATA_CRC not in metadata:
        return False
    try:
        n_bytes = int(metadata[DATA_BYTES])
        header_crc, data_crc = int(metadata[HEADER_CRC], 16), int(metadata[DATA_CRC], 16)
    except (KeyError, ValueError, TypeError):
        raise WeightsError(f"{path} is damaged: its integrity record ({DATA_BYTES}, "
                           f"{HEADER_CRC}, {DATA_CRC}) is unreadable; {fix}") from None
    size = path.stat().st_size
    if size != data_start + n_bytes:
        raise WeightsError(f"{path} has {size:,} bytes, but its import wrote "
                           f"{data_start + n_bytes:,}: it was cut or extended since; {fix}")
    if header_crc32(header, metadata) != header_crc:
        raise WeightsError(f"{path} is damaged: its header (tensor names, shapes, offsets, ggml "
                           f"types) does not match the CRC-32 recorded at import; {fix}")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(n_bytes,)) \
        if n_bytes else np.zeros(0, np.uint8)
    if data_crc32([data]) != data_crc:
        raise WeightsError(f"{path} is damaged: its tensor data does not match the CRC-32 "
                           "recorded at import, so decoding would not use the weights that "
                           f"scoring uses; {fix}")
    return True
