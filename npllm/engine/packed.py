"""Weight matrices as the engine multiplies them: several projections of one input at once, and
matrices kept in their GGUF blocks.

**Adjacent projections.** q, k, v (and gate, up) read the same input. Stored one after another
in a memory-mapped file, they are one matrix :math:`[W_q; W_k; W_v]`, and
:math:`x [W_q; W_k; W_v]^\top = [x W_q^\top, x W_k^\top, x W_v^\top]` is one larger matrix
product (one call of BLAS instead of three) whose columns are then split: views, no copy
(:func:`stack_adjacent`, :class:`Projection`, built once when the engine is made).

**Packed weights.** A folder imported from a GGUF file also holds ``model.ggml.safetensors``:
the quantized matrices as the GGUF stored them, blocks of 32 weights sharing a scale, as uint8
tensors [N, bytes per row] under the HF names, rows in the HF order; its metadata names each
tensor's ggml type (``{"format": "npllm-ggml-blocks", "ggml_types": "{...}"}``).
:func:`load_packed` maps it into memory and returns :class:`PackedWeight` objects; the engine
swaps them in for the float32 matrices when decoding (one new token): the same weight values,
bit for bit (``npllm.kernels.quantized``), 6.4x fewer bytes to read for Q4_1, 3.8x for Q8_0.
The same way transformers' quantizers replace ``nn.Linear`` modules at load time, the forward
pass never sees which kind of matrix it multiplies by.
"""
import json
from pathlib import Path

import numpy as np

from npllm.errors import WeightsError
from npllm.model.integrity import verify_packed
from npllm.ggml_blocks import BLOCK, BLOCK_BYTES, aligned
from npllm.model.weights import PACKED_FILE, PACKED_FORMAT, expected_shapes, read_safetensors_header


def matmul(x, weight):
    r""":math:`x W^\top` for x [..., in], W [out, in]: leading axes flattened, so that NumPy hands
    one large matrix product to BLAS."""
    return (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])


class Projection:
    """Linear layers of one input, ``[x W_1^T, x W_2^T, ...]``, in as few matrix products as
    their storage allows (:func:`stack_adjacent`, worked out once, here). The matrices may be
    float32 arrays or :class:`PackedWeight`."""

    def __init__(self, *matrices):
        self.sizes = [w.shape[0] for w in matrices]
        self.groups = stack_adjacent(list(matrices))

    def __call__(self, x, one_thread=False):
        """x [..., D] -> a list of [..., N_i], one per matrix. ``one_thread``: packed products
        on the calling thread only (float32 products are BLAS's)."""
        out = [None] * len(self.sizes)
        for w, which in self.groups:
            y = w.linear(x, one_thread) if isinstance(w, PackedWeight) else matmul(x, w)
            start = 0
            for i in which:
                out[i] = y[..., start:start + self.sizes[i]]
                start += self.sizes[i]
        return out

    @property
    def products(self):
        """How many matrix products one call makes."""
        return len(self.groups)


class PackedWeight:
    """A weight matrix W [N, D] kept as the GGUF stored it: ``blocks`` uint8 [N, bytes per row].

    ``ggml_type`` ("Q4_1", "Q8_0") names the block layout (see :mod:`npllm.kernels.quantized`);
    ``shape`` is W's, (N, D). :meth:`linear` computes ``x W^T`` from the blocks (the engine's
    :class:`Projection` calls it); :meth:`dequantize` gives W in float32,
    equal to the float32 tensor of the same name. ``blocks`` is a read-only view of the
    memory-mapped file.
    """
    __slots__ = ("blocks", "ggml_type", "shape", "__weakref__")
    ndim = 2

    def __init__(self, blocks, ggml_type):
        size = BLOCK_BYTES.get(ggml_type)
        if size is None:
            raise ValueError(f"no kernel for ggml type {ggml_type!r}; packed types: "
                             f"{', '.join(BLOCK_BYTES)}")
        if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] % size:
            raise ValueError(f"{ggml_type} blocks must be uint8 [N, D / {BLOCK} * "
                             f"{size}], got {blocks.dtype} {blocks.shape}")
        readable = aligned(blocks)
        if readable is not blocks:  # copied once, for the kernels: read-only like the file
            readable.flags.writeable = False
            blocks = readable
        self.blocks, self.ggml_type = blocks, ggml_type
        self.shape = (blocks.shape[0], blocks.shape[1] // size * BLOCK)

    @property
    def nbytes(self):
        return self.blocks.nbytes

    @property
    def size(self):
        return self.shape[0] * self.shape[1]

    def linear(self, x, one_thread=False):
        """x [..., D] float32 -> x W^T [..., N], from the blocks (Numba kernel, float32
        arithmetic), on Numba's threads, or on the calling thread only with ``one_thread``."""
        return _quantized().packed_product(self.blocks, self.ggml_type, x,
                                           parallel=False if one_thread else None)

    def dequantize(self):
        """W [N, D] float32, by ``gguf.quants.dequantize``."""
        from npllm.kernels.quantized import dequantize
        return dequantize(self.blocks, self.ggml_type)

    def __repr__(self):
        return (f"PackedWeight({self.ggml_type}, shape={self.shape}, "
                f"{self.nbytes / 2**20:.2f} MiB)")


def _quantized():
    """``npllm.kernels.quantized``, imported at the first product (loading does not need Numba)."""
    from npllm.kernels import quantized
    return quantized


REIMPORT = "delete the model folder and load the model again to re-import it"


def _ggml_types(path, metadata):
    """``{name: ggml type}`` from a packed file's metadata, or a WeightsError."""
    try:
        if metadata.get("format") != PACKED_FORMAT:
            raise ValueError(f"its metadata format is {metadata.get('format')!r}, "
                             f"not {PACKED_FORMAT!r}")
        types = json.loads(metadata["ggml_types"])
        if not isinstance(types, dict):
            raise ValueError("ggml_types is not a JSON object")
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path} is not a packed-weights file ({e}); {REIMPORT}") from None
    return types


