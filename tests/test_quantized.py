"""Decoding from the stored GGUF blocks: the kernels, the packed file, and the forward pass.

Three claims, each tested on its own:

1. the kernels of ``npllm.kernels.quantized`` compute ``dequantize(blocks) @ x`` with weights
   that are *exactly* ``gguf.quants.dequantize``'s (a product with a one-hot x gives the weight
   itself, bit for bit) and sums within float32's worst-case rounding bound (hypothesis, random
   blocks, both drivers, one input or several);
2. the import writes the blocks of every Q4_1 / Q8_0 matrix, rows in the HF order, and they
   dequantize to exactly the float32 tensors of model.safetensors (tiny GGUF files, and every
   tensor of the real default model);
3. decoding with packed weights equals decoding with the float32 weights up to float32
   rounding (the bound of tests/test_default_model.py), with the same greedy tokens; folders
   without the packed file decode as before.

The kernels are called explicitly (and the forward pass on a Numba engine where packed weights
are meant to be used), so this file means the same under NPLLM_ENGINE=reference.
"""
import json
import platform
import re
import shutil
import time
from unittest import mock

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given, strategies as st

import npllm
from npllm.kernels import quantized as Q
from npllm.model import hub
from npllm.model.gguf import convert_gguf
from npllm.engine import NumbaEngine
from npllm.engine.packed import PackedWeight, load_packed
from npllm.model import Model
from npllm.model.weights import PACKED_FILE, read_safetensors_header
from test_gguf import write_tiny_gguf
from tiny_models import make_tiny_llama
from tolerances import U32 as U  # float32's unit roundoff, 2^-24

TYPES = ("Q4_1", "Q8_0")
seeds = st.integers(0, 2**32 - 1)


# --- random blocks ----------------------------------------------------------------------------

def random_halves(rng, shape):
    """Finite float16 scales: normal ones over many magnitudes, some subnormal, zero, negative."""
    h = (rng.standard_normal(shape) * 10.0 ** rng.integers(-5, 2, shape)).astype(np.float16)
    special = rng.random(shape)
    h[special < 0.05] = np.float16(0)
    h[(special >= 0.05) & (special < 0.1)] = np.float16(3e-7)  # subnormal in float16
    assert np.isfinite(h).all()
    return h


def random_blocks(rng, ggml_type, N, n_blocks):
    """uint8 [N, n_blocks * bytes per block]: random quants, finite random f16 scales."""
    size = Q.BLOCK_BYTES[ggml_type]
    blocks = rng.integers(0, 256, (N, n_blocks, size), dtype=np.uint8)
    blocks[:, :, 0:2] = random_halves(rng, (N, n_blocks, 1)).view(np.uint8)  # d
    if ggml_type == "Q4_1":
        blocks[:, :, 2:4] = random_halves(rng, (N, n_blocks, 1)).view(np.uint8)  # m
    return blocks.reshape(N, n_blocks * size)


def reference(blocks, ggml_type):
    """W [N, D] by the gguf package: the numbers npllm's float32 weights are made of."""
    w = gguf_dequantize(blocks, GGMLQuantizationType[ggml_type])
    return np.asarray(w, np.float32).reshape(blocks.shape[0], -1)


def force(driver):
    """Make the kernels run their serial or their parallel loop whatever the size."""
    return mock.patch.object(Q, "SERIAL_MATVEC_BELOW", 2**62 if driver == "serial" else 0)


# --- 1. the kernels ---------------------------------------------------------------------------

@given(seed=seeds, ggml_type=st.sampled_from(TYPES), N=st.integers(1, 41),
       n_blocks=st.integers(1, 24), n=st.sampled_from([None, 1, 2, 3, 5]),
       driver=st.sampled_from(["serial", "parallel"]))
