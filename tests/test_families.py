"""StableLM, Phi-3, Qwen2 and GPT-2 against transformers, on random tiny configs, on both engines.

Each example builds a tiny transformers model of the family (tests/family_models.py: seeded
weights, biases around 0.1 so a forgotten bias shows), saves it with save_pretrained, loads the
folder with npllm on each engine and compares the logits of the same ids. Tolerance: 1e-4
absolute on O(1) logits, as tests/test_forward.py justifies for Llama (two float32
implementations of at most 2 layers differ by summation order, ~1e-6; a wrong norm, bias,
rotary width or layout moves logits by 1e-2 or more, which the negative controls check).
Example counts are small: building a transformers model takes a fraction of a second.
"""
import json
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import npllm
from family_models import build_model, family_settings, make_tiny_family
from npllm.errors import ConfigError
from npllm.inspect import config_summary, parameter_counts
from npllm.model import Model
from npllm.model.family_config import SUPPORTED, config_from_dict
from tolerances import absolute, assert_within_terms, product_terms

# Absolute, and not at risk where a logit cancels: the tiny models' logits are sums of terms of
# order 1 (tests/family_models.py), so 1e-4 is ~100s of ulps of any term.
ATOL = 1e-4
ENGINES = ("reference", "numba")
FAMILIES = ("stablelm", "phi3", "qwen2", "gpt2")


@st.composite
def tiny_configs(draw, model_type):
    """Family settings: widths, heads, KV heads, rotary fractions, bias and tying flags."""
    H = draw(st.sampled_from([1, 2, 4]))
    K = H if model_type == "gpt2" else draw(st.sampled_from([k for k in (1, 2, 4) if H % k == 0]))
    Dh = draw(st.sampled_from([4, 8]))
    rotary = draw(st.sampled_from([f for f in (0.25, 0.5, 1.0) if int(Dh * f) % 2 == 0
                                   and int(Dh * f) > 0]))
    return dict(D=H * Dh, H=H, K=K, L=draw(st.integers(1, 2)), F=draw(st.integers(4, 40)),
                V=draw(st.integers(16, 80)), rotary=rotary, bias=draw(st.booleans()),
                parallel=draw(st.booleans()), tied=draw(st.booleans()))