def check_packed(folder):
    """Check ``folder``'s packed file, if it has one, against what its import recorded (size,
    header, CRC-32s: :func:`npllm.model.integrity.verify_packed`), even where no engine reads
    it: a damaged file is one clear error at load, whatever the engine. Returns its header,
    data start and metadata, or None without the file."""
    path = Path(folder) / PACKED_FILE
    if not path.is_file():
        return None
    header, data_start, metadata = read_safetensors_header(path)
    verify_packed(path, header, data_start, metadata)
    return header, data_start, metadata


def load_packed(folder, config, tied=None):
    """The packed weights of ``folder`` (``{HF name: PackedWeight}``), or ``{}`` without them.

    Only the matrices of linear layers and the LM head are returned (the embedding lookup reads
    the float32 matrix). With tied embeddings (``tied``; by default
    ``config.tie_word_embeddings``) ``lm_head.weight`` is the packed ``model.embed_tokens``.
    Tensors of a ggml type this version has no kernel for are left out (those layers then use
    their float32 weights). Raises :class:`~npllm.errors.WeightsError` for a file that does not
    match the model.
    """
    checked = check_packed(folder)
    if checked is None:
        return {}
    path = Path(folder) / PACKED_FILE
    header, data_start, metadata = checked
    types = _ggml_types(path, metadata)
    tied = config.tie_word_embeddings if tied is None else tied
    shapes = expected_shapes(config)
    wanted = {name for name in shapes if name.endswith("_proj.weight")} | {"lm_head.weight"}
    if tied:
        wanted = wanted - {"lm_head.weight"} | {"model.embed_tokens.weight"}
    mapped = None
    packed = {}
    for name, entry in header.items():
        ggml_type = types.get(name)
        if name not in wanted or ggml_type not in BLOCK_BYTES:
            continue
        N, D = shapes[name][0]
        expected = (N, D // BLOCK * BLOCK_BYTES[ggml_type])
        if entry["dtype"] != "U8" or tuple(entry["shape"]) != expected or D % BLOCK:
            raise WeightsError(f"{path}: tensor {name} ({ggml_type}) is {entry['dtype']} "
                               f"{tuple(entry['shape'])}, expected U8 {expected} for the "
                               f"{shapes[name][1]} = {(N, D)} matrix of config.json; {REIMPORT}")
        if mapped is None:
            mapped = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
        begin, end = entry["data_offsets"]
        blocks = mapped[data_start + begin:data_start + end].reshape(expected)
        packed[name] = PackedWeight(blocks, ggml_type)
    if tied and "model.embed_tokens.weight" in packed:
        packed["lm_head.weight"] = packed.pop("model.embed_tokens.weight")
    return packed


def stack_adjacent(arrays):
    """Group 2-D arrays [n_i, D] that lie one after another in memory into single arrays.

    Returns ``[(array, indices), ...]`` covering every input once: ``array`` is
    ``arrays[indices[0]]`` stacked on ``arrays[indices[1]]`` ... along the rows, a view of the
    same memory, never a copy. Arrays stored next to each other in a memory-mapped file (as
    ``mlp.gate_proj`` and ``mlp.up_proj`` are in the files transformers and npllm's GGUF import
    write, and ``self_attn.q_proj`` and ``v_proj`` in the latter) form one group, the others a
    group each. The forward pass multiplies x by each group in one matrix product: one call of
    BLAS instead of several, on a larger matrix (:class:`Projection`).
    Read-only, like the weights. :class:`PackedWeight` objects are grouped the same way, by
    their blocks (same ggml type only), into a ``PackedWeight`` of the stacked blocks.
    """
    return _stack_groups(arrays)


def _stack_groups(weights):
    # Packed weights (PackedWeight) are grouped by their blocks, with packed weights of the
    # same ggml type only.
    kinds = [getattr(w, "ggml_type", None) for w in weights]
    arrays = [w.blocks if kind else w for w, kind in zip(weights, kinds)]
    where = [a.ctypes.data for a in arrays]
    roots = [_root(a) for a in arrays]
    order = sorted(range(len(arrays)), key=where.__getitem__)
    groups = [[order[0]]]
    for i in order[1:]:
        j = groups[-1][-1]
        a, b = arrays[j], arrays[i]
        if (roots[i] is roots[j] and where[j] + a.nbytes == where[i] and a.ndim == b.ndim == 2
                and a.flags.c_contiguous and b.flags.c_contiguous and a.dtype == b.dtype
                and a.shape[1] == b.shape[1] and kinds[i] == kinds[j]):
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for g in groups:
        first = weights[g[0]]
        if len(g) > 1:
            root, a = roots[g[0]], arrays[g[0]]
            first = np.ndarray((sum(arrays[i].shape[0] for i in g), a.shape[1]), a.dtype,
                               buffer=root, offset=where[g[0]] - root.ctypes.data)
            first.flags.writeable = False
            if kinds[g[0]]:
                first = PackedWeight(first, kinds[g[0]])
        out.append((first, g))
    return out


def _root(a):
    """The array that owns the memory of ``a`` (the memory map, for mapped tensors)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a
