"""The fused decoding layer (``npllm/kernels/decode.py``): one decoder layer for one new token in
one compiled call, from packed weights.

1. The kernel against the layer written out in float64 (the lecture's equations with exact
   arithmetic), within a rounding-error bound of that exact layer computed stage by stage;
   the readable float32 equations must be within it too (hypothesis: shapes, grouped-query
   ratios, cache lengths, block types). A negative control shows that bound catches a wrong
   key/value head.
2. The forward pass uses it when decoding from packed weights whose q, k, v (and gate, up) lie
   one after another, and gives the logits of the composed step.

The kernel is called explicitly and the forward pass on a Numba engine, so this file means the
same under NPLLM_ENGINE=reference.
"""
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

import npllm
import npllm.equations as E
from npllm.engine import NumbaEngine
from npllm.engine.packed import PackedWeight
from npllm.kernels import decode as DK
from npllm.kernels.quantized import BLOCK_BYTES, KINDS
from npllm.model import Model
from test_quantized import decode, reference, tiny_packed, with_packed  # noqa: F401 (a fixture)
from tolerances import U32 as U  # float32's unit roundoff, 2^-24



def model_like_blocks(rng, ggml_type, N, D):
    """Blocks of a matrix [N, D] with weights of a trained model's size (scales ~0.01, Q4_1
    minimum -8 d: weights centred on 0), so that a layer's numbers stay O(1)."""
    blocks = rng.integers(0, 256, (N, D // 32, BLOCK_BYTES[ggml_type]), dtype=np.uint8)
    # Q8_0 integers reach 127, Q4_1's (q - 8) reach 8: the same d would make Q8_0 weights 16x larger
    d = (rng.uniform(0.005, 0.02, (N, D // 32, 1)) * 576 ** 0.5 / D ** 0.5
         / (16 if ggml_type == "Q8_0" else 1)).astype(np.float16)
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


def run_equations(a):
    """The layer composed from the lecture equations in float32 (npllm.equations)."""
    W = {n: reference(b, a["types"][n]) for n, b in a["blocks"].items()}
    H, K, pos, eps = a["H"], a["K"], a["position"], a["eps"]
    Dh = a["k_cache"].shape[-1]
    x, cos, sin = a["x"], a["cos"], a["sin"]
    k_cache, v_cache = a["k_cache"][:, :pos + 1].copy(), a["v_cache"][:, :pos + 1].copy()
    rms, swiglu = E.rms_norm, E.swiglu

    def rope(v, c, s):  # v [heads, Dh]: the heads in the place of positions, one angle
        return E.apply_rope(v, c[None], s[None])
    projected = W["qkv"] @ rms(x, a["attn_norm"], eps)
    q = rope(projected[:H * Dh].reshape(H, Dh), cos, sin)
    k_cache[:, pos] = rope(projected[H * Dh:(H + K) * Dh].reshape(K, Dh), cos, sin)
    v_cache[:, pos] = projected[(H + K) * Dh:].reshape(K, Dh)
    G = H // K
    heads = []
    for h in range(H):  # decode_attention, head by head
        scores = k_cache[h // G] @ q[h] * Dh ** -0.5
        p = np.exp(scores - scores.max())
        heads.append(p / p.sum() @ v_cache[h // G])
    x = x + W["o"] @ np.concatenate(heads)
    both = W["gate_up"] @ rms(x, a["mlp_norm"], eps)
    F = both.shape[0] // 2
    x = x + W["down"] @ swiglu(both[:F], both[F:])
    return x, k_cache[:, pos], v_cache[:, pos]


LAMBDA = 10.0  # confidence of the probabilistic bound: P(a sum exceeds it) < 2 n exp(-50)


def rounding(n):
    """The relative error of n float32 roundings in a row, with probability 1 - 2 n e^(-LAMBDA^2/2)
    (Higham and Mary, "A new approach to probabilistic rounding error analysis", 2019: the
    errors are independent, so they grow as sqrt(n), not as n)."""
    return LAMBDA * np.sqrt(n) * U


def rss(*errors):
    """Independent errors add in quadrature (root of the sum of squares)."""
    return np.sqrt(sum(e * e for e in errors))


def rms_norm_with_error(v, dv, w, eps):
    """RMSNorm in float64 and the error of its float32 result: v's error dv passed through
    (directly and through the norm), plus the norm's own D + 6 roundings."""
    r = np.sqrt(np.mean(v * v) + eps)
    y = v / r * w
    error_of_r = np.sqrt((v * v) @ (dv * dv)) / (v.shape[0] * r * r)
    return y, rss(dv / r * w, y * error_of_r, rounding(v.shape[0] + 6) * y)


def product_with_error(W, v, dv):
    """W @ v and its error: the n-term sums' rounding, relative to their terms |W| @ |v| (not to
    the result, which may cancel), and v's error passed through W."""
    return W @ v, rss(rounding(W.shape[1]) * (np.abs(W) @ np.abs(v)), np.sqrt((W * W) @ (dv * dv)))


def rope_with_error(v, dv, c, s):
    """RoPE (rotate_half form) on v [heads, Dh] and its error."""
    def rotate_half(z):
        return np.concatenate([-z[..., Dh // 2:], z[..., :Dh // 2]], -1)
    Dh = v.shape[-1]
    y = v * c + rotate_half(v) * s
    return y, rss(dv * c, rotate_half(dv) * s, rounding(3) * (np.abs(v * c) + np.abs(rotate_half(v) * s)))


def attention_with_error(q, dq, k, dk, v, dv):
    """One query head q [Dh] against keys and values [T, Dh] and the error of its output: the
    scores' rounding and inputs' errors move the softmax's exponents, by which its weights move
    relatively; e^x rounds within 4 ulp."""
    scale = q.shape[0] ** -0.5
    s = k @ q * scale
    ds = scale * rss(rounding(q.shape[0] + 2) * (np.abs(k) @ np.abs(q)),
                     np.sqrt((k * k) @ (dq * dq)), np.sqrt((dk * dk) @ (q * q)))
    e = np.exp(s - s.max())
    p = e / e.sum()
    exponent_error = rss(ds, rounding(1) * (s.max() - s), rounding(4))
    dp = p * (exponent_error + p @ exponent_error + rounding(len(s) + 2))
    return p @ v, rss(rounding(2 * len(s)) * (p @ np.abs(v)), np.sqrt((dp * dp) @ (v * v)),
                      np.sqrt((p * p) @ (dv * dv)))


def layer_error_bound(a):
    """The exact layer (float64) and, entry by entry, how far any float32 evaluation of it may
    be, whatever its order of summation: a rounding-error analysis stage by stage (each sum
    rounds relative to its terms, errors pass through each stage to first order). Returns
    (x, dx), (k, dk), (v, dv): the layer's output and the new cache rows."""
    W = {n: reference(b, a["types"][n]).astype(np.float64) for n, b in a["blocks"].items()}
    H, K, pos, eps = a["H"], a["K"], a["position"], float(a["eps"])
    Dh, G = a["k_cache"].shape[-1], H // K
    x, cos, sin = (a[n].astype(np.float64) for n in ("x", "cos", "sin"))
    k_cache, v_cache = (a[n][:, :pos + 1].astype(np.float64) for n in ("k_cache", "v_cache"))
    dk_cache, dv_cache = np.zeros_like(k_cache), np.zeros_like(v_cache)  # cached rows: exact inputs
    h, dh = rms_norm_with_error(x, 0 * x, a["attn_norm"].astype(np.float64), eps)
    p, dp = product_with_error(W["qkv"], h, dh)
    parts = [(p[n * Dh:m * Dh].reshape(-1, Dh), dp[n * Dh:m * Dh].reshape(-1, Dh))
             for n, m in ((0, H), (H, H + K), (H + K, H + 2 * K))]
    q, dq = rope_with_error(*parts[0], cos, sin)
    k_cache[:, pos], dk_cache[:, pos] = rope_with_error(*parts[1], cos, sin)
    v_cache[:, pos], dv_cache[:, pos] = parts[2]
    heads = [attention_with_error(q[i], dq[i], k_cache[i // G], dk_cache[i // G], v_cache[i // G],
                                  dv_cache[i // G]) for i in range(H)]
    o, do = product_with_error(W["o"], *(np.concatenate(z) for z in zip(*heads)))
    x, dx = x + o, rss(do, rounding(1) * (np.abs(x) + np.abs(o)))
    h, dh = rms_norm_with_error(x, dx, a["mlp_norm"].astype(np.float64), eps)
    both, d_both = product_with_error(W["gate_up"], h, dh)
    (g, up), (dg, d_up) = np.split(both, 2), np.split(d_both, 2)
    silu = g / (1 + np.exp(-g))
    act, d_act = silu * up, rss(1.1 * dg * up, silu * d_up, rounding(8) * silu * up)  # |silu'| < 1.1
    down, d_down = product_with_error(W["down"], act, d_act)
    return ((x + down, rss(dx, d_down, rounding(1) * (np.abs(x) + np.abs(down)))),
            (k_cache[:, pos], dk_cache[:, pos]), (v_cache[:, pos], dv_cache[:, pos]))


@given(seed=st.integers(0, 2**32 - 1), K=st.integers(1, 3), ratio=st.sampled_from([1, 3]),
       Dh=st.sampled_from([32, 64]), F=st.sampled_from([64, 160]), position=st.integers(0, 40),
       types=st.sampled_from(["Q4_1", "Q8_0", "mixed"]))
@example(seed=31053, K=2, ratio=3, Dh=64, F=160, position=2, types="Q8_0")
def test_decode_layer_equals_the_equations(seed, K, ratio, Dh, F, position, types):
    """The kernel's output and new cache rows are within the rounding-error bound of the exact
    layer (``layer_error_bound``), entry by entry; so are the readable float32 equations (the
    bound holds for any order of summation, which checks the bound itself).

    Over 300 random draws both reach at most 3% of the bound; a wrong key/value head exceeds it
    a thousandfold (the negative control below). An earlier yardstick, 4x the float32
    equations' own error, failed whenever the equations happened to be nearly exact (the dev
    profile found this example's seed).
    """
    H = K * ratio
    kinds = ({"qkv": "Q4_1", "o": "Q8_0", "gate_up": "Q4_1", "down": "Q8_0"} if types == "mixed"
             else dict.fromkeys(("qkv", "o", "gate_up", "down"), types))
    a = layer_inputs(seed, H, K, Dh, F, position, kinds)
    x, k_cache, v_cache = run_kernel(a)
    bounds = layer_error_bound(a)
    for name, got, eq, (exact, error) in zip(("x", "k", "v"), (x, k_cache[:, position], v_cache[:, position]),
                                             run_equations(a), bounds):
        assert (np.abs(got - exact) <= error).all(), (name, np.max(np.abs(got - exact) / error))
        assert (np.abs(eq - exact) <= error).all(), (name, "equations", np.max(np.abs(eq - exact) / error))
    # Only the new row of the cache is written.
    np.testing.assert_array_equal(k_cache[:, :position], a["k_cache"][:, :position])
    np.testing.assert_array_equal(v_cache[:, :position], a["v_cache"][:, :position])
    assert np.isnan(k_cache[:, position + 1:]).all() and np.isnan(v_cache[:, position + 1:]).all()


def test_decode_layer_bound_catches_a_wrong_key_value_head():
    """Negative control: a query head reading the wrong key/value head's cache (here the two
    heads' cached keys and values swapped) moves the output far outside the bound above."""
    a = layer_inputs(7, 6, 2, 32, 64, 12, dict.fromkeys(("qkv", "o", "gate_up", "down"), "Q4_1"))
    exact, error = layer_error_bound(a)[0]
    swapped = dict(a, k_cache=a["k_cache"][::-1].copy(), v_cache=a["v_cache"][::-1].copy())
    x = run_kernel(swapped)[0]
    assert np.max(np.abs(x - exact) / error) > 100


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
