"""GGUF import (npllm.model.gguf): names, shapes, dequantization, the Q/K row order, atomicity.

Two kinds of files:

- tiny GGUF files written here from a tiny transformers checkpoint, the way llama.cpp's
  converter writes them (names, reversed shapes, Q/K rows permuted, tokenizer metadata). Fast;
  an HF -> GGUF -> HF round trip must give back the exact float32 weights;
- the real default model (SmolLM2-135M-Instruct Q4_1, marked ``real_model``), converted once per
  test process and compared tensor by tensor with ``gguf.quants.dequantize`` and with
  transformers' own GGUF loader (an independent implementation of the same un-permutation).
"""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

import gguf
from gguf.quants import dequantize, quantize

import npllm.model.gguf as npllm_gguf
from npllm.errors import NpllmError
from npllm.model.gguf import UnsupportedGGUFError, convert_gguf
from npllm.tokenizer import Tokenizer
from tiny_models import make_tiny_llama

# HF name -> GGUF name, written out independently of npllm's table.
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
FOLDER_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "npllm_source.json"}


def gguf_name(hf_name):
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, *module, _ = hf_name.split(".")
    return f"blk.{layer}.{HF_TO_GGUF['.'.join(module)]}.weight"


def llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` (HF rows -> interleaved RoPE)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def raw_tensor(tensor):
    """A GGUF tensor dequantized by gguf-py, in NumPy order (ggml's shape reversed)."""
    shape = tuple(reversed(tensor.shape.tolist()))
    return dequantize(tensor.data, tensor.tensor_type).reshape(shape)


# --- tiny GGUF files --------------------------------------------------------------------------

def write_tiny_gguf(path, folder, arch="llama", pre="smollm", qtypes=None, extra=None):
    """Write the checkpoint in ``folder`` as llama.cpp would: a GGUF file at ``path``.

    ``qtypes``: {GGUF name suffix: GGMLQuantizationType} (default float32 everywhere);
    ``extra``: {GGUF name: array} written as well (for the unsupported-type tests).
    """
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_config["chat_template"])
    for hf, tensor in weights.items():
        name = gguf_name(hf)
        if name.endswith("attn_q.weight"):
            tensor = llama_cpp_permute(tensor, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            tensor = llama_cpp_permute(tensor, config["num_key_value_heads"])
        qtype = next((q for suffix, q in (qtypes or {}).items() if name.endswith(suffix)), None)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
        else:
            w.add_tensor(name, quantize(tensor.astype(np.float32), qtype), raw_dtype=qtype)
    for name, tensor in (extra or {}).items():
        w.add_tensor(name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny untied GQA checkpoint (H=4, K=2) saved by transformers, with SmolLM2's tokenizer
    layout."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf", num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_folder, tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf", tiny_folder)


def test_tiny_round_trip_gives_back_the_exact_weights(tiny_folder, tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    assert out == tmp_path / "out"
    assert {p.name for p in out.iterdir()} == FOLDER_FILES
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    ours = load_file(out / "model.safetensors")
    original = load_file(tiny_folder / "model.safetensors")
    assert sorted(ours) == sorted(original)
    for name in original:
        assert ours[name].dtype == np.float32
        np.testing.assert_array_equal(ours[name], original[name], err_msg=name)


def test_tiny_config_matches_the_checkpoint(tiny_folder, tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    ours = json.loads((out / "config.json").read_text())
    original = json.loads((tiny_folder / "config.json").read_text())
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "rms_norm_eps", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id",
            "model_type", "hidden_act"]
    assert {k: ours[k] for k in keys} == {k: original.get(k, original.get("rope_parameters", {})
                                                          .get(k)) for k in keys}
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["head_dim"] == 16


def test_tiny_tokenizer_round_trip(tiny_folder, tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    ours, original = Tokenizer.from_folder(out), Tokenizer.from_folder(tiny_folder)
    for text in ["The quick brown fox, 12345 tokens!", "café 東京 🙂\n\n  def add(a, b):",
                 "<|im_start|>user\nHi<|im_end|>\n"]:
        assert ours.encode(text) == original.encode(text), text
        assert ours.decode(ours.encode(text)) == text
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert (ours.apply_chat_template(chat, add_generation_prompt=True)
            == original.apply_chat_template(chat, add_generation_prompt=True))


def test_tiny_quantized_tensors_are_gguf_dequantized(tiny_folder, tmp_path):
    qtypes = {"attn_q.weight": gguf.GGMLQuantizationType.Q8_0,
              "attn_k.weight": gguf.GGMLQuantizationType.Q4_1,
              "ffn_up.weight": gguf.GGMLQuantizationType.Q4_1,
              "norm.weight": gguf.GGMLQuantizationType.F16}
    path = write_tiny_gguf(tmp_path / "q.gguf", tiny_folder, qtypes=qtypes)
    out = convert_gguf(path, tmp_path / "out", progress=False)
    ours = load_file(out / "model.safetensors")
    original = load_file(tiny_folder / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor in gguf.GGUFReader(path).tensors:
        hf = next(n for n in original if gguf_name(n) == tensor.name)
        mine = ours[hf]
        kind = tensor.name.split(".")[-2]
        if kind in heads:  # put our rows back in llama.cpp's order to compare with the file
            mine = llama_cpp_permute(mine, heads[kind])
        np.testing.assert_array_equal(mine, raw_tensor(tensor), err_msg=tensor.name)
        # ... and quantization changed the weights only a little (4 bits: 1/15 of a block's range)
        np.testing.assert_allclose(ours[hf], original[hf], atol=0.2 * np.abs(original[hf]).max())
    assert json.loads((out / "npllm_source.json").read_text())["tensor_types"]["Q4_1"] == 4


def test_tiny_q_and_k_match_transformers_gguf_loader(tiny_gguf, tmp_path):
    """transformers' GGUF loader un-permutes with its own code: the same rows as ours."""
    import torch
    from transformers import AutoModelForCausalLM

    out = convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    ours = load_file(out / "model.safetensors")
    theirs = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                                  dtype=torch.float32).state_dict()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name].numpy(), err_msg=name)


def test_safetensors_file_layout(tiny_gguf, tmp_path):
    """Float32, an 8-byte aligned data section: the file can be memory-mapped as it is."""
    out = convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    data = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    assert n % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    ends = sorted(v["data_offsets"] for v in header.values())
    assert ends[0][0] == 0 and ends[-1][1] == len(data) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    for name, info in header.items():
        assert info["dtype"] == "F32"
        begin, end = info["data_offsets"]
        mapped = np.frombuffer(data, np.float32, (end - begin) // 4, 8 + n + begin)
        np.testing.assert_array_equal(mapped.reshape(info["shape"]),
                                      load_file(out / "model.safetensors")[name])


def test_progress_bar_on_stderr_only_when_asked(tiny_gguf, tmp_path, capsys):
    convert_gguf(tiny_gguf, tmp_path / "quiet", progress=False)
    assert capsys.readouterr() == ("", "")
    convert_gguf(tiny_gguf, tmp_path / "loud", progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "importing GGUF" in captured.err


def test_build_config_defaults_and_checks():
    """rope.freq_base defaults to 10000 (llama.cpp's default), head_count_kv to head_count;
    float32 metadata is written as the decimal its author wrote (1e-05, not 9.99999974e-06)."""
    from npllm.model.gguf import build_config

    metadata = {"general.architecture": "llama", "llama.attention.head_count": 4,
                "llama.embedding_length": 64, "llama.feed_forward_length": 96,
                "llama.block_count": 2, "llama.context_length": 128,
                "llama.attention.layer_norm_rms_epsilon": float(np.float32(1e-5))}
    shapes = {"token_embd.weight": (100, 64)}
    config = build_config(metadata, shapes)
    assert config["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-05
    assert config["num_key_value_heads"] == 4 and config["head_dim"] == 16
    assert config["vocab_size"] == 100 and config["tie_word_embeddings"] is True
    untied = build_config(metadata, {**shapes, "output.weight": (100, 64)})
    assert untied["tie_word_embeddings"] is False
    assert build_config({**metadata, "llama.rope.freq_base": 5e5}, shapes)["rope_theta"] == 500000.0
    with pytest.raises(UnsupportedGGUFError, match="no llama.block_count"):
        build_config({k: v for k, v in metadata.items() if k != "llama.block_count"}, shapes)
    with pytest.raises(UnsupportedGGUFError, match="vocabulary 99 x width 64"):
        build_config({**metadata, "llama.vocab_size": 99}, shapes)
    with pytest.raises(UnsupportedGGUFError, match="RoPE scaling"):
        build_config({**metadata, "llama.rope.scaling.type": "yarn"}, shapes)


# --- errors and atomicity ---------------------------------------------------------------------

@pytest.mark.parametrize("fail_in", ["dequantize_tensor", "build_tokenizer"])
def test_a_failed_conversion_leaves_no_folder(tiny_gguf, tmp_path, monkeypatch, fail_in):
    """Fails half-way through the tensors, or after all weights were written: no out_dir, no
    temporary folder left."""
    real, calls = getattr(npllm_gguf, fail_in), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 or fail_in == "build_tokenizer":
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(npllm_gguf, fail_in, failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_is_refused(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(NpllmError, match="already exists"):
        convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_unsupported_tensor_type_lists_the_supported_ones(tiny_folder, tmp_path):
    path = write_tiny_gguf(tmp_path / "f64.gguf", tiny_folder,
                           extra={"blk.0.attn_norm.weight.f64": np.zeros(64, np.float64)})
    with pytest.raises(UnsupportedGGUFError) as err:
        convert_gguf(path, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "F64 cannot be dequantized" in message
    for name in ["F32", "F16", "BF16", "Q4_1", "Q8_0", "Q4_K", "Q6_K"]:
        assert name in message
    assert isinstance(err.value, NpllmError)
    assert [p.name for p in tmp_path.iterdir()] == ["f64.gguf"]


def test_unsupported_architecture(tiny_folder, tmp_path):
    path = write_tiny_gguf(tmp_path / "falcon.gguf", tiny_folder, arch="falcon")
    with pytest.raises(UnsupportedGGUFError, match="architecture 'falcon' is not supported.*llama"):
        convert_gguf(path, tmp_path / "out", progress=False)


def test_unsupported_pre_tokenizer(tiny_folder, tmp_path):
    path = write_tiny_gguf(tmp_path / "l3.gguf", tiny_folder, pre="llama-bpe")
    with pytest.raises(UnsupportedGGUFError, match="pre-tokenizer 'llama-bpe'.*smollm"):
        convert_gguf(path, tmp_path / "out", progress=False)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UnsupportedGGUFError, match="not a readable GGUF"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)


# --- the real default model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(converted_default_folder):
    return converted_default_folder


@pytest.fixture(scope="module")
def reader():
    from conftest import default_gguf_path

    return gguf.GGUFReader(default_gguf_path())


@pytest.mark.real_model
def test_default_config(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0, "rope_scaling": None, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32",
    }
    # ... and the Q4_1 / Q8_0 matrices as stored (tests/test_quantized.py)
    assert {p.name for p in converted.iterdir()} == FOLDER_FILES | {"model.ggml.safetensors"}
    source = json.loads((converted / "npllm_source.json").read_text())
    assert source["quantization"] == "Q4_1" and source["dtype"] == "float32"
    assert source["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.real_model
def test_default_every_tensor_is_the_dequantized_gguf_tensor(converted, reader):
    ours = load_file(converted / "model.safetensors")
    assert "lm_head.weight" not in ours  # tied: no output.weight in the file
    by_gguf_name = {gguf_name(hf): hf for hf in ours}
    assert sorted(by_gguf_name) == sorted(t.name for t in reader.tensors)
    assert len(ours) == 272
    for tensor in reader.tensors:
        mine, kind = ours[by_gguf_name[tensor.name]], tensor.name.split(".")[-2]
        assert mine.dtype == np.float32 and mine.shape == tuple(reversed(tensor.shape.tolist()))
        if kind == "attn_q":
            mine = llama_cpp_permute(mine, 9)
        elif kind == "attn_k":
            mine = llama_cpp_permute(mine, 3)
        np.testing.assert_array_equal(mine, raw_tensor(tensor), err_msg=tensor.name)


@pytest.mark.real_model
def test_default_weights_equal_transformers_gguf_loader(converted, hf_gguf_model):
    """Every tensor, q_proj / k_proj of all 30 layers included, bit for bit."""
    ours = load_file(converted / "model.safetensors")
    theirs = hf_gguf_model.state_dict()
    assert set(theirs) - set(ours) == {"lm_head.weight"}
    for name, w in ours.items():
        np.testing.assert_array_equal(w, theirs[name].numpy(), err_msg=name)
    np.testing.assert_array_equal(ours["model.embed_tokens.weight"], theirs["lm_head.weight"])


@pytest.mark.real_model
def test_default_q_k_without_unpermuting_differ(reader, hf_gguf_model):
    """The negative test: the rows as stored in the GGUF are not transformers' rows, and the K
    rows cannot be un-permuted with the query head count (192 rows are not 9 heads of pairs)."""
    from npllm.equations.position import interleaved_to_half_rows

    theirs = hf_gguf_model.state_dict()
    stored = {t.name: raw_tensor(t) for t in reader.tensors if t.name.startswith("blk.0.attn_")}
    for kind, hf, heads in [("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3)]:
        reference = theirs[f"model.layers.0.self_attn.{hf}.weight"].numpy()
        raw = stored[f"blk.0.{kind}.weight"]
        assert np.abs(raw - reference).max() > 0.1
        np.testing.assert_array_equal(interleaved_to_half_rows(raw, heads), reference)
    with pytest.raises(ValueError):
        interleaved_to_half_rows(stored["blk.0.attn_k.weight"], 9)


@pytest.mark.real_model
def test_default_folder_loads_in_transformers(converted, hf_gguf_model):
    """The folder is a Hugging Face checkpoint: transformers loads it and computes the same
    logits as from the GGUF file itself (so config.json's constants are the GGUF's)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 4093, 198, 19556, 905, 28, 216, 33, 34, 2]])
    with torch.no_grad():
        np.testing.assert_array_equal(model(ids).logits.numpy(), hf_gguf_model(ids).logits.numpy())