def test_kernel_equals_dequantize_then_product(seed, ggml_type, N, n_blocks, n, driver):
    """y = x W^T within float32's worst-case rounding bound for this order of summation.

    Each output is 32 lanes, each lane a running sum of D / 32 terms w x, one fused multiply-add
    (one rounding) per term; then the lanes are added in a tree of depth 5. So every product
    w_k x_k enters the result multiplied by (1 + e_k) with |e_k| <= gamma(D / 32 + 5), where
    gamma(k) = k u / (1 - k u) and u = 2^-24 (Higham, Accuracy and Stability, 3.1). Hence
    |y - exact| <= gamma(D / 32 + 5) * sum_k |w_k x_k|, the exact value computed in float64 from
    the same float32 weights. (That is 1.7e-6 of sum |w x| for D = 768: a wrong nibble, sign or
    scale moves y by far more; the exact test below checks the weights themselves.)
    """
    rng = np.random.default_rng(seed)
    blocks = random_blocks(rng, ggml_type, N, n_blocks)
    D = 32 * n_blocks
    x = rng.standard_normal((D,) if n is None else (n, D)).astype(np.float32)
    with force(driver):
        y = Q.matvec(blocks, ggml_type, x)
    W = reference(blocks, ggml_type).astype(np.float64)
    assert y.dtype == np.float32 and y.shape == x.shape[:-1] + (N,)
    exact = x.astype(np.float64) @ W.T
    k = n_blocks + 5
    bound = k * U / (1 - k * U) * (np.abs(x.astype(np.float64)) @ np.abs(W).T)
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) - bound)


@given(seed=seeds, ggml_type=st.sampled_from(TYPES), N=st.integers(1, 21),
       n_blocks=st.integers(1, 6), driver=st.sampled_from(["serial", "parallel"]))
def test_kernel_weights_are_bit_identical_to_gguf(seed, ggml_type, N, n_blocks, driver):
    """x = the unit vectors e_k: every term but one is w * 0 = 0 and the one left is w * 1, so
    the product is the weight itself, whatever the order of the sums: the weights the kernel
    computes with equal gguf.quants.dequantize's bit for bit (a fused multiply-add in
    d * q + m, or a wrong nibble, would show). Rows of I [D, D] at once (several inputs) and one
    at a time (one input)."""
    rng = np.random.default_rng(seed)
    blocks = random_blocks(rng, ggml_type, N, n_blocks)
    W = reference(blocks, ggml_type)
    D = W.shape[1]
    identity = np.eye(D, dtype=np.float32)
    with force(driver):
        np.testing.assert_array_equal(Q.matvec(blocks, ggml_type, identity), W.T)
        np.testing.assert_array_equal(Q.matvec(blocks, ggml_type, identity[:3]), W.T[:3])
        for k in rng.choice(D, size=min(D, 4), replace=False):
            np.testing.assert_array_equal(Q.matvec(blocks, ggml_type, identity[k]), W[:, k])


@given(seed=seeds, ggml_type=st.sampled_from(TYPES), N=st.integers(1, 40),
       n=st.integers(1, 5))
def test_serial_and_parallel_drivers_agree_exactly(seed, ggml_type, N, n):
    """Same tasks, same order of additions within each output: the same bits."""
    rng = np.random.default_rng(seed)
    blocks = random_blocks(rng, ggml_type, N, 3)
    x = rng.standard_normal((n, 96)).astype(np.float32)
    with force("serial"):
        serial = Q.matvec(blocks, ggml_type, x)
    with force("parallel"):
        parallel = Q.matvec(blocks, ggml_type, x)
    np.testing.assert_array_equal(serial, parallel)


def test_half_to_float32_both_ways_on_every_float16():
    """Both conversions of a float16 scale (one instruction where the CPU has it, the bits
    otherwise) against NumPy's, on all 65,536 bit patterns (NaNs compared as NaN)."""
    import numba

    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    expected = bits.view(np.float16).astype(np.float32)

    def convert(half):
        @numba.njit
        def run(bits, out):
            for i in range(bits.shape[0]):
                out[i] = half(bits[i])
        out = np.empty(bits.shape, np.float32)
        run(bits, out)
        return out

    conversions = [Q._half_to_float32_bits]
    if Q._has_half_instructions():
        conversions.append(Q._half_to_float32_hardware)
    for half in conversions:
        got = convert(half)
        finite = ~np.isnan(expected)
        np.testing.assert_array_equal(got[finite].view(np.uint32),
                                      expected[finite].view(np.uint32))
        assert np.isnan(got[~finite]).all()


