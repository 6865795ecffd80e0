"""config.json -> LlamaConfig: HF's defaults, both RoPE forms, validation messages."""
import dataclasses
import json

import pytest
import transformers

from npllm.errors import ConfigError, NpllmError
from npllm.model.config import LlamaConfig

# SmolLM2-135M-Instruct's config.json (the fields that matter), transformers 4.x form.
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
    "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pad_token_id": 2, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 49152,
}
SIZES = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=4)


def with_(base, **changes):
    d = dict(base)
    for key, value in changes.items():
        if value is ...:
            d.pop(key, None)
        else:
            d[key] = value
    return d


def test_smollm2_config():
    c = LlamaConfig.from_dict(SMOLLM2)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (
        49152, 576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.num_key_value_groups == 3
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 100000.0 and isinstance(c.rope_theta, float)
    assert c.tie_word_embeddings is True and c.max_position_embeddings == 8192
    assert (c.bos_token_id, c.eos_token_id, c.model_type, c.hidden_act) == (1, 2, "llama", "silu")
    assert c.sliding_window is None and c.context_length == 8192


def test_defaults_are_transformers_defaults():
    """Keys left out get exactly what transformers' LlamaConfig fills in."""
    c = LlamaConfig.from_dict(SIZES)
    hf = transformers.LlamaConfig(**{k: v for k, v in SIZES.items() if k != "model_type"})
    for name in ("num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act"):
        assert getattr(c, name) == getattr(hf, name), name
    assert c.rope_theta == hf.rope_parameters["rope_theta"] == 10000.0
    assert c.num_key_value_heads == 4 and c.head_dim == 16


def test_rope_parameters_form():
    d = with_(SMOLLM2, rope_theta=..., rope_scaling=...,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert LlamaConfig.from_dict(d).rope_theta == 500000.0
    # transformers 5 priority: rope_parameters' theta wins over a top-level rope_theta.
    d["rope_theta"] = 1.0
    assert LlamaConfig.from_dict(d).rope_theta == 500000.0
    # rope_parameters without a theta: the top-level one, then the default.
    assert LlamaConfig.from_dict(with_(SIZES, rope_theta=7.0,
                                       rope_parameters={"rope_type": "default"})).rope_theta == 7.0
    assert LlamaConfig.from_dict(with_(SIZES, rope_parameters={})).rope_theta == 10000.0


def test_config_saved_by_transformers_5_reads_back(tmp_path):
    hf = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, rope_theta=123.0, rms_norm_eps=1e-5,
                                  tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    c = LlamaConfig.from_file(tmp_path)  # a folder or the file itself
    assert c == LlamaConfig.from_file(tmp_path / "config.json")
    assert (c.rope_theta, c.rms_norm_eps, c.num_key_value_heads, c.tie_word_embeddings) == (
        123.0, 1e-5, 2, True)


@pytest.mark.parametrize("rope_type", ["llama3", "linear", "dynamic", "yarn"])
def test_rope_scaling_is_refused(rope_type):
    for key in ("rope_parameters", "rope_scaling"):
        d = with_(SMOLLM2, **{key: {"rope_type": rope_type, "factor": 8.0}})
        with pytest.raises(ConfigError, match=f"rope_type '{rope_type}' is not supported.*"
                                              "original RoPE only"):
            LlamaConfig.from_dict(d)
    with pytest.raises(ConfigError, match="rope_type 'linear' is not supported"):  # old "type" key
        LlamaConfig.from_dict(with_(SMOLLM2, rope_scaling={"type": "linear", "factor": 2.0}))


def test_head_dim_given_or_derived():
    assert LlamaConfig.from_dict(SIZES).head_dim == 16
    assert LlamaConfig.from_dict(with_(SIZES, head_dim=None)).head_dim == 16
    c = LlamaConfig.from_dict(with_(SIZES, head_dim=32))  # Dh * H != D is allowed (as in HF)
    assert c.head_dim == 32 and c.hidden_size == 64


def test_num_key_value_heads_default():
    assert LlamaConfig.from_dict(SIZES).num_key_value_heads == 4
    assert LlamaConfig.from_dict(with_(SIZES, num_key_value_heads=None)).num_key_value_heads == 4
    assert LlamaConfig.from_dict(with_(SIZES, num_key_value_heads=1)).num_key_value_groups == 4


def test_mistral():
    d = with_(SIZES, model_type="mistral", num_key_value_heads=2, max_position_embeddings=32768,
              sliding_window=4096)
    c = LlamaConfig.from_dict(d)
    assert c.model_type == "mistral" and c.sliding_window == 4096
    assert c.context_length == 4096  # full causal attention = sliding window up to 4096 tokens
    # Mistral's own defaults: 8 KV heads, sliding window 4096, 131072 positions.
    sizes = with_(SIZES, num_attention_heads=16)
    hf = transformers.MistralConfig(**{k: v for k, v in sizes.items() if k != "model_type"})
    c = LlamaConfig.from_dict(with_(sizes, model_type="mistral"))
    assert (c.num_key_value_heads, c.sliding_window, c.max_position_embeddings) == (
        hf.num_key_value_heads, hf.sliding_window, hf.max_position_embeddings) == (8, 4096, 131072)
    assert LlamaConfig.from_dict(with_(d, sliding_window=None)).context_length == 32768


def test_llama_ignores_sliding_window_key():
    assert LlamaConfig.from_dict(with_(SIZES, sliding_window=16)).sliding_window is None


def test_unknown_model_type_message():
    with pytest.raises(ConfigError) as info:
        LlamaConfig.from_dict(with_(SMOLLM2, model_type="qwen2"))
    message = str(info.value)
    assert "'qwen2' is not supported" in message and "'llama'" in message and "'mistral'" in message
    assert isinstance(info.value, NpllmError)
    with pytest.raises(ConfigError, match="no model_type.*llama, mistral"):
        LlamaConfig.from_dict(with_(SMOLLM2, model_type=...))


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported.*SiLU"),
    (dict(num_key_value_heads=4), r"num_attention_heads \(9\) must be a multiple of "
                                  r"num_key_value_heads \(4\)"),
    (dict(hidden_size=577), r"hidden_size \(577\) must be a multiple of num_attention_heads \(9\)"),
    (dict(head_dim=63), r"head_dim \(63\) must be even"),
    (dict(rms_norm_eps=0), "rms_norm_eps must be a positive number, got 0"),
    (dict(rope_theta=-1.0), "rope_theta must be a positive number"),
    (dict(vocab_size=...), "lacks vocab_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer, got 0"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers must be a positive integer, got 2.5"),
    (dict(attention_bias=True), "attention_bias: true is not supported"),
    (dict(mlp_bias=True), "mlp_bias: true is not supported"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    (dict(eos_token_id="</s>"), "eos_token_id must be a token id"),
    (dict(rope_parameters="default"), "rope_parameters must be an object"),
])
def test_invalid_configs_say_what_is_wrong(changes, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_dict(with_(SMOLLM2, **changes))


def test_swish_is_silu_and_eos_list():
    c = LlamaConfig.from_dict(with_(SMOLLM2, hidden_act="swish", eos_token_id=[2, 0]))
    assert c.hidden_act == "swish" and c.eos_token_id == (2, 0)
    assert c.to_dict()["eos_token_id"] == [2, 0]
    hash(c)  # frozen and hashable: usable as a cache key


def test_to_dict_round_trip_and_transformers_reads_it(tmp_path):
    for d in (SMOLLM2, with_(SIZES, model_type="mistral", num_key_value_heads=1, head_dim=32,
                             eos_token_id=[2, 3])):
        c = LlamaConfig.from_dict(d)
        assert LlamaConfig.from_dict(c.to_dict()) == c
        c.save(tmp_path)
        hf = transformers.AutoConfig.from_pretrained(tmp_path)
        assert hf.model_type == c.model_type
        assert hf.rope_parameters["rope_theta"] == c.rope_theta
        assert (hf.head_dim, hf.num_key_value_heads, hf.rms_norm_eps) == (
            c.head_dim, c.num_key_value_heads, c.rms_norm_eps)
        assert LlamaConfig.from_dict(hf.to_dict()) == c


def test_replace_revalidates():
    c = LlamaConfig.from_dict(SMOLLM2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rope_theta = 1.0
    assert dataclasses.replace(c, rope_theta=1).rope_theta == 1.0
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        dataclasses.replace(c, num_key_value_heads=2)


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'} not found.*save_pretrained"):
        LlamaConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON.*re-download"):
        LlamaConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(with_(SMOLLM2, model_type="gpt2")))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'gpt2' is not supported"):
        LlamaConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        LlamaConfig.from_file(tmp_path)