def logits_of(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits.numpy()


def check_family(model_type, kwargs, seed):
    with tempfile.TemporaryDirectory() as tmp:
        path, ref = make_tiny_family(tmp, model_type, seed=seed, **kwargs)
        V = ref.config.vocab_size
        ids = np.random.default_rng(seed).integers(0, V, size=(2, 9))
        want = logits_of(ref, ids)
        for engine in ENGINES:
            model = npllm.load(tmp, engine=engine)
            np.testing.assert_allclose(model(ids), want, atol=ATOL, rtol=0, err_msg=engine)
            cache = model.new_cache(batch_size=2, capacity=2)  # small: it must grow
            steps = [model(ids[:, :4], cache=cache)]
            steps += [model(ids[:, t:t + 1], cache=cache) for t in range(4, 9)]
            np.testing.assert_allclose(np.concatenate(steps, axis=1), want, atol=ATOL, rtol=0,
                                       err_msg=f"{engine}, KV cache")


@pytest.mark.parametrize("model_type", FAMILIES)
@settings(max_examples=6, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_logits_and_cache_equal_transformers(model_type, data, seed):
    check_family(model_type, data.draw(tiny_configs(model_type)), seed)


# ---- negative controls: a wrong variant must fail the same comparison ----------------------

def wrong_variant(model_type, weights, config):
    """The same model with one family difference undone."""
    from dataclasses import replace
    w = dict(weights)
    if model_type == "stablelm":  # RoPE on every coordinate instead of the first rotary_dim
        return w, replace(config, rotary_dim=config.head_dim)
    if model_type == "phi3":  # gate_up_proj read as [up; gate]
        for name in [n for n in w if n.endswith("gate_up_proj.weight")]:
            gate, up = np.split(w[name], 2)
            w[name] = np.concatenate([up, gate])
        return w, config
    if model_type == "qwen2":  # the q, k, v biases forgotten
        return {n: a for n, a in w.items() if not n.endswith("_proj.bias")}, config
    for name in [n for n in w if n.endswith("attn.c_proj.weight")]:  # GPT-2: Conv1D not turned
        w[name] = w[name].T
    return w, config


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("engine", ENGINES)
def test_negative_control(model_type, engine, tmp_path):
    path, ref = make_tiny_family(tmp_path, model_type, rotary=0.5, bias=True, seed=1)
    model = npllm.load(str(path), engine=engine)
    ids = np.arange(12).reshape(2, 6) % ref.config.vocab_size
    want = logits_of(ref, ids)
    np.testing.assert_allclose(model(ids), want, atol=ATOL, rtol=0)
    weights, config = wrong_variant(model_type, model.weights, model.config)
    wrong = Model(config, weights, engine=engine)(ids)
    assert np.abs(wrong - want).max() > 1e-2


# ---- configs and parameter counts ---------------------------------------------------------

def test_unsupported_family_gets_one_line_naming_the_supported():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model_type": "falcon", "hidden_size": 8})
    message = str(e.value)
    assert "\n" not in message and "'falcon'" in message
    assert all(family in message for family in SUPPORTED)


@pytest.mark.parametrize("key, value", [("qk_layernorm", True)])
def test_stablelm_refuses_what_it_does_not_implement(key, value):
    with pytest.raises(ConfigError, match=key):
        config_from_dict({"model_type": "stablelm", key: value})


def test_phi3_refuses_rope_scaling():
    d = {"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                                "long_factor": [1.0]}}
    with pytest.raises(ConfigError, match="longrope"):
        config_from_dict(d)


SHIPPED = {"stablelm-3b-4e1t": 2_795_443_200, "phi-3-mini-4k-instruct": 3_821_079_552,
           "gpt2": 124_439_808, "smollm2-135m-instruct": 134_515_008}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_count_as_transformers(name):
    """The shipped config's total, from npllm's shapes and from the formulas, equals
    transformers' num_parameters() of the model built from it (on the meta device: no memory)."""
    import transformers
    from npllm.cli.inspect import shipped_config

    d = json.loads(shipped_config(name).read_text())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**d))
    config = config_from_dict(d)
    assert hf.num_parameters() == config_summary(config).total == parameter_counts(config)[
        "total"]


@pytest.mark.parametrize("name, hub_id", [("stablelm-3b-4e1t", "stabilityai/stablelm-3b-4e1t"),
                                          ("phi-3-mini-4k-instruct",
                                           "microsoft/Phi-3-mini-4k-instruct"),
                                          ("gpt2", "gpt2")])
def test_cli_inspect_config_prints_the_exact_total(name, hub_id):
    expected = SHIPPED[name]
    out = subprocess.run([sys.executable, "-m", "npllm", "inspect", "--config", hub_id],
                         capture_output=True, text=True, check=True).stdout
    assert f"{expected:,}  100.0%" in out  # the total line of the parameter table


@pytest.mark.parametrize("model_type", FAMILIES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_counting_formulas_equal_num_parameters(model_type, data):
    """equations.counting (through inspect.parameter_counts) on tiny models of every family,
    with and without biases, tying and parallel residuals."""
    import transformers
    from family_models import FAMILY_CLASSES

    settings_ = family_settings(model_type, **data.draw(tiny_configs(model_type)))
    config_class, model_class = FAMILY_CLASSES[model_type]
    hf_config = getattr(transformers, config_class)(**settings_)
    with torch.device("meta"):
        hf = getattr(transformers, model_class)(hf_config)
    d = hf_config.to_dict()
    assert parameter_counts(config_from_dict(d))["total"] == hf.num_parameters()


def test_conv1d_to_linear_turns_gpt2_matrices():
    """x @ W.T + b with the turned matrix equals GPT-2's Conv1D on the same x."""
    from transformers.pytorch_utils import Conv1D

    from npllm.equations import linear
    from npllm.model.weights import conv1d_to_linear

    conv = Conv1D(12, 5)
    rng = np.random.default_rng(0)  # seeded: torch's global generator would differ each run
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(rng.standard_normal((5, 12)).astype(np.float32)))
        conv.bias.copy_(torch.from_numpy(rng.standard_normal(12).astype(np.float32)))
    x = rng.standard_normal((3, 5)).astype(np.float32)
    name = "transformer.h.0.attn.c_attn."
    turned = conv1d_to_linear({name + "weight": conv.weight.detach().numpy(),
                               name + "bias": conv.bias.detach().numpy()})
    with torch.no_grad():
        want = conv.double()(torch.from_numpy(x).double()).numpy()
    # Sums of 5 products and a bias, which may cancel: gamma_6 < 7 u of the terms (Higham 3.1).
    terms = product_terms(x, turned[name + "weight"].T) + absolute(turned[name + "bias"])
    assert_within_terms(linear(x, turned[name + "weight"], turned[name + "bias"]), want, terms,
                        ulps=7, rtol=0)


def test_build_model_is_the_family():
    assert type(build_model("gpt2", family_settings("gpt2"))).__name__ == "GPT2LMHeadModel"


GGUF_VARIANTS = {"stablelm": dict(rotary=0.5, bias=True, parallel=True),
                 "phi3": dict(rotary=0.5), "qwen2": dict(tied=True), "gpt2": {}}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gguf_import_equals_transformers(model_type, tmp_path):
    """A tiny model written as GGUF the way llama.cpp's converter names and lays it out,
    imported by npllm, gives transformers' logits on both engines."""
    from family_models import write_gguf
    from npllm.model.gguf import convert_gguf

    _, ref = make_tiny_family(tmp_path / "hf", model_type, seed=2, **GGUF_VARIANTS[model_type])
    path = write_gguf(tmp_path / "tiny.gguf", ref, model_type)
    folder = convert_gguf(path, tmp_path / "imported", progress=False)
    ids = np.arange(14).reshape(2, 7) % ref.config.vocab_size
    want = logits_of(ref, ids)
    for engine in ENGINES:
        np.testing.assert_allclose(npllm.load(str(folder), engine=engine)(ids), want,
                                   atol=ATOL, rtol=0, err_msg=engine)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_numba_engine_equals_the_reference_on_padding_targets_and_kept(model_type, tmp_path):
    """The family Numba engine (kernels, log-probs without the logits, padding skipped) gives
    the reference engine's numbers for padded batches, targets and logits_to_keep."""
    path, ref = make_tiny_family(tmp_path, model_type, rotary=0.5, bias=True, seed=3)
    fast, slow = (npllm.load(str(path), engine=e) for e in ("numba", "reference"))
    assert "npllm.engine.generic" in repr(fast.engine)
    assert f"npllm.model.{model_type}.forward" in repr(slow.engine)
    rng = np.random.default_rng(3)
    V = ref.config.vocab_size
    ids = rng.integers(0, V, size=(3, 8))
    mask = np.ones((3, 8), np.int64)
    mask[1, :3] = 0  # left padding
    targets = rng.integers(0, V, size=(3, 5))
    # float32 sums in another order (BLAS blocks, the kernels' softmax): 1e-4 as for logits.
    for kwargs in (dict(attention_mask=mask), dict(targets=targets, logits_to_keep=5),
                   dict(targets=targets, logits_to_keep=5, attention_mask=mask)):
        np.testing.assert_allclose(fast(ids, **kwargs), slow(ids, **kwargs), atol=ATOL, rtol=0,
                                   err_msg=str(list(kwargs)))


def test_load_refuses_an_unsupported_family_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "hidden_size": 8}))
    with pytest.raises(ConfigError) as e:
        npllm.load(str(tmp_path))
    assert "'falcon' is not supported" in str(e.value) and "\n" not in str(e.value)
    assert all(family in str(e.value) for family in SUPPORTED)