def test_q4_1_weight_rounds_as_gguf_for_every_scale():
    """The kernel makes a Q4_1 weight d q + m with one fused multiply-add; gguf rounds the
    product, then the sum. Equal because d q is exact in float32 (see _q4_1_weight): checked
    here for every finite float16 d, every q and 32 values of m (random and extreme ones)."""
    import numba

    d = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    d = d[np.isfinite(d)].astype(np.float32)
    q = np.arange(16, dtype=np.float32)
    rng = np.random.default_rng(0)
    m = np.concatenate([random_halves(rng, 26), np.float16([65504, -65504, 6e-8, -6e-8, 1, -1])])

    @numba.njit
    def fused(d, q, m, out):
        for i in range(d.shape[0]):
            for j in range(q.shape[0]):
                out[i, j] = Q._q4_1_weight(d[i], q[j], m)

    out = np.empty((d.size, 16), np.float32)
    for m_value in m.astype(np.float32):
        fused(d, q, m_value, out)
        two_steps = (d[:, None] * q[None, :]) + m_value  # float32, as gguf.quants computes it
        np.testing.assert_array_equal(out, two_steps)


def test_readable_dequantize_is_gguf():
    rng = np.random.default_rng(0)
    for ggml_type in TYPES:
        blocks = random_blocks(rng, ggml_type, 5, 3)
        np.testing.assert_array_equal(Q.dequantize(blocks, ggml_type), reference(blocks, ggml_type))
        assert Q.dequantize(blocks, ggml_type).shape == (5, 96)


def test_argument_checks():
    blocks = random_blocks(np.random.default_rng(0), "Q4_1", 4, 2)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 64\]"):
        Q.q4_1_matvec(blocks, np.ones(65, np.float32))
    with pytest.raises(ValueError, match="uint8 array"):
        Q.q4_1_matvec(blocks.astype(np.int16), np.ones(64, np.float32))
    with pytest.raises(ValueError, match="bytes left over"):
        Q.q8_0_matvec(blocks, np.ones(64, np.float32))  # 40 bytes are not whole Q8_0 blocks
    # A non-contiguous or oddly placed array is copied, not misread.
    wide = np.zeros((4, 41), np.uint8)
    wide[:, 1:] = blocks
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    np.testing.assert_array_equal(Q.q4_1_matvec(wide[:, 1:], x), Q.q4_1_matvec(blocks, x))
    assert Q.q4_1_matvec(blocks, np.ones((2, 0, 64), np.float32)).shape == (2, 0, 4)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 assembly")
def test_inner_loops_are_vectorised():
    """A guard on speed, not on numbers: LLVM turned the lane loops into packed SIMD
    multiply-adds (if a change made it unroll them into scalar code instead, decoding would be
    several times slower while every other test still passed)."""
    import numba

    for ggml_type, drivers in Q._DRIVERS.items():
        blocks = random_blocks(np.random.default_rng(0), ggml_type, 4, 2)
        for driver, n in zip(drivers, (1, 3)):
            fresh = numba.njit(fastmath=False, error_model="numpy")(driver.py_func)  # not cached
            fresh(blocks, np.ones((n, 64), np.float32), np.empty((n, 4), np.float32))
            asm = fresh.inspect_asm(fresh.signatures[0])
            assert re.search(r"vfmadd\d+ps\s+[^\n]*%[yz]mm", asm), (ggml_type, n)


# --- 2. the packed file -----------------------------------------------------------------------

Q4_1, Q8_0, F16 = (GGMLQuantizationType[t] for t in ("Q4_1", "Q8_0", "F16"))
# GGUF name suffix -> type, first match wins ("attn_output.weight" before "output.weight").
QTYPES = {"attn_q.weight": Q8_0, "attn_k.weight": Q4_1, "attn_v.weight": Q4_1,
          "attn_output.weight": Q4_1, "ffn_gate.weight": Q4_1, "ffn_up.weight": Q4_1,
          "ffn_down.weight": Q4_1, "token_embd.weight": Q8_0, "output.weight": Q8_0,
          "norm.weight": F16}


