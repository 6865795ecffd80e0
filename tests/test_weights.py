"""safetensors -> float32 arrays: equal to torch's state_dict, zero-copy float32, clear errors."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tiny_models import load_reference, make_tiny_llama, tiny_llama

from npllm.errors import NpllmError, WeightsError
from npllm.model.config import LlamaConfig
from npllm.model.weights import expected_shapes, load_weights, read_safetensors_header, save_weights


def load(folder):
    return load_weights(folder, LlamaConfig.from_file(folder))


def torch_state(folder):
    """transformers' own float32 weights for the folder (tied lm_head included)."""
    model = load_reference(folder)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state.setdefault("lm_head.weight", model.lm_head.weight.detach().numpy())
    return state


def rewrite(folder, change):
    """Apply ``change(tensors)`` to the folder's model.safetensors."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_weights_equal_torch_state_dict(dtype):
    folder = tiny_llama(dtype=dtype)
    weights = load(folder)
    config = LlamaConfig.from_file(folder)
    assert list(weights) == list(expected_shapes(config))  # every tensor, in model order
    reference = torch_state(folder)
    for name, w in weights.items():
        assert w.dtype == np.float32 and w.shape == reference[name].shape, name
        np.testing.assert_array_equal(w, reference[name], err_msg=name)  # widening is exact
        assert not w.flags.writeable, name


@pytest.mark.parametrize("variant", [
    dict(model_type="mistral"),
    dict(head_dim=32),  # H * Dh = 128 != D = 64, as transformers allows
    dict(num_key_value_heads=1, rope_theta=500.0, rms_norm_eps=1e-5),
    dict(vocab_size=400),  # embedding rows beyond the tokenizer's vocabulary
])
def test_tiny_model_variants(variant):
    folder = tiny_llama(**variant)
    config = LlamaConfig.from_file(folder)
    for key, value in variant.items():
        assert getattr(config, key) == value, key
    weights = load_weights(folder, config)
    reference = torch_state(folder)
    for name, w in weights.items():
        np.testing.assert_array_equal(w, reference[name], err_msg=name)


def test_bfloat16_is_really_stored_as_bfloat16():
    header, _, _ = read_safetensors_header(tiny_llama(dtype="bfloat16") / "model.safetensors")
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}


def memory_map_below(array):
    """The np.memmap an array is a view of, or None."""
    while array is not None and not isinstance(array, np.memmap):
        array = array.base if isinstance(array, np.ndarray) else None
    return array


def test_float32_weights_are_zero_copy_views_of_the_file():
    folder = tiny_llama()
    weights = load(folder)
    for name, w in weights.items():
        assert not w.flags.owndata and not w.flags.writeable, name
        mapped = memory_map_below(w)
        assert mapped is not None, name
        assert str(mapped.filename) == str(folder / "model.safetensors"), name
        assert np.shares_memory(w, mapped), name
    # bf16 is widened into new (read-only) float32 arrays that do not keep the file mapped.
    widened = load(tiny_llama(dtype="bfloat16"))["model.norm.weight"]
    assert type(widened) is np.ndarray and widened.flags.owndata
    assert memory_map_below(widened) is None


def test_sharded_checkpoint(tmp_path):
    folder = make_tiny_llama(tmp_path / "m", max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and (folder / "model.safetensors.index.json").exists()
    weights = load(folder)
    reference = torch_state(folder)
    assert set(weights) == set(reference)
    for name, w in weights.items():
        np.testing.assert_array_equal(w, reference[name], err_msg=name)


def test_missing_shard_message(tmp_path):
    folder = make_tiny_llama(tmp_path / "m", max_shard_size="40KB")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightsError, match=f"lists shard.*{victim.name}.*download again"):
        load(folder)


def test_tied_embeddings_are_one_array():
    folder = tiny_llama(tie_word_embeddings=True)
    assert "lm_head.weight" not in read_safetensors_header(folder / "model.safetensors")[0]
    weights = load(folder)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    np.testing.assert_array_equal(weights["lm_head.weight"], torch_state(folder)["lm_head.weight"])


def test_absent_lm_head_means_tied_even_if_config_says_untied(tmp_path):
    folder = make_tiny_llama(tmp_path / "m")
    rewrite(folder, lambda t: t.pop("lm_head.weight"))
    weights = load(folder)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]


def test_tied_config_ignores_a_stored_lm_head(tmp_path):
    """transformers ties when the config says so, whatever the file holds."""
    folder = make_tiny_llama(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load(folder)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]


def test_missing_tensor_message(tmp_path):
    folder = make_tiny_llama(tmp_path / "m")
    rewrite(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(WeightsError) as info:
        load(folder)
    message = str(info.value)
    assert "model.layers.1.mlp.down_proj.weight is missing (expected [D, F] = (64, 128))" in message
    assert "same model" in message and isinstance(info.value, NpllmError)


def test_misshaped_tensor_message(tmp_path):
    folder = make_tiny_llama(tmp_path / "m")
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite(folder, lambda t: t.update({name: np.ascontiguousarray(t[name].T)}))
    with pytest.raises(WeightsError, match=r"k_proj\.weight in model\.safetensors has shape "
                                           r"\(64, 32\), expected \[K\*Dh, D\] = \(32, 64\)"):
        load(folder)


def test_more_layers_than_config_says(tmp_path):
    folder = make_tiny_llama(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(WeightsError, match="layers up to model.layers.1 but config.json says "
                                           "num_hidden_layers = 1"):
        load(folder)


def test_quantized_dtype_is_refused(tmp_path):
    folder = make_tiny_llama(tmp_path / "m")
    name = "model.norm.weight"
    rewrite(folder, lambda t: t.update({name: np.ones(64, dtype=np.int8)}))
    with pytest.raises(WeightsError, match=r"model\.norm\.weight in model\.safetensors is stored "
                                           "as I8.*float32, float16 and bfloat16"):
        load(folder)


def test_pickle_only_folder_is_refused_with_a_way_out(tmp_path):
    folder = make_tiny_llama(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(WeightsError) as info:
        load(folder)
    message = str(info.value)
    assert "pytorch_model.bin" in message and "pickle" in message
    assert "arbitrary code" in message and "save_pretrained" in message


def test_no_weights_at_all(tmp_path):
    folder = make_tiny_llama(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="has no weights: expected model.safetensors"):
        load(folder)
    with pytest.raises(WeightsError, match="is not a folder"):
        load_weights(folder / "config.json", LlamaConfig.from_file(folder))


@pytest.mark.parametrize("keep, message", [
    (lambda n: n - 1000, r"is truncated: its header describes \d+ bytes of tensor data but the "
                         r"file holds \d+"),
    (lambda n: 100, r"is truncated: its first 8 bytes announce a \d+-byte header but the file "
                    "has 100 bytes"),
    (lambda n: 3, "is truncated or not a safetensors file: it has 3 bytes"),
    (lambda n: 0, "is truncated or not a safetensors file: it has 0 bytes"),
])
def test_truncated_file_message(tmp_path, keep, message):
    folder = make_tiny_llama(tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    with pytest.raises(WeightsError, match=f"{path}.*{message}.*re-download"):
        load(folder)


@pytest.mark.parametrize("content, message", [
    (b"\xff" * 64, "not a safetensors file"),
    ((5).to_bytes(8, "little") + b"{bad}", "corrupt header"),
    ((2).to_bytes(8, "little") + b"[]", "corrupt header: the header is not a JSON object"),
    (lambda: _header({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
     r"tensor x \(F32, shape \(3,\)\) should take 12 bytes, its offsets give 8"),
    (lambda: _header({"x": {"dtype": "F32", "shape": "3"}}), "bad header entry for tensor x"),
    (lambda: _header({"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}),
     "bad header entry for tensor x"),
])
def test_corrupt_file_message(tmp_path, content, message):
    folder = make_tiny_llama(tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(content() if callable(content) else content)
    with pytest.raises(WeightsError, match=f"{path}.*{message}"):
        load(folder)


def _header(header):
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * 64


def test_save_weights_round_trip_and_transformers_reads_it(tmp_path):
    source = tiny_llama(dtype="bfloat16", tie_word_embeddings=True)
    config = LlamaConfig.from_file(source)
    weights = load(source)
    out = tmp_path / "copy"
    out.mkdir()
    save_weights(weights, out / "model.safetensors")
    config.save(out)
    header, _, metadata = read_safetensors_header(out / "model.safetensors")
    assert "lm_head.weight" not in header and metadata == {"format": "pt"}
    assert {entry["dtype"] for entry in header.values()} == {"F32"}
    assert not list(out.glob(".*tmp*"))  # the temporary file was renamed into place
    again = load(out)
    for name, w in weights.items():
        np.testing.assert_array_equal(again[name], w, err_msg=name)
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        np.testing.assert_array_equal(load_reference(out)(ids).logits.numpy(),
                                      load_reference(source)(ids).logits.numpy())
