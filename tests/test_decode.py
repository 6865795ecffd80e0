"""The fused decoding layer (``npllm/kernels/decode.py``): one decoder layer for one new token in
one compiled call, from packed weights.

1. The kernel against the layer written out in float64 (the lecture's equations with exact
   arithmetic), with the readable float32 equations as the yardstick: both are float32
   approximations of the same exact layer, so the kernel's error may be a few times the
   equations' own error, never more (hypothesis: shapes, grouped-query ratios, cache lengths,
   block types). A negative control shows that bound catches a wrong key/value head.
2. The forward pass uses it when decoding from packed weights whose q, k, v (and gate, up) lie
   one after another, and gives the logits of the composed step.

The kernel is called explicitly and the forward pass on a Numba engine, so this file means the
same under NPLLM_ENGINE=reference.
"""
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, strategies as st

import npllm
import npllm.equations as E
from npllm.engine import NumbaEngine
from npllm.engine.packed import PackedWeight
from npllm.kernels import decode as DK
from npllm.kernels.quantized import BLOCK_BYTES, KINDS
from npllm.model import Model
from test_quantized import decode, reference, tiny_packed, with_packed  # noqa: F401 (a fixture)

U = np.finfo(np.float32).eps / 2  # float32 unit roundoff


def model_like_blocks(rng, ggml_type, N, D):
    """Blocks of a matrix [N, D] with weights of a trained model's size (scales ~0.01, Q4_1
    minimum -8 d: weights centred on 0), so that a layer's numbers stay O(1)."""
    blocks = rng.integers(0, 256, (N, D // 32, BLOCK_BYTES[ggml_type]), dtype=np.uint8)
    d = (rng.uniform(0.005, 0.02, (N, D // 32, 1)) * 576 ** 0.5 / D ** 0.5).astype(np.float16)
    blocks[:, :, 0:2] = d.view(np.uint8)
    if ggml_type == "Q4_1":
        blocks[:, :, 2:4] = (-8 * d).astype(np.float16).view(np.uint8)
    return blocks.reshape(N, -1)


def layer_inputs(seed, H, K, Dh, F, position, types):
    rng = np.random.default_rng(seed)
    D = H * Dh
    shapes = {"qkv": ((H + 2 * K) * Dh, D), "o": (D, H * Dh), "gate_up": (2 * F, D), "down": (D, F)}
    blocks = {n: model_like_blocks(rng, types[n], *shape) for n, shape in shapes.items()}
    angles = E.rope_cos_sin(np.array([[position]]), E.rope_inverse_frequencies(Dh, 10000.0))
    cache = rng.standard_normal((2, K, position + 5, Dh)).astype(np.float32)
    cache[:, :, position:] = np.nan  # not filled yet: must not be read (the new row is written)
    return dict(
        x=rng.standard_normal(D).astype(np.float32),
        attn_norm=rng.uniform(0.5, 1.5, D).astype(np.float32),
        mlp_norm=rng.uniform(0.5, 1.5, D).astype(np.float32),
        blocks=blocks, types=types, cos=angles[0][0, 0], sin=angles[1][0, 0],
        k_cache=cache[0], v_cache=cache[1], position=position, eps=np.float32(1e-5), H=H, K=K)


def run_kernel(a):
    x, k_cache, v_cache = a["x"].copy(), a["k_cache"].copy(), a["v_cache"].copy()
    b, t = a["blocks"], {n: KINDS[kind] for n, kind in a["types"].items()}
    DK.decode_layer(x, a["attn_norm"], b["qkv"], t["qkv"], b["o"], t["o"], a["mlp_norm"],
                    b["gate_up"], t["gate_up"], b["down"], t["down"], a["cos"], a["sin"],
                    k_cache, v_cache, a["position"], a["eps"])
    return x, k_cache, v_cache


def run_equations(a, dtype):
    """The layer composed from the lecture equations, in float32 (npllm.equations), or written
    out in float64 with the same formulas (``dtype=np.float64``: the exact layer)."""
    W = {n: reference(b, a["types"][n]).astype(dtype) for n, b in a["blocks"].items()}
    H, K, pos, eps = a["H"], a["K"], a["position"], float(a["eps"])
    Dh = a["k_cache"].shape[-1]
    x, cos, sin = (a[n].astype(dtype) for n in ("x", "cos", "sin"))
    k_cache, v_cache = a["k_cache"][:, :pos + 1].astype(dtype), a["v_cache"][:, :pos + 1].astype(dtype)
    if dtype == np.float32:
        rms, swiglu = E.rms_norm, E.swiglu

        def rope(v, c, s):  # v [heads, Dh]: the heads in the place of positions, one angle
            return E.apply_rope(v, c[None], s[None])
    else:
        def rms(v, w, eps):
            return v / np.sqrt(np.mean(v * v) + eps) * w

        def rope(v, c, s):
            return v * c + np.concatenate([-v[..., Dh // 2:], v[..., :Dh // 2]], -1) * s

        def swiglu(g, u):
            return g / (1 + np.exp(-g)) * u
    projected = W["qkv"] @ rms(x, a["attn_norm"].astype(dtype), eps)
    q = rope(projected[:H * Dh].reshape(H, Dh), cos, sin)
    k_cache[:, pos] = rope(projected[H * Dh:(H + K) * Dh].reshape(K, Dh), cos, sin)
    v_cache[:, pos] = projected[(H + K) * Dh:].reshape(K, Dh)
    G = H // K
    heads = []
    for h in range(H):  # decode_attention, head by head
        scores = k_cache[h // G] @ q[h] * Dh ** -0.5
        p = np.exp(scores - scores.max())
        heads.append(p / p.sum() @ v_cache[h // G])
    x = x + W["o"] @ np.concatenate(heads).astype(dtype)
    both = W["gate_up"] @ rms(x, a["mlp_norm"].astype(dtype), eps)
    F = both.shape[0] // 2
    x = x + W["down"] @ swiglu(both[:F], both[F:])
    return x, k_cache[:, pos], v_cache[:, pos]


@given(seed=st.integers(0, 2**32 - 1), K=st.integers(1, 3), ratio=st.sampled_from([1, 3]),
       Dh=st.sampled_from([32, 64]), F=st.sampled_from([64, 160]), position=st.integers(0, 40),
       types=st.sampled_from(["Q4_1", "Q8_0", "mixed"]))
def test_decode_layer_equals_the_equations(seed, K, ratio, Dh, F, position, types):
    """kernel - exact <= 4 x (equations - exact) + 16 ulps of the layer's output.

    Both compute the exact layer in float32 with different orders of summation (the kernel's
    products and attention in lanes, the equations' in BLAS), so their errors are of the same
    size; 4x leaves room for one order being less lucky, and 16 ulps of max |x| for examples
    where the equations happen to be nearly exact. The new cache row (k after RoPE, v) is held
    to the same rule.
    """
    H = K * ratio
    kinds = ({"qkv": "Q4_1", "o": "Q8_0", "gate_up": "Q4_1", "down": "Q8_0"} if types == "mixed"
             else dict.fromkeys(("qkv", "o", "gate_up", "down"), types))
    a = layer_inputs(seed, H, K, Dh, F, position, kinds)
    x, k_cache, v_cache = run_kernel(a)
    exact = run_equations(a, np.float64)
    float32 = run_equations(a, np.float32)
    for got, eq, ex in zip((x, k_cache[:, position], v_cache[:, position]), float32, exact):
        bound = 4 * np.abs(eq - ex).max() + 16 * U * np.abs(ex).max()
        assert np.abs(got - ex).max() <= bound, (np.abs(got - ex).max(), bound)
    # Only the new row of the cache is written.
    np.testing.assert_array_equal(k_cache[:, :position], a["k_cache"][:, :position])
    np.testing.assert_array_equal(v_cache[:, :position], a["v_cache"][:, :position])
    assert np.isnan(k_cache[:, position + 1:]).all() and np.isnan(v_cache[:, position + 1:]).all()


def test_decode_layer_bound_catches_a_wrong_key_value_head():
    """Negative control: a query head reading the wrong key/value head's cache (here the two
    heads' cached keys and values swapped) moves the output far outside the bound above."""
    a = layer_inputs(7, 6, 2, 32, 64, 12, dict.fromkeys(("qkv", "o", "gate_up", "down"), "Q4_1"))
    exact = run_equations(a, np.float64)[0]
    float32 = run_equations(a, np.float32)[0]
    bound = 4 * np.abs(float32 - exact).max() + 16 * U * np.abs(exact).max()
    swapped = dict(a, k_cache=a["k_cache"][::-1].copy(), v_cache=a["v_cache"][::-1].copy())
    x = run_kernel(swapped)[0]
    assert np.abs(x - exact).max() > 100 * bound


# --- 2. in the forward pass -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_fusable(tiny_packed):
    """The tiny imported model with its seven matrices per layer re-quantized to Q8_0, q, k, v
    and gate, up stored one after another (as npllm's GGUF import writes the default model's),
    and its float32 weights made equal to the blocks (so packed and float32 decoding compute
    with the same weights)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    model = npllm.load(tiny_packed, engine="numba")
    weights, packed = dict(model.weights), dict(model.engine.packed)
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        for group in ([p + f"self_attn.{n}_proj.weight" for n in "qkv"], [p + "self_attn.o_proj.weight"],
                      [p + f"mlp.{n}_proj.weight" for n in ("gate", "up")], [p + "mlp.down_proj.weight"]):
            whole = quantize(np.concatenate([weights[n] for n in group]), GGMLQuantizationType.Q8_0)
            start = 0
            for n in group:
                rows = slice(start, start + weights[n].shape[0])
                packed[n] = PackedWeight(whole[rows], "Q8_0")
                weights[n] = reference(whole[rows], "Q8_0")
                start = rows.stop
    return Model(model.config, weights, model.tokenizer,
                 engine=NumbaEngine(model.config, weights, packed))


def test_forward_decodes_with_the_fused_layer(tiny_fusable):
    ids = np.array([1, 5, 9, 200, 7, 42, 3, 17, 99, 100])
    calls = []
    real = DK.decode_layer

    def counting(*args):
        calls.append(args[-2])  # the position
        return real(*args)
    with mock.patch.object(DK, "decode_layer", counting):
        fused = decode(tiny_fusable, ids)
    layers = tiny_fusable.config.num_hidden_layers
    assert calls == [p for p in range(4, len(ids)) for _ in range(layers)]
    assert tiny_fusable.engine.fused is not None
    composing = with_packed(tiny_fusable, tiny_fusable.engine.packed)
    composing.engine.fused = None  # the same matrices, each step composed from the kernels
    with mock.patch.object(DK, "decode_layer", counting):
        composed = decode(composing, ids)
    assert len(calls) == (len(ids) - 4) * layers
    plain = decode(with_packed(tiny_fusable, {}), ids)
    # Float32 throughout a 2-layer model of width 64 with logits ~1: a few ulps apart (as
    # test_quantized.py::test_tiny_decoding_uses_the_packed_weights).
    np.testing.assert_allclose(fused, composed, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fused, plain, atol=1e-5, rtol=0)


def test_forward_composes_the_step_when_the_matrices_are_apart(tiny_packed):
    """The imported tiny model stores q apart from k, v: no fused layer, the composed step."""
    model = npllm.load(tiny_packed, engine="numba")
    assert model.engine.packed and model.engine.fused is None


def test_decode_layer_runs_first_in_a_fresh_process(tmp_path):
    """The fused layer as a process's first parallel work, compiled and then loaded from Numba's
    on-disk cache (where Numba does not start its thread pool by itself: this crashed)."""
    import subprocess
    import sys

    script = tmp_path / "first.py"
    script.write_text(
        "import numpy as np\n"
        "from test_decode import layer_inputs, run_kernel\n"
        "a = layer_inputs(0, 6, 2, 32, 64, 0, dict.fromkeys(('qkv', 'o', 'gate_up', 'down'), 'Q4_1'))\n"
        "print(np.isfinite(run_kernel(a)[0]).all())\n")
    env = {**__import__("os").environ, "NUMBA_NUM_THREADS": "2", "PYTHONPATH": str(
        __import__("pathlib").Path(__file__).parent)}
    for _ in ("compile or load", "load from the cache"):
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