@pytest.mark.parametrize("model_type", ["gpt2", "stablelm"])
def test_lecture_000_answers_on_a_loaded_family_model(model_type, tmp_path):
    from npllm.inspect import lecture_000, parameter_summary

    path, ref = make_tiny_family(tmp_path, model_type, tied=False)
    model = npllm.load(str(path))
    answers = lecture_000(model, [1, 2, 3])  # no tokenizer in the tiny folder: token ids
    assert answers.attention_shapes and answers.mlp_shapes
    assert answers.tied == (model_type == "gpt2")
    assert answers.last_hidden_state_shape == (1, 3, ref.config.hidden_size)
    assert parameter_summary(model).total == ref.num_parameters() == model.num_parameters()


def test_gpt2_in_the_hubs_layout_loads(tmp_path):
    """The Hub's gpt2 files name tensors without the "transformer." prefix and keep the causal
    mask buffers (h.N.attn.bias): npllm adds the prefix and ignores the buffers."""
    from safetensors.numpy import load_file, save_file

    path, ref = make_tiny_family(tmp_path, "gpt2", seed=4)
    tensors = {name.removeprefix("transformer."): w
               for name, w in load_file(str(path / "model.safetensors")).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    ids = np.arange(10).reshape(2, 5)
    np.testing.assert_allclose(npllm.load(str(path))(ids), logits_of(ref, ids), atol=ATOL, rtol=0)


def test_cli_inspect_config_json_and_errors(tmp_path):
    run = [sys.executable, "-m", "npllm", "inspect", "--config"]
    out = json.loads(subprocess.run(run + ["gpt2", "--json"], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["total"] == SHIPPED["gpt2"] and out["config"]["model_type"] == "gpt2"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    for bad in (str(tmp_path), "no-such-model"):
        result = subprocess.run(run + [bad], capture_output=True, text=True)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
