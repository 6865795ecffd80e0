r"""Import a GGUF file (llama.cpp's format) into a Hugging Face-style folder.

The offline default model, SmolLM2-135M-Instruct, reaches us as a GGUF file. This module turns
such a file into the folder every other part of npllm reads::

    config.json             every constant, read from the GGUF metadata (none hard-coded)
    model.safetensors       float32, HF tensor names, [out, in] like torch.nn.Linear
    model.ggml.safetensors  the Q4_1 / Q8_0 matrices as the GGUF stores them (blocks of 32
                            weights sharing a scale), uint8, HF names and row order: what
                            decoding reads (``npllm.kernels.quantized``); only written when
                            the file has such matrices
    tokenizer.json          byte-level BPE rebuilt with the ``tokenizers`` library
    tokenizer_config.json   special tokens and the chat template
    npllm_source.json       where the weights came from, and that they were dequantized

Four things differ between the two formats, and each is undone here, once, at import:

1. **Names.** ``blk.3.attn_q.weight`` is ``model.layers.3.self_attn.q_proj.weight``
   (:data:`TENSOR_NAMES`, :data:`BLOCK_TENSOR_NAMES`).
2. **Shapes.** ggml lists dimensions fastest-varying first, so a GGUF tensor of shape
   ``[D, V]`` is NumPy's (and torch's) ``[V, D]``: reverse the shape.
3. **Quantization.** Weights are stored in blocks of 32 numbers sharing a scale (Q4_1: 4-bit
   integers q with a scale d and a minimum m per block, w = d q + m); ``gguf.quants.dequantize``
   turns them back into float32. The result is *close to*, not equal to, the original bfloat16
   weights: what a quantized model computes is slightly different from the Hub's model.
4. **Q/K row order.** Meta's Llama code rotates coordinate pairs (2i, 2i + 1) of each head
   (interleaved RoPE); Hugging Face rotates (i, i + Dh/2) (``rotate_half``). llama.cpp's
   converter permuted the rows of ``attn_q`` and ``attn_k`` so that its interleaved RoPE gives
   the HF model's attention; :func:`npllm.equations.position.interleaved_to_half_rows` puts the
   rows back (with H heads for q, and K heads for k), so npllm runs the HF layout.

The other families (``general.architecture`` stablelm, phi3, qwen2, gpt2) are imported the same
way into their own Hugging Face names and config keys (:func:`build_family_config`,
:data:`FAMILY_TENSOR_NAMES`): llama.cpp runs them with the HF rotation (NEOX RoPE), so their q
and k rows were never permuted, and GPT-2's matrices go back to its Conv1D layout. Their
tokenizers (``tokenizer.ggml.pre`` qwen2, stablelm2, Phi-3's SentencePiece, ...) are not
imported yet: such files are refused with the tokenizer named; files without a tokenizer import.
Only Llama's matrices are kept in their blocks for packed decoding.

The folder is written atomically: everything goes into a hidden temporary folder beside
``out_dir``, renamed to ``out_dir`` only when complete. An interrupted import leaves at most a
``.NAME.partial-*`` folder, never an ``out_dir`` that loads but is incomplete.
"""
import json
import os
import re
import secrets
import shutil
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from npllm.errors import WeightsError
from npllm.model.weights import PACKED_FILE


class UnsupportedGGUFError(WeightsError):
    """The GGUF file is not one npllm can import (architecture, quantization, tokenizer)."""


SUPPORTED_ARCHITECTURES = ("llama", "stablelm", "phi3", "qwen2", "gpt2")

# GGUF name -> Hugging Face name, for the tensors outside the decoder blocks.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# blk.N.<GGUF> -> model.layers.N.<HF>, for the tensors of decoder block N.
BLOCK_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# The other families (llama.cpp's converter: convert_hf_to_gguf.py, gguf-py's tensor_mapping.py):
# GGUF name -> HF name where it differs from Llama's. StableLM, Phi-3 and Qwen2 rotate the HF
# way in llama.cpp too (NEOX RoPE): their q and k rows are not permuted. GPT-2's Conv1D matrices
# were turned to [out, in] by the converter; the import turns them back to GPT-2's [in, out].
FAMILY_TENSOR_NAMES = {
    "stablelm": {}, "qwen2": {},
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "gpt2": {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
             "output_norm": "transformer.ln_f", "output": "lm_head",
             "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
             "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
}
GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
               ".mlp.c_proj.weight")

