"""npllm.kernels (Numba) against their originals in npllm.equations (NumPy).

Every kernel is run beside its equation on shapes and values drawn by hypothesis, with both its
serial and its parallel loop. Tolerances are float32's (conftest.assert_close: rtol 1e-5,
atol 1e-6) unless a comment derives a wider one from an order of summation that differs.
"""
from contextlib import ExitStack, contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

import npllm.equations as E
import npllm.kernels as K
from conftest import assert_close
from tolerances import U32 as U, assert_within_terms, product_terms  # U: float32's unit roundoff
from npllm.kernels import attention as kernel_attention

MASKED = np.finfo(np.float32).min

seeds = st.integers(0, 2**32 - 1)
leads = st.lists(st.integers(1, 3), max_size=2)  # leading axes: none, [B], [B, B']
drivers = st.sampled_from(["serial", "parallel"])


@contextmanager
def driver(name):
    """Force the serial or the parallel loop of every kernel, whatever the input size."""
    below = 0 if name == "parallel" else 2**62
    with ExitStack() as patches:
        for module in ("norm", "softmax", "mlp", "position"):
            patches.enter_context(mock.patch(f"npllm.kernels.{module}.SERIAL_BELOW", below))
        patches.enter_context(mock.patch("npllm.kernels.attention.SERIAL_ATTENTION_BELOW", below))
        yield