@pytest.fixture(scope="module")
def tiny_packed(tmp_path_factory):
    """A tiny untied GQA model (H=4, K=2: the q and k rows are permuted differently) written as
    a quantized GGUF the way llama.cpp writes one, then imported."""
    root = tmp_path_factory.mktemp("tiny-packed")
    hf = make_tiny_llama(root / "hf", num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    path = write_tiny_gguf(root / "q.gguf", hf, qtypes=QTYPES)
    return convert_gguf(path, root / "out", progress=False)


def test_packed_file_dequantizes_to_the_float32_weights(tiny_packed):
    from safetensors.numpy import load_file

    floats = load_file(tiny_packed / "model.safetensors")
    header, _, metadata = read_safetensors_header(tiny_packed / PACKED_FILE)
    types = json.loads(metadata["ggml_types"])
    assert metadata["format"] == "npllm-ggml-blocks" and metadata["source"] == "q.gguf"
    expected = {name for name in floats if name.endswith("_proj.weight")}
    expected |= {"model.embed_tokens.weight", "lm_head.weight"}
    assert set(header) == expected == set(types)
    for name, entry in header.items():
        assert entry["dtype"] == "U8"
        blocks = load_file(tiny_packed / PACKED_FILE)[name]
        np.testing.assert_array_equal(Q.dequantize(blocks, types[name]), floats[name],
                                      err_msg=name)
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q8_0"
    assert types["model.layers.0.mlp.up_proj.weight"] == "Q4_1"
    source = json.loads((tiny_packed / "npllm_source.json").read_text())
    assert source["packed"]["file"] == PACKED_FILE and source["packed"]["tensors"] == len(header)


def test_packed_file_order_lets_projections_fuse(tiny_packed):
    """Per layer q, k, v, o, gate, up, down one after another in the file: the forward pass
    multiplies q/k/v (when of one type) and gate/up in one call."""
    from npllm.model.config import LlamaConfig
    from npllm.engine.packed import stack_adjacent

    config = LlamaConfig.from_file(tiny_packed / "config.json")
    packed = load_packed(tiny_packed, config)
    p = "model.layers.1."
    mlp = [packed[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up")]
    ((stacked, which),) = stack_adjacent(mlp)
    assert which == [0, 1] and isinstance(stacked, PackedWeight) and stacked.shape == (256, 64)
    np.testing.assert_array_equal(stacked.dequantize(),
                                  np.concatenate([w.dequantize() for w in mlp]))
    # q is Q8_0 and k, v are Q4_1 here: q stays alone, k and v are fused.
    attention = [packed[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]
    assert sorted(which for _, which in stack_adjacent(attention)) == [[0], [1, 2]]


def test_float32_gguf_writes_no_packed_file(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf")
    out = convert_gguf(write_tiny_gguf(tmp_path / "f32.gguf", hf), tmp_path / "out",
                       progress=False)
    assert not (out / PACKED_FILE).exists()
    assert npllm.load(out, engine="numba").engine.packed == {}


def test_packed_file_is_never_read_as_float32_weights(tiny_packed, tmp_path):
    """Without model.safetensors or an index, load_weights takes every *.safetensors file of
    the folder (shards named freely), but never the packed one."""
    from npllm.model.weights import safetensors_files

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_packed, folder)
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    assert safetensors_files(folder) == [folder / "weights.safetensors"]
    model = npllm.load(folder, engine="numba")
    assert len(model.engine.packed) == 15 and model.weights["lm_head.weight"].dtype == np.float32


def test_load_packed_checks_the_file_against_the_model(tiny_packed, tmp_path):
    from npllm.errors import WeightsError
    from npllm.model.config import LlamaConfig

    config = LlamaConfig.from_file(tiny_packed / "config.json")
    packed = load_packed(tiny_packed, config)
    assert "lm_head.weight" in packed and "model.embed_tokens.weight" not in packed
    assert all(not w.blocks.flags.writeable and not w.blocks.flags.owndata
               for w in packed.values())  # read-only views of the memory map
    import dataclasses
    wider = dataclasses.replace(config, intermediate_size=2 * config.intermediate_size)
    with pytest.raises(WeightsError, match="mlp.gate_proj.weight .*expected U8"):
        load_packed(tiny_packed, wider)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_packed, broken)
    (broken / PACKED_FILE).write_bytes((tiny_packed / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match="not a packed-weights file"):
        load_packed(broken, config)


# --- 3. the forward pass ----------------------------------------------------------------------

def decode(model, ids, prompt=4):
    """Logits of a prompt, then of each further token fed alone through the cache."""
    cache = model.new_cache()
    parts = [model(ids[:prompt], cache=cache)]
    parts += [model(ids[t:t + 1], cache=cache) for t in range(prompt, len(ids))]
    return np.concatenate(parts)


def with_packed(model, packed):
    """The same model on a Numba engine decoding from ``packed`` ({}: the float32 weights)."""
    return Model(model.config, model.weights, model.tokenizer,
                 engine=NumbaEngine(model.config, model.weights, packed))


def count_packed_calls():
    calls = []
    real = PackedWeight.linear

    def counting(self, x, one_thread=False):
        calls.append(self.shape)
        return real(self, x, one_thread)
    return mock.patch.object(PackedWeight, "linear", counting), calls


def test_tiny_decoding_uses_the_packed_weights(tiny_packed):
    model = npllm.load(tiny_packed, engine="numba")
    assert len(model.engine.packed) == 2 * 7 + 1
    assert "decoding from 12 Q4_1, 3 Q8_0 matrices" in repr(model)
    ids = np.array([1, 5, 9, 200, 7, 42, 3, 17, 99, 100])
    patch, calls = count_packed_calls()
    with patch:
        packed = decode(model, ids)
        # 6 decoding steps x 2 layers x (q, k/v fused, o, gate/up fused, down), and the LM head
        assert len(calls) == 6 * (2 * 5 + 1)
        calls.clear()
        plain = decode(with_packed(model, {}), ids)
        prefill = model(ids)  # no cache: never packed
        assert calls == []
    # Float32 throughout a 2-layer model of width 64 with logits ~1: a few ulps apart.
    np.testing.assert_allclose(packed, plain, atol=1e-5, rtol=0)
    np.testing.assert_allclose(packed, prefill, atol=1e-5, rtol=0)
    assert np.abs(packed - plain).max() > 0  # the kernels did run (another order of sums)


def test_tiny_packed_can_be_switched_off(tiny_packed, monkeypatch):
    """At load: NPLLM_PACKED=0 or packed=False; the reference engine never reads blocks."""
    ids = np.array([1, 5, 9, 200, 7, 42])
    patch, calls = count_packed_calls()
    with patch:
        monkeypatch.setenv("NPLLM_PACKED", "0")
        off = decode(npllm.load(tiny_packed, engine="numba"), ids)
        assert calls == []
        monkeypatch.delenv("NPLLM_PACKED")
        decode(npllm.load(tiny_packed, engine="numba"), ids)
        assert calls
        calls.clear()
        decode(npllm.load(tiny_packed, engine="reference"), ids)
        without = npllm.load(tiny_packed, engine="numba", packed=False)
        assert without.engine.packed == {} and "GGUF blocks" not in repr(without)
        np.testing.assert_array_equal(decode(without, ids), off)
        assert calls == []


def test_tiny_scoring_while_decoding_with_packed_weights(tiny_packed):
    """``targets`` with the packed LM head: log P(target) of the one new position."""
    from npllm.equations import token_log_probs

    model = npllm.load(tiny_packed, engine="numba")
    cache = model.new_cache()
    model(np.array([1, 5, 9]), cache=cache)
    log_p = model(np.array([200]), cache=cache, targets=np.array([7]))
    cache2 = model.new_cache()
    model(np.array([1, 5, 9]), cache=cache2)
    logits = model(np.array([200]), cache=cache2)
    assert log_p.shape == (1,)
    np.testing.assert_allclose(log_p, token_log_probs(logits, np.array([7])), atol=1e-6)


def test_stale_cache_without_packed_file_is_imported_again(tmp_path, monkeypatch):
    """A cache folder imported by an older npllm (marker without "format", no packed file) is
    imported again, so users and CI get the packed weights."""
    monkeypatch.setenv("NPLLM_HOME", str(tmp_path / "home"))
    hf = make_tiny_llama(tmp_path / "hf")
    gguf_path = write_tiny_gguf(tmp_path / "q.gguf", hf,
                                qtypes={"ffn_up.weight": GGMLQuantizationType.Q4_1})
    folder = hub.import_gguf(gguf_path, verbose=False)
    assert (folder / PACKED_FILE).is_file()
    marker = json.loads((folder / hub.IMPORT_MARKER).read_text())
    assert marker["format"] == hub.IMPORT_FORMAT
    (folder / PACKED_FILE).unlink()  # as an older version left it
    (folder / hub.IMPORT_MARKER).write_text(json.dumps({"source": marker["source"],
                                                        "key": marker["key"]}))
    assert hub.import_gguf(gguf_path, verbose=False) == folder
    assert (folder / PACKED_FILE).is_file()
    assert json.loads((folder / hub.IMPORT_MARKER).read_text())["format"] == hub.IMPORT_FORMAT


# --- the real default model -------------------------------------------------------------------

@pytest.mark.real_model
@pytest.mark.parametrize("where", ["cache folder", "fresh conversion"])
def test_default_packed_tensors_equal_the_float32_tensors(default_model, converted_default_folder,
                                                         where):
    """Every packed matrix of the default model dequantizes to exactly the float32 tensor of
    model.safetensors (210 Q4_1 projections, and the Q8_0 embedding matrix as the tied LM head):
    in the folder users load, and as convert_gguf writes it now."""
    model = default_model if where == "cache folder" else npllm.load(converted_default_folder)
    packed, weights = default_packed(model), model.weights
    assert len(packed) == 30 * 7 + 1
    assert {w.ggml_type for w in packed.values()} == {"Q4_1", "Q8_0"}
    assert packed["lm_head.weight"].ggml_type == "Q8_0"
    for name, w in packed.items():
        np.testing.assert_array_equal(w.dequantize(), weights[name], err_msg=name)
    assert sum(w.nbytes for w in packed.values()) == 96_436_224  # against 538 MB of float32


@pytest.mark.real_model
def test_default_packed_file_as_converted(converted_default_folder):
    header, _, metadata = read_safetensors_header(converted_default_folder / PACKED_FILE)
    types = json.loads(metadata["ggml_types"])
    assert len(header) == 211 and types["model.embed_tokens.weight"] == "Q8_0"
    assert header["model.layers.0.self_attn.q_proj.weight"]["shape"] == [576, 360]
    assert header["model.embed_tokens.weight"]["shape"] == [49152, 612]
    offsets = [header[n]["data_offsets"] for n in header]
    order = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    layer = [f"model.layers.0.self_attn.{n}_proj.weight" for n in "qkvo"] + [
        f"model.layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    assert order[:7] == layer and order[-1] == "model.embed_tokens.weight"
    assert sorted(b for _, b in offsets) == sorted(a for a, _ in offsets)[1:] + [max(
        b for _, b in offsets)]  # no gaps


def default_packed(model):
    """The default model's packed matrices (whatever engine the suite runs on)."""
    return load_packed(model.folder, model.config, True)


@pytest.fixture(scope="module")
def chat_ids(default_model):
    chat = default_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True)
    return np.array(default_model.tokenizer.encode(chat))


@pytest.mark.real_model
def test_default_packed_decoding_equals_float32_decoding(default_model, hf_gguf_model,
                                                         hf_float64, chat_ids):
    """Packed and float32 decoding are two float32 approximations of the same exact logits
    (bit-identical weights, other orders of summation), so they may differ by twice float32's
    error, measured as in test_default_model.py::test_kv_cache_equals_full_recompute: torch's
    float32 forward pass against float64 on this text. A wrong weight (one block, one row)
    moves logits by far more: see the next test."""
    import torch

    with torch.no_grad():
        exact = hf_float64(torch.tensor(chat_ids)[None]).logits[0].numpy()
        theirs = hf_gguf_model(torch.tensor(chat_ids)[None]).logits[0].numpy()
    float32_error = np.abs(theirs - exact).max()
    assert 1e-6 < float32_error < 1e-4
    from npllm.kernels import decode as fused_kernel

    numba_model = with_packed(default_model, default_packed(default_model))

    patch, calls = count_packed_calls()
    layers = []
    real = fused_kernel.decode_layer
    with patch, mock.patch.object(fused_kernel, "decode_layer",
                                  lambda *a: layers.append(a[-2]) or real(*a)):
        packed = decode(numba_model, chat_ids, prompt=10)
    # Each step: 30 fused layers (q, k, v and gate, up lie together in the imported file), then
    # the packed LM head.
    assert len(layers) == (len(chat_ids) - 10) * 30 and len(calls) == len(chat_ids) - 10
    plain = decode(with_packed(numba_model, {}), chat_ids, prompt=10)
    np.testing.assert_allclose(packed, plain, atol=2 * float32_error, rtol=0)
    np.testing.assert_array_equal(packed.argmax(-1), plain.argmax(-1))


@pytest.mark.real_model
def test_default_packed_decoding_with_a_wrong_weight_is_detected(default_model, chat_ids):
    """The bound above can fail: one wrong scale in one row of one layer's down_proj."""
    name = "model.layers.3.mlp.down_proj.weight"
    packed = default_packed(default_model)
    w = packed[name]
    wrong = np.array(w.blocks)
    wrong[7, 0:2] = np.float16(2 * wrong[7, 0:2].view(np.float16)[0] + 0.01).reshape(1).view(
        np.uint8)
    bad = decode(with_packed(default_model, {**packed, name: PackedWeight(wrong, w.ggml_type)}),
                 chat_ids, prompt=10)
    good = decode(with_packed(default_model, packed), chat_ids, prompt=10)
    assert np.abs(bad - good)[1:].max() > 1e-3


@pytest.mark.real_model
@pytest.mark.parametrize("prompt", ["The capital of France is", "def fib(n):",
                                    "In 1969, 3 astronauts"])
def test_default_greedy_tokens_are_the_same(default_model, prompt):
    from npllm.generate import generate

    packed = generate(with_packed(default_model, default_packed(default_model)), prompt, 24,
                      ignore_eos=True)
    plain = generate(with_packed(default_model, {}), prompt, 24, ignore_eos=True)
    assert packed.ids == plain.ids


@pytest.mark.real_model
def test_default_folder_without_packed_file_still_decodes(default_model, converted_default_folder,
                                                          tmp_path, chat_ids):
    """An older cache folder (float32 only) loads without packed weights and decodes exactly
    as the float32 path of a model that has them."""
    old = tmp_path / "old"
    old.mkdir()
    for f in converted_default_folder.iterdir():
        if f.name != PACKED_FILE:
            (old / f.name).symlink_to(f)
    start = time.perf_counter()
    model = npllm.load(old, engine="numba")
    assert time.perf_counter() - start < 1.0
    assert model.engine.packed == {} and "GGUF blocks" not in repr(model)
    np.testing.assert_array_equal(
        decode(model, chat_ids[:16], prompt=10),
        decode(with_packed(default_model, {}), chat_ids[:16], prompt=10))


@pytest.mark.real_model
def test_default_model_says_it_has_packed_weights():
    model = npllm.load(engine="numba")
    assert "decoding from 210 Q4_1, 1 Q8_0 matrices in their GGUF blocks (92.0 MiB)" in repr(
        model)


def test_the_block_layouts_are_ggufs_and_each_has_a_kernel():
    """npllm.ggml_blocks (shared by the loader and the kernels) agrees with the gguf package."""
    from npllm.ggml_blocks import BLOCK, BLOCK_BYTES

    assert set(Q.MATVECS) == set(BLOCK_BYTES)
    for ggml_type, size in BLOCK_BYTES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]] == (BLOCK, size)