# tokenizer.ggml.pre values whose llama.cpp pre-tokenizer is "split every digit (\p{N}), then the
# GPT-2 regex": the original tokenizers' Sequence[Digits(individual_digits), ByteLevel].
DIGIT_SPLIT_PRE_TOKENIZERS = ("smollm", "starcoder", "refact", "codeshell")
# ... and those that are the GPT-2 regex alone.
GPT2_PRE_TOKENIZERS = ("gpt2",)
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4
_REQUIRED = object()


def supported_tensor_types():
    """The GGML tensor types ``gguf.quants.dequantize`` can turn into float32, by name.

    Found by asking it to dequantize one block of zeros of each type.
    """
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    supported = []
    for qtype, (_, type_size) in GGML_QUANT_SIZES.items():
        try:
            dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except NotImplementedError:
            continue
        supported.append(qtype.name)
    return sorted(supported)


def hf_tensor_name(gguf_name, arch="llama"):
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None if unknown);
    ``arch``: the file's ``general.architecture`` (see :data:`FAMILY_TENSOR_NAMES`)."""
    if arch == "llama":
        if gguf_name in TENSOR_NAMES:
            return TENSOR_NAMES[gguf_name]
        m = _BLOCK_NAME.fullmatch(gguf_name)
        if m and m[2] in BLOCK_TENSOR_NAMES and m[3] == "weight":
            return f"model.layers.{m[1]}.{BLOCK_TENSOR_NAMES[m[2]]}.weight"
        return None
    names = FAMILY_TENSOR_NAMES.get(arch, {})
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    top = {k.rsplit(".", 1)[0]: v.rsplit(".", 1)[0] for k, v in TENSOR_NAMES.items()}
    if base in names and not base.startswith("blk."):
        return f"{names[base]}.{suffix}"
    if base in top:
        return f"{top[base]}.{suffix}"
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m is None or (m[2] not in names and m[2] not in BLOCK_TENSOR_NAMES):
        return None
    layers = "transformer.h" if arch == "gpt2" else "model.layers"
    return f"{layers}.{m[1]}.{names.get(m[2], BLOCK_TENSOR_NAMES.get(m[2]))}.{suffix}"


def read_metadata(reader):
    """All key/value metadata of a ``gguf.GGUFReader`` as plain Python values (arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}


def numpy_shape(tensor):
    """A ``gguf.ReaderTensor``'s shape in NumPy order: ggml lists the fastest axis first."""
    return tuple(int(n) for n in reversed(tensor.shape))


def dequantize_tensor(tensor):
    """One ``gguf.ReaderTensor`` -> float32 array of shape :func:`numpy_shape`."""
    from gguf.quants import dequantize

    w = dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(w, dtype=np.float32).reshape(numpy_shape(tensor))


def _float32_literal(x):
    """The shortest decimal that reads back as the same float32: 9.999999747378752e-06 -> 1e-05."""
    return float(str(np.float32(x)))