def values(seed, shape, scale=1.0, extremes=False):
    """Normal float32 values; with ``extremes`` about one in eight is +-1e4."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if extremes:
        hit = rng.random(shape) < 0.125
        x[hit] = rng.choice(np.float32([1e4, -1e4]), size=int(hit.sum()))
    return x


# --- rms_norm, swiglu, apply_rope ------------------------------------------------------------------

@given(seed=seeds, lead=leads, D=st.integers(1, 700), eps=st.sampled_from([1e-6, 1e-5, 0.1]),
       scale=st.sampled_from([1e-3, 1.0, 30.0]), extremes=st.booleans(), run=drivers)
def test_rms_norm_equals_equation(seed, lead, D, eps, scale, extremes, run):
    x, weight = values(seed, (*lead, D), scale, extremes), values(seed + 1, (D,))
    with driver(run):
        actual = K.rms_norm(x, weight, eps)
    # Only the mean of squares is summed differently (float64 running sum vs NumPy's pairwise
    # float32 sum): both within a few ulp of the exact mean, so the float32 tolerance holds.
    assert actual.dtype == np.float32 and actual.shape == x.shape
    assert_close(actual, E.rms_norm(x, weight, eps))


@given(seed=seeds, lead=leads, F=st.integers(1, 600), extremes=st.booleans(), run=drivers)
def test_swiglu_equals_equation(seed, lead, F, extremes, run):
    gate, up = values(seed, (*lead, F), 3.0, extremes), values(seed + 1, (*lead, F), 1.0, extremes)
    with driver(run):
        actual = K.swiglu(gate, up)
    # Same operations in the same order; only exp may differ by an ulp (libm vs NumPy's SIMD).
    # gate = -1e4 checks the overflow path: e^{1e4} = inf, gate / inf = -0.
    assert actual.dtype == np.float32 and np.isfinite(actual).all()
    assert_close(actual, E.swiglu(gate, up))


@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 4), T=st.integers(1, 20),
       half=st.sampled_from([1, 2, 8, 32]), layout=st.sampled_from(["T", "1T", "B1T", "BHT"]),
       extremes=st.booleans(), run=drivers)
def test_apply_rope_equals_equation_exactly(seed, B, H, T, half, layout, extremes, run):
    Dh = 2 * half
    x = values(seed, (B, H, T, Dh), 1.0, extremes)
    positions = np.random.default_rng(seed).integers(0, 5000, size=(B, T))
    cos, sin = E.rope_cos_sin(positions, E.rope_inverse_frequencies(Dh, 10000.0))  # [B, T, Dh]
    cos, sin = {"T": (cos[0], sin[0]), "1T": (cos[:1], sin[:1]),  # [T, Dh], [1, T, Dh]
                "B1T": (cos[:, None], sin[:, None]),  # one table per sequence, [B, 1, T, Dh]
                "BHT": (np.broadcast_to(cos[:, None], x.shape), np.broadcast_to(sin[:, None], x.shape)),
                }[layout]
    if layout in ("T", "1T"):
        x = x[0]  # [H, T, Dh], as the forward pass calls it
    with driver(run):
        actual = K.apply_rope(x, cos, sin)
    # The same float32 products and sums as NumPy (x2 s subtracted instead of (-x2) s added,
    # which is exact): bit for bit equal.
    np.testing.assert_array_equal(actual, E.apply_rope(x, cos, sin))


# --- softmax, log_softmax --------------------------------------------------------------------------

def logits(seed, shape, scale, extremes, special):
    """Logits, some rows entirely float32 min (a padded row: uniform, not NaN) and, with
    ``special``, some -inf entries (each row keeping one finite entry)."""
    x = values(seed, shape, scale, extremes)
    rng = np.random.default_rng(seed + 1)
    rows = x.reshape(-1, shape[-1])
    rows[rng.random(len(rows)) < 0.2] = MASKED
    if special:
        hole = rng.random(rows.shape) < 0.3
        hole[:, rng.integers(0, shape[-1])] = False
        rows[hole] = -np.inf
    return rows.reshape(shape)


softmax_cases = dict(seed=seeds, lead=leads, V=st.integers(1, 300), scale=st.sampled_from([0.1, 1.0, 30.0]),
                     extremes=st.booleans(), special=st.booleans(), run=drivers)


@given(**softmax_cases)
def test_softmax_equals_equation(seed, lead, V, scale, extremes, special, run):
    x = logits(seed, (*lead, V), scale, extremes, special)
    with driver(run):
        actual = K.softmax(x)
    # The sum of the exponentials is kept in float64 (NumPy: pairwise in float32); both are a
    # few ulp from exact, well inside the float32 tolerance.
    assert not np.isnan(actual).any()
    assert_close(actual, E.softmax(x))


@given(**softmax_cases)
def test_log_softmax_equals_equation(seed, lead, V, scale, extremes, special, run):
    x = logits(seed, (*lead, V), scale, extremes, special)
    with driver(run):
        actual = K.log_softmax(x)
    # (x - max) - log(sum): the first term is computed identically, the second, 0 <= lse <=
    # log V, can round to a neighbouring float32 (one ulp: lse * 2^-23). Near 0 (the most likely
    # tokens) that is an absolute error, so atol grows with log V.
    assert not np.isnan(actual).any()
    assert_close(actual, E.log_softmax(x), atol=1e-6 * max(1.0, np.log(V)))


@given(seed=seeds, shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_softmax_along_any_axis(seed, shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = values(seed, shape)
    assert_close(K.softmax(x, axis=axis), E.softmax(x, axis=axis))
    assert_close(K.log_softmax(x, axis=axis), E.log_softmax(x, axis=axis))


def test_softmax_of_float32_min_row_is_uniform():
    assert_close(K.softmax(np.full((2, 7), MASKED)), np.full((2, 7), 1 / 7))


# --- attention ------------------------------------------------------------------------------------

def attention_atol(q, k, v, mask, Dh, S):
    """Tolerance for attention kernels vs NumPy, from a first-order float32 error analysis.

    Both sides sum in different orders (BLAS blocking vs the kernel's loops): a score, a dot
    product over Dh, may differ by Dh u sum_d |q_d k_d| / sqrt(Dh), plus the rounding of
    score + mask (u |mask|). A score error e changes the softmax weights by a factor e^{+-e}.
    The output is then an average of v: its rounding (S terms) and the weights' error are
    relative to max |v|, not to the output, which may be near 0 after cancellation.
    """
    qk = np.abs(q.reshape(-1, Dh).astype(np.float64)) @ np.abs(k.reshape(-1, Dh).astype(np.float64)).T
    # Mask entries of -1e4 or below sit that far under a visible O(1) entry in every row these
    # tests make (or the row is all float32 min): weight e^{-1e4} = 0 on both sides, so their
    # rounding does not matter.
    m = np.abs(mask[np.abs(mask) < 1e3]) if mask is not None else np.zeros(0)
    score = 2 * U * (Dh * qk.max() * Dh ** -0.5 + (m.max() if m.size else 0.0))
    return 2 * (score + S * U) * max(np.abs(v).max(), 1e-30) + 1e-7


def attention_mask(kind, seed, B, H, T, S):
    """The masks the forward pass makes, and some it does not (per head, soft, -inf)."""
    rng = np.random.default_rng(seed)
    causal = E.causal_mask(T, S)
    if kind == "none":
        return None
    if kind == "causal":  # [T, S]; with S > T the first S - T keys are a KV cache
        return causal
    if kind == "padded":  # [B, 1, T, S]: left padding, fully masked key columns and query rows
        pad = np.arange(S)[None, :] < rng.integers(0, S + 1, size=(B, 1))
        return np.where(pad[:, None, None, :], MASKED, causal[None, None]).astype(np.float32)
    if kind == "per_head":  # [B, H, T, S]: random key columns hidden per head, then causal
        hidden = rng.random((B, H, 1, S)) < 0.3
        return np.where(hidden, MASKED, causal).astype(np.float32)
    if kind == "soft":  # [1, 1, T, S]: finite biases, -1e4 instead of float32 min, some -inf
        bias = rng.standard_normal((T, S)).astype(np.float32)
        bias = np.where(causal < 0, np.float32(-1e4), bias)
        bias[:, :S - T][rng.random((T, S - T)) < 0.3] = -np.inf  # never the diagonal
        return bias[None, None]
    raise AssertionError(kind)


mask_kinds = st.sampled_from(["none", "causal", "padded", "per_head", "soft"])


@given(seed=seeds, B=st.sampled_from([None, 1, 2]), K_=st.integers(1, 3), ratio=st.sampled_from([1, 3, 9]),
       T=st.integers(1, 20), past=st.sampled_from([0, 0, 1, 7, 300]), Dh=st.sampled_from([1, 4, 16, 64]),
       kind=mask_kinds, scale=st.sampled_from([0.3, 1.0, 3.0]), extremes=st.booleans(), run=drivers)
def test_grouped_query_attention_equals_equation(seed, B, K_, ratio, T, past, Dh, kind, scale,
                                                 extremes, run):
    H, S, lead = K_ * ratio, T + past, () if B is None else (B,)
    q, k = values(seed, (*lead, H, T, Dh), scale), values(seed + 1, (*lead, K_, S, Dh), scale)
    v = values(seed + 2, (*lead, K_, S, Dh), 1.0, extremes)
    mask = attention_mask(kind, seed, B or 1, H, T, S)
    with driver(run):
        actual = K.grouped_query_attention(q, k, v, mask)
    expected = E.grouped_query_attention(q, k, v, mask)
    assert actual.shape == expected.shape and not np.isnan(actual).any()
    assert_close(actual, expected, atol=attention_atol(q, k, v, mask, Dh, S))


@given(seed=seeds, B=st.sampled_from([None, 2]), K_=st.integers(1, 3), ratio=st.sampled_from([1, 3, 9]),
       S_max=st.sampled_from([1, 8, 300]), data=st.data(), Dh=st.sampled_from([4, 64]),
       extremes=st.booleans(), run=drivers)
def test_decode_attention_equals_equation(seed, B, K_, ratio, S_max, data, Dh, extremes, run):
    length = data.draw(st.integers(1, S_max))
    H, lead = K_ * ratio, () if B is None else (B,)
    q = values(seed, (*lead, H, 1, Dh))
    k_cache = values(seed + 1, (*lead, K_, S_max, Dh))
    v_cache = values(seed + 2, (*lead, K_, S_max, Dh), 1.0, extremes)
    expected = E.decode_attention(q, k_cache, v_cache, length)
    # Positions past `length` are not filled yet: whatever they hold must not be read.
    k_cache[..., length:, :] = np.nan
    v_cache[..., length:, :] = np.nan
    with driver(run):
        actual = K.decode_attention(q, k_cache, v_cache, length)
    filled = (slice(None),) * len(lead) + (slice(None), slice(0, length))
    atol = attention_atol(q, k_cache[filled], v_cache[filled], None, Dh, length)
    assert actual.shape == expected.shape
    assert_close(actual, expected, atol=atol)


def test_attention_on_kv_cache_views_and_long_keys():
    """The forward pass hands strided cache views; S > KEYS crosses the kernel's key tiles."""
    rng = np.random.default_rng(0)
    cache_k = rng.standard_normal((2, 3, 700, 64), dtype=np.float32)
    cache_v = rng.standard_normal((2, 3, 700, 64), dtype=np.float32)
    T, S = 19, 613
    q = rng.standard_normal((2, 9, T, 64), dtype=np.float32)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # views, not contiguous
    mask = E.causal_mask(T, S)[None, None]
    for run in ("serial", "parallel"):
        with driver(run):
            actual = K.grouped_query_attention(q, k, v, mask)
        assert_close(actual, E.grouped_query_attention(q, k, v, mask),
                     atol=attention_atol(q, k, v, mask, 64, S))


def test_attention_comparison_tells_head_mappings_apart():
    """Negative control: with K > 1 the test above would catch a kernel that paired query head
    h with key/value head h % K (tiling) instead of h // (H / K) (HF repeat_kv)."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((9, 5, 16), dtype=np.float32)
    k, v = (rng.standard_normal((3, 5, 16), dtype=np.float32) for _ in range(2))
    mask = E.causal_mask(5)
    tiled = E.scaled_dot_product_attention(q, np.tile(k, (3, 1, 1)), np.tile(v, (3, 1, 1)), mask)
    actual = K.grouped_query_attention(q, k, v, mask)
    with pytest.raises(AssertionError):
        assert_close(actual, tiled, atol=attention_atol(q, k, v, mask, 16, 5))


def test_decode_attention_is_the_last_row_of_causal_attention():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((9, 6, 64), dtype=np.float32)
    k, v = (rng.standard_normal((3, 6, 64), dtype=np.float32) for _ in range(2))
    full = K.grouped_query_attention(q, k, v, E.causal_mask(6))
    assert_close(K.decode_attention(q[:, -1:], k, v, 6), full[:, -1:], atol=1e-6)


# --- same errors, same names ---------------------------------------------------------------------

bad_calls = [
    ("rms_norm", lambda f: f(np.ones((2, 3)), np.ones(4), 1e-5)),
    ("swiglu", lambda f: f(np.ones((2, 3)), np.ones((2, 4)))),
    ("apply_rope", lambda f: f(np.ones((2, 4, 3)), np.ones((4, 3)), np.ones((4, 3)))),  # odd Dh
    ("apply_rope", lambda f: f(np.ones((2, 4, 6)), np.ones((5, 6)), np.ones((5, 6)))),  # T mismatch
    ("grouped_query_attention", lambda f: f(np.ones((4, 2, 8)), np.ones((3, 2, 8)), np.ones((3, 2, 8)))),
    ("grouped_query_attention", lambda f: f(np.ones((3, 2, 8)), np.ones((3, 2, 4)), np.ones((3, 2, 4)))),
    ("decode_attention", lambda f: f(np.ones((3, 2, 8)), np.ones((3, 4, 8)), np.ones((3, 4, 8)), 2)),
    ("decode_attention", lambda f: f(np.ones((3, 1, 8)), np.ones((3, 4, 8)), np.ones((3, 4, 8)), 5)),
]


@pytest.mark.parametrize("name, call", bad_calls)
def test_kernels_reject_what_the_equations_reject(name, call):
    for module in (E, K):
        with pytest.raises(ValueError):
            call(getattr(module, name))


def test_every_kernel_is_the_twin_of_an_equation():
    """Each kernel has an equation of the same name (its readable original), and the kernels'
    package offers exactly the contract's names (docs/internals/api-contract.md)."""
    assert set(K.__all__) == {"rms_norm", "apply_rope", "softmax", "log_softmax", "swiglu",
                              "grouped_query_attention", "decode_attention", "lm_head_log_probs"}
    for name in K.__all__:
        assert callable(getattr(E, name)) and getattr(K, name) is not getattr(E, name), name


def test_attention_never_repeats_key_value_heads():
    """The products are handed the K key/value heads themselves (views of k), not H repeated
    copies: each head's G = H / K queries are the rows of one matrix."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((9, 4, 8), dtype=np.float32)
    k, v = (rng.standard_normal((3, 4, 8), dtype=np.float32) for _ in range(2))
    seen, scores = [], kernel_attention._scores

    def spy(rows, kT):
        seen.append((rows.shape, kT.shape, np.shares_memory(kT, k)))
        return scores(rows, kT)

    with mock.patch.object(kernel_attention, "_scores", spy):
        K.grouped_query_attention(q, k, v, E.causal_mask(4))
        K.decode_attention(q[:, :1], k, v, 4)
    # rows [B, K, T * G, Dh], kT [B, K, Dh, S]: K = 3 heads, read in place
    assert seen == [((1, 3, 12, 8), (1, 3, 8, 4), True), ((1, 3, 3, 8), (1, 3, 8, 4), True)]


# --- what the forward pass's fast path adds -----------------------------------------------------

def test_exp32_is_within_one_ulp_of_the_correctly_rounded_exp():
    """The vectorised exponential behind the softmax, log-softmax and SwiGLU kernels: exp32 on
    every float32 input, exp_inplace (the softmax's) on the non-positive ones it is used for."""
    import numba
    from npllm.kernels._math import exp32, exp_inplace

    @numba.njit
    def exp_all(x):
        return np.array([exp32(v) for v in x], dtype=np.float32)

    x = np.concatenate([np.linspace(-90, 89, 200_001, dtype=np.float32),
                        np.float32([0.0, -0.0, 1e-30, -1e-30, 88.72, 88.7228, -87.33, 1.0])])
    with np.errstate(over="ignore"):
        exact = np.exp(x.astype(np.float64)).astype(np.float32)
    negative = x.copy()
    exp_inplace(negative, np.float32(0.0))
    for actual, where in ((exp_all(x), np.ones(x.shape, bool)), (negative, x <= 0)):
        normal = where & np.isfinite(exact) & (exact >= np.finfo(np.float32).tiny)
        ulps = np.abs(actual[normal].view(np.int32).astype(np.int64)
                      - exact[normal].view(np.int32).astype(np.int64))
        assert ulps.max() <= 1
    # Overflow to inf, underflow to 0 (NumPy: a subnormal below 1.2e-38), NaN stays NaN.
    special = np.float32([89.0, np.inf, -88.0, -np.inf, np.finfo(np.float32).min, np.nan])
    out = exp_all(special)
    assert out[:2].tolist() == [np.inf, np.inf] and out[2:5].tolist() == [0.0] * 3
    assert np.isnan(out[5])
    shifted = special[2:].copy()
    exp_inplace(shifted, np.float32(0.0))
    assert shifted[:3].tolist() == [0.0] * 3 and np.isnan(shifted[3])


@given(seed=seeds, lead=leads, T=st.integers(1, 9), V=st.integers(1, 3000),
       columns=st.sampled_from([None, 1, 7, 256]), scale=st.sampled_from([0.1, 1.0, 30.0]),
       run=drivers, slices=st.integers(1, 4))
@example(seed=243426, lead=[3], T=3, V=2, columns=1, scale=30.0, run="serial", slices=1)
def test_lm_head_log_probs_equals_the_composition(seed, lead, T, V, columns, scale, run, slices):
    """The fused LM head + log-softmax (over blocks of the vocabulary, a streaming logsumexp;
    over ``slices`` slices of it, merged) against ``token_log_probs(lm_head(c, W), targets)``,
    the equations' composition."""
    D = 16
    c = values(seed, (*lead, T, D), scale)
    W = values(seed + 1, (V, D))
    targets = np.random.default_rng(seed).integers(0, V, size=(*lead, T))
    expected = E.lm_head_log_probs(c, W, targets)
    with driver(run):
        actual = K.lm_head_log_probs(c, W, targets, columns=columns, slices=slices)
    assert actual.shape == expected.shape == (*lead, T)
    # Two absolute errors. The sum of e^{logit - max} is kept in float64 and, over blocks,
    # rescaled: its log may differ from NumPy's float32 sum by a few ulp of log V. And each
    # logit is a float32 dot product over D, computed in another order when the vocabulary is cut
    # into blocks: it may differ by a few ulp of the size of its terms, sum |c_d W_vd|, and log P
    # subtracts two logits (the target's and the largest). The dev profile found logits of 174
    # (scale 30) giving log P = -1.00573 against -1.00575: 1.9 ulp of 174.
    terms = product_terms(c, W.T).max(axis=-1)
    assert_within_terms(actual, expected, terms, ulps=16, rtol=1e-5, atol=4e-6 * max(1.0, np.log(V)))


@given(seed=seeds, V=st.integers(2, 300), columns=st.sampled_from([None, 1, 7]),
       slices=st.integers(1, 4), data=st.data())
def test_lm_head_log_probs_with_impossible_tokens(seed, V, columns, slices, data):
    """Vocabulary entries whose logit is -inf (probability 0) may fill whole blocks and whole
    slices: they add e^{-inf} = 0 to the sum, as in the equations' composition, and are never
    the NaN of e^{-inf - (-inf)}."""
    first = data.draw(st.integers(0, V - 1), "first")
    last = data.draw(st.integers(first + 1, V), "last")
    if last - first == V:
        last -= 1  # at least one possible token, else log P is NaN in both
    D, T = 8, 5
    c = np.abs(values(seed, (T, D))) + np.float32(0.1)  # positive: -inf weights give -inf, not NaN
    W = values(seed + 1, (V, D))
    W[first:last] = -np.inf
    targets = np.random.default_rng(seed).integers(0, V, size=T)
    expected = E.lm_head_log_probs(c, W, targets)
    actual = K.lm_head_log_probs(c, W, targets, columns=columns, slices=slices)
    impossible = (first <= targets) & (targets < last)
    assert np.all(actual[impossible] == -np.inf) and np.all(expected[impossible] == -np.inf)
    W[first:last] = 0.0  # the finite entries' terms (as in the test above)
    terms = product_terms(c, W.T).max(axis=-1)
    assert_within_terms(actual[~impossible], expected[~impossible], terms[~impossible], ulps=16,
                        rtol=1e-5, atol=4e-6 * max(1.0, np.log(V)))


def test_lm_head_log_probs_rejects_bad_targets():
    c, W = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32)
    for bad in (np.array([0, 1]), np.array([0, 1, 5]), np.array([0.0, 1.0, 2.0])):
        with pytest.raises(ValueError):
            K.lm_head_log_probs(c, W, bad)


def test_swiglu_reads_the_fused_projection_in_place():
    """gate and up as the two halves of one [..., 2F] product: the kernel reads that array
    (no copy) and gives the numbers of the equation; other views are copied, same numbers."""
    from npllm.kernels.mlp import _halves
    y = values(5, (2, 7, 2 * 11), 3.0, extremes=True)
    gate, up = y[..., :11], y[..., 11:]
    assert _halves(gate, up) is not None and np.shares_memory(_halves(gate, up), y)
    assert _halves(up, gate) is None and _halves(gate[:1], up[:1]) is None
    for g, u in ((gate, up), (up, gate), (gate[:, ::2], up[:, ::2]), (gate[0], up[0])):
        assert_close(K.swiglu(g, u), E.swiglu(g, u))


@pytest.mark.parametrize("x_shape, angle_shape", [
    ((2, 9, 5, 8), (2, 1, 5, 8)), ((1, 3, 1, 64), (1, 1, 1, 64)), ((2, 3, 5, 8), (1, 1, 5, 8)),
    ((2, 3, 5, 8), (5, 8)), ((2, 3, 5, 8), (2, 3, 5, 8)), ((4, 2, 3, 5, 8), (2, 1, 5, 8)),
    ((4, 2, 3, 5, 8), (4, 2, 1, 5, 8)), ((5, 8), (5, 8)), ((3, 5, 8), (1, 5, 8))])
def test_apply_rope_on_head_views_and_shared_angles(x_shape, angle_shape):
    """The forward pass's call (x a strided view of the projection, angles [B, 1, T, Dh] shared
    by the heads) and the other broadcasts take their own paths: all equal the equation."""
    rng = np.random.default_rng(7)
    wide = rng.standard_normal(x_shape[:-1] + (3 * x_shape[-1],), dtype=np.float32)
    x = wide[..., 1:1 + x_shape[-1]]  # not contiguous
    cos, sin = (rng.standard_normal(angle_shape, dtype=np.float32) for _ in range(2))
    np.testing.assert_array_equal(K.apply_rope(x, cos, sin), E.apply_rope(x, cos, sin))