def build_config(metadata, shapes):
    """config.json (a ``LlamaForCausalLM``) from the GGUF metadata; every constant from the file.

    ``shapes``: {GGUF tensor name: NumPy shape}; the tensors tell whether the embeddings are
    tied (no ``output.weight``) and, when the metadata does not, the vocabulary size.
    """
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"GGUF architecture {arch!r} is not supported; npllm imports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (general.architecture).")
    if arch != "llama":
        return build_family_config(arch, metadata, shapes)

    def get(key, default=_REQUIRED):
        value = metadata.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise UnsupportedGGUFError(f"the GGUF file has no {arch}.{key} metadata; "
                                       "it is needed to describe the model")
        return value

    n_heads = int(get("attention.head_count"))
    n_kv_heads = int(get("attention.head_count_kv", n_heads))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedGGUFError(f"partial rotary embeddings (rope.dimension_count {rope_dim} "
                                   f"< head width {head_dim}) are not supported")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in shapes:
        raise UnsupportedGGUFError("RoPE scaling (rope.scaling.type or a rope_freqs tensor) is not "
                                   "supported; npllm implements plain RoPE")
    embeddings = shapes.get("token_embd.weight")
    if embeddings is None:
        raise UnsupportedGGUFError("the GGUF file has no token_embd.weight tensor")
    vocab_size = int(get("vocab_size", embeddings[0]))
    if embeddings != (vocab_size, hidden):
        raise UnsupportedGGUFError(f"token_embd.weight has shape {embeddings}, but the metadata "
                                   f"says vocabulary {vocab_size} x width {hidden}")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _float32_literal(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_literal(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in shapes,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = metadata["tokenizer.ggml.padding_token_id"]
    return config


def build_family_config(arch, metadata, shapes):
    """config.json of a StableLM, Phi-3, Qwen2 or GPT-2 GGUF file, in the family's HF keys
    (what transformers' config class of that ``model_type`` reads), from the metadata llama.cpp's
    converter writes and the tensors' shapes."""
    def get(key, default=_REQUIRED):
        value = metadata.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise UnsupportedGGUFError(f"the GGUF file has no {arch}.{key} metadata; "
                                       "it is needed to describe the model")
        return value

    if metadata.get(f"{arch}.rope.scaling.type", "none") != "none" or any(
            n.startswith(("rope_freqs", "rope_factors")) for n in shapes):
        raise UnsupportedGGUFError("RoPE scaling (rope.scaling.type, rope_freqs or rope_factors "
                                   "tensors) is not supported; npllm implements plain RoPE")
    V, D = shapes["token_embd.weight"]
    H = int(get("attention.head_count"))
    K = int(get("attention.head_count_kv", H))
    up = shapes["blk.0.ffn_up.weight"][0]
    common = {"architectures": [ARCHITECTURES_BY_TYPE[arch]], "model_type": arch,
              "vocab_size": V, "tie_word_embeddings": "output.weight" not in shapes,
              "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
              "torch_dtype": "float32"}
    if arch == "gpt2":
        return {**common, "n_embd": D, "n_layer": int(get("block_count")), "n_head": H,
                "n_inner": up, "n_positions": shapes["position_embd.weight"][0],
                "layer_norm_epsilon": _float32_literal(get("attention.layer_norm_epsilon")),
                "activation_function": "gelu_new", "tie_word_embeddings": True}
    config = {**common, "hidden_size": D, "num_hidden_layers": int(get("block_count")),
              "num_attention_heads": H, "num_key_value_heads": K,
              "intermediate_size": up // 2 if arch == "phi3" else up,
              "max_position_embeddings": int(get("context_length")),
              "rope_theta": _float32_literal(get("rope.freq_base", 10000.0)), "hidden_act": "silu"}
    head_dim = D // H
    factor = int(get("rope.dimension_count", head_dim)) / head_dim
    if arch == "stablelm":
        config.update(layer_norm_eps=_float32_literal(get("attention.layer_norm_epsilon")),
                      partial_rotary_factor=factor,
                      use_qkv_bias="blk.0.attn_q.bias" in shapes,
                      use_parallel_residual=bool(get("use_parallel_residual", False)))
    else:
        config["rms_norm_eps"] = _float32_literal(get("attention.layer_norm_rms_epsilon"))
    if arch == "phi3":
        config.update(partial_rotary_factor=factor,
                      sliding_window=get("attention.sliding_window", None) or None)
    return config


ARCHITECTURES_BY_TYPE = {"stablelm": "StableLmForCausalLM", "phi3": "Phi3ForCausalLM",
                         "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


def check_tensor_shapes(config, shapes):
    """Raise :class:`UnsupportedGGUFError` unless the tensors are the ones ``config`` (from the
    metadata) describes: one block of tensors per layer, each of the expected shape. A damaged
    or inconsistent file (a block_count of 2^40 with 2 layers of tensors) stops here, before
    anything is built from the metadata's numbers."""
    from npllm.model.family_config import config_from_dict
    from npllm.model.weights import expected_shapes

    config = config_from_dict(config)
    n_layers = config.num_hidden_layers
    layers = {int(m.group(1)) for m in map(re.compile(r"blk\.(\d+)\.").match, shapes) if m}
    if len(layers) != n_layers or (layers and (min(layers), max(layers)) != (0, n_layers - 1)):
        held = f"{len(layers)} layers (blk.{min(layers)} to blk.{max(layers)})" if layers \
            else "no layer"
        raise UnsupportedGGUFError(f"the metadata says {n_layers} layers (block_count) but the "
                                   f"tensors are those of {held}: the file is damaged or "
                                   "inconsistent")
    if config.model_type != "llama":  # the families' tensors are checked as they are converted
        return
    hf_shapes = {hf_tensor_name(name): tuple(shape) for name, shape in shapes.items()}
    for name, (shape, symbols) in expected_shapes(config).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        found = hf_shapes.get(name)
        if found != shape:
            what = "missing" if found is None else f"of shape {found}"
            raise UnsupportedGGUFError(f"tensor {name} is {what}, but the metadata describes "
                                       f"{symbols} = {shape}: the file is damaged or "
                                       "inconsistent")


def check_supported(reader, metadata):
    """Raise :class:`UnsupportedGGUFError` before any work if the file cannot be imported."""
    supported = supported_tensor_types()
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(supported))
    if bad:
        raise UnsupportedGGUFError(
            f"GGUF tensor types {', '.join(bad)} cannot be dequantized; supported types: "
            f"{', '.join(supported)}")
    arch = metadata.get("general.architecture", "llama")
    unknown = [t.name for t in reader.tensors if hf_tensor_name(t.name, arch) is None]
    if unknown:
        raise UnsupportedGGUFError(
            f"GGUF tensors {', '.join(unknown[:5])} have no {arch} counterpart in npllm; "
            f"expected {', '.join(TENSOR_NAMES)} and blk.N.{{{', '.join(BLOCK_TENSOR_NAMES)}}}"
            ".weight (and the family's names: npllm.model.gguf.FAMILY_TENSOR_NAMES)")
    model = metadata.get("tokenizer.ggml.model")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if model is not None and (model != "gpt2"
                              or pre not in DIGIT_SPLIT_PRE_TOKENIZERS + GPT2_PRE_TOKENIZERS):
        raise UnsupportedGGUFError(
            f"GGUF tokenizer {model!r} with pre-tokenizer {pre!r} is not supported; npllm "
            f"imports byte-level BPE (tokenizer.ggml.model 'gpt2') with tokenizer.ggml.pre in "
            f"{', '.join(DIGIT_SPLIT_PRE_TOKENIZERS + GPT2_PRE_TOKENIZERS)}")


def hf_tensors(reader, config):
    """Yield (HF name, float32 array) for every tensor: dequantized, reshaped, Q/K rows restored."""
    from npllm.equations.position import interleaved_to_half_rows

    arch = config["model_type"]
    for tensor in tensors_to_import(reader, config):
        name, w = hf_tensor_name(tensor.name, arch), dequantize_tensor(tensor)
        if arch != "llama":  # no permuted rows; GPT-2's Conv1D back to [in, out]
            w = w.T if name.endswith(GPT2_CONV1D) else w
        elif name.endswith("q_proj.weight"):
            w = interleaved_to_half_rows(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = interleaved_to_half_rows(w, config["num_key_value_heads"])
        yield name, w


def hf_shape(tensor, arch):
    """(HF name, shape in the HF file) of a GGUF tensor: GPT-2's Conv1D matrices [in, out]."""
    name, shape = hf_tensor_name(tensor.name, arch), numpy_shape(tensor)
    return name, shape[::-1] if arch == "gpt2" and name.endswith(GPT2_CONV1D) else shape


def tensors_to_import(reader, config):
    """The GGUF tensors to write: all, except GPT-2's ``output.weight``, the converter's copy of
    the token embedding (GPT-2's LM head is tied)."""
    skip = "output.weight" if config["model_type"] == "gpt2" else None
    return [t for t in reader.tensors if t.name != skip]


def packed_tensors(reader, config):
    """Yield (HF name, ggml type, blocks) for every matrix stored in a type with a kernel.

    ``blocks`` is uint8 [N, D / 32 * bytes per block], the bytes of the GGUF tensor, one row of
    W per row; the rows of q_proj and k_proj are put in the HF order by the same permutation as
    the float32 weights (:func:`hf_tensors`): a row is whole blocks, so permuting rows moves
    blocks and never changes one. In the order a decoding step reads them (per layer q, k, v,
    o, gate, up, down; then the LM head, or the embedding matrix that is the tied LM head), so
    that the projections the forward pass fuses (q/k/v, gate/up) lie one after another in the
    file, and the bytes the kernels prefetch past the end of one matrix start the next one.
    """
    from npllm.equations.position import interleaved_to_half_rows
    from npllm.model.config import LlamaConfig
    from npllm.ggml_blocks import BLOCK_BYTES
    from npllm.model.weights import expected_shapes

    if config["model_type"] != "llama":  # the packed decoding path is Llama's (npllm.engine)
        return
    order = {name: i for i, name in enumerate(expected_shapes(LlamaConfig.from_dict(config)))}
    order["model.embed_tokens.weight"] = len(order)  # read as the (tied) LM head, last
    found = []
    for tensor in reader.tensors:
        name, ggml_type = hf_tensor_name(tensor.name), tensor.tensor_type.name
        if ggml_type in BLOCK_BYTES and len(tensor.shape) == 2 and name in order:
            found.append((order[name], name, tensor))
    for _, name, tensor in sorted(found, key=lambda item: item[0]):
        blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(numpy_shape(tensor)[0], -1)
        if name.endswith("q_proj.weight"):
            blocks = interleaved_to_half_rows(blocks, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            blocks = interleaved_to_half_rows(blocks, config["num_key_value_heads"])
        yield name, tensor.tensor_type.name, blocks


def write_packed(path, tensors, source=""):
    """Write (name, ggml type, uint8 blocks) triples to a safetensors file (``U8`` tensors),
    one after another with no gaps, the ggml types in the metadata; return how many.

    Metadata: ``{"format": "npllm-ggml-blocks", "ggml_types": JSON {name: type}, "source":
    the GGUF file's name}`` and the integrity record of :func:`npllm.model.integrity.record`
    (size, CRC-32s); read by :func:`npllm.engine.packed.load_packed`.
    """
    from npllm.model.integrity import record
    from npllm.model.weights import PACKED_FORMAT

    tensors = list(tensors)
    types = {name: ggml_type for name, ggml_type, _ in tensors}
    entries, offset = {}, 0
    for name, _, blocks in tensors:
        entries[name] = {"dtype": "U8", "shape": list(blocks.shape),
                         "data_offsets": [offset, offset + blocks.nbytes]}
        offset += blocks.nbytes
    metadata = {"format": PACKED_FORMAT, "ggml_types": json.dumps(types), "source": source}
    # Its size and CRC-32s, checked at every load (npllm.model.integrity.verify_packed).
    check = record(entries, metadata, (blocks for _, _, blocks in tensors))
    header = {"__metadata__": {**metadata, **check}, **entries}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, _, blocks in tensors:
            f.write(np.ascontiguousarray(blocks).data)
        f.flush()
        os.fsync(f.fileno())
    return len(tensors)


def build_tokenizer(metadata):
    r"""tokenizer.json (a ``tokenizers.Tokenizer``) from the GGUF vocabulary and merges.

    Byte-level BPE as GPT-2 made it: text is first cut into pieces (pre-tokenized), each piece's
    UTF-8 bytes are spelled with 256 printable characters (a space is ``Ġ``), then BPE merges
    pairs in the order of ``tokenizer.ggml.merges``. ``tokenizer.ggml.pre`` names the cutting:
    for ``smollm`` every digit is its own piece (``Digits(individual_digits=True)``, llama.cpp's
    ``\p{N}`` split), then GPT-2's regex (``ByteLevel``), exactly as SmolLM's own tokenizer.json.
    Tokens of type 3 (control: ``<|im_start|>``...) become special added tokens, never split.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    assert all(len(m) == 2 for m in merges), "a byte-level merge is two tokens without spaces"
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if metadata.get("tokenizer.ggml.pre", "gpt2") in DIGIT_SPLIT_PRE_TOKENIZERS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == len(tokens)
    return tokenizer


def build_tokenizer_config(metadata, config):
    """tokenizer_config.json: the special tokens, BOS/EOS flags and the chat template."""
    tokens = metadata["tokenizer.ggml.tokens"]
    out = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    for name, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")]:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            out[name] = tokens[token_id]
    if "tokenizer.chat_template" in metadata:
        out["chat_template"] = metadata["tokenizer.chat_template"]
    return out


def build_source(gguf_path, reader, metadata):
    """npllm_source.json: the origin of the weights, and a reminder that they were quantized."""
    import gguf

    from npllm import __version__

    counts = Counter(t.tensor_type.name for t in reader.tensors)
    file_type = metadata.get("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:  # absent or unknown: name the most common type instead
        quantization = counts.most_common(1)[0][0]
    return {
        "format": "gguf",
        "gguf_file": gguf_path.name,
        "gguf_path": str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "general.name": metadata.get("general.name"),
        "quantization": quantization,
        "tensor_types": dict(sorted(counts.items())),
        "dtype": "float32",
        "note": f"Weights dequantized from {quantization} to float32: close to, not equal to, "
                "the original (unquantized) weights.",
        "tokenizer_pre": metadata.get("tokenizer.ggml.pre"),
        "converter": f"npllm {__version__} (npllm.model.gguf.convert_gguf)",
    }


def write_safetensors(path, shapes, arrays, metadata=None):
    """Write float32 tensors to a safetensors file one at a time (no whole-model copy in memory).

    The format: 8 bytes little-endian header length N, N bytes of JSON
    ``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
    "__metadata__": {...}}``
    (padded with spaces to a multiple of 8), then the raw little-endian data of every tensor.
    ``shapes``: {name: shape} in file order; ``arrays``: (name, array) pairs in the same order.
    """
    header, offset = {"__metadata__": dict(metadata or {})}, 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, shape), (got_name, array) in zip(shapes.items(), arrays, strict=True):
            assert name == got_name and array.shape == tuple(shape), (name, got_name, array.shape)
            f.write(np.ascontiguousarray(array, dtype="<f4").data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path, out_dir, progress=True):
    """Import a Llama GGUF file into a new Hugging Face-style folder ``out_dir``; return its Path.

    Writes config.json, model.safetensors (float32), model.ggml.safetensors (the Q4_1 / Q8_0
    matrices in their blocks, if any), tokenizer.json, tokenizer_config.json and
    npllm_source.json, atomically (see the module docstring). ``progress``: a tqdm bar over the
    tensors on stderr. Raises :class:`UnsupportedGGUFError` (an ``NpllmError``) for an
    architecture, tensor type or tokenizer npllm cannot import, before writing anything.
    """
    import gguf
    from tqdm import tqdm  # not tqdm.auto: a notebook widget would not go to stderr

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists():
        raise WeightsError(f"{out_dir} already exists; convert into a new folder "
                           "(or delete it first)")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except ValueError as e:  # bad magic, truncated file, ...
        raise UnsupportedGGUFError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    metadata = read_metadata(reader)
    config = build_config(metadata, {t.name: numpy_shape(t) for t in reader.tensors})
    check_tensor_shapes(config, {t.name: numpy_shape(t) for t in reader.tensors})
    check_supported(reader, metadata)
    has_tokenizer = "tokenizer.ggml.tokens" in metadata

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from npllm.model.folders import sweep_stale_imports
    sweep_stale_imports(out_dir, kind="partial")  # left by a conversion that was killed
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # unlike tempfile.mkdtemp (mode 0700), honours the umask like any new folder
    try:
        _write_json(tmp / "config.json", config)
        arch = config["model_type"]
        shapes = dict(hf_shape(t, arch) for t in tensors_to_import(reader, config))
        with tqdm(hf_tensors(reader, config), total=len(shapes), desc="importing GGUF",
                  unit="tensor", file=sys.stderr, disable=not progress) as bar:
            write_safetensors(tmp / "model.safetensors", shapes, bar, metadata={"format": "pt"})
        packed = list(packed_tensors(reader, config))
        if packed:
            write_packed(tmp / PACKED_FILE, packed, source=gguf_path.name)
        if has_tokenizer:
            build_tokenizer(metadata).save(str(tmp / "tokenizer.json"))
            _write_json(tmp / "tokenizer_config.json", build_tokenizer_config(metadata, config))
        source = build_source(gguf_path.resolve(), reader, metadata)
        if packed:
            source["packed"] = {"file": PACKED_FILE, "tensors": len(packed),
                                "bytes": sum(blocks.nbytes for _, _, blocks in packed),
                                "note": "the quantized matrices as the GGUF stores them, read "
                                        "when decoding; the same weights as model.safetensors"}
        _write_json(tmp / "npllm_source.json", source)
        os.rename(tmp, out_dir)  # atomic on one file system; fails if out_dir appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
