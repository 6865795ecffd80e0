"""npllm.equations.optim and npllm.training.optim against torch: SGD and AdamW step for step
(torch.optim), clipping (torch.nn.utils.clip_grad_norm_), the schedule (transformers'
get_cosine_with_min_lr_schedule_with_warmup), and 20 AdamW steps of a whole tiny model against
transformers' model trained by torch.optim.AdamW."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import npllm
from npllm.equations import (adamw_step, clip_by_global_norm, global_norm, sgd_step,
                             warmup_cosine_lr)
from npllm.training import loss_and_grads
from npllm.training.optim import SGD, AdamW, parameters
from tiny_models import tiny_llama

seeds = st.integers(0, 2**32 - 1)


def gradients(seed, shape, steps):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * rng.choice([1e-6, 1e-3, 1.0])).astype(np.float32)
            for _ in range(steps)]


def torch_adamw(w0, grads, lr, betas, eps, weight_decay):
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    for g in grads:
        p.grad = torch.from_numpy(g)
        opt.step()
    return p.detach().numpy()


# Same float32 operations in the same order as torch's single-tensor AdamW: measured equal to
# ~1 ulp per step; 20 steps of ulp-level differences stay below 1e-6 of the weights' scale.
ADAM_TOL = dict(rtol=1e-6, atol=1e-7)


@given(seed=seeds, shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
       lr=st.sampled_from([1e-4, 1e-3, 3e-2]), beta2=st.sampled_from([0.95, 0.999]),
       eps=st.sampled_from([1e-8, 1e-6]), weight_decay=st.sampled_from([0.0, 0.01, 0.1]))
def test_adamw_step_equals_torch_for_20_steps(seed, shape, lr, beta2, eps, weight_decay):
    w0 = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    grads = gradients(seed, shape, 20)
    w, m, v = w0, np.zeros_like(w0), np.zeros_like(w0)
    size = np.abs(w0.astype(np.float64))
    for t, g in enumerate(grads, start=1):
        w, m, v = adamw_step(w, g, m, v, t, lr, (0.9, beta2), eps, weight_decay)
        size = np.maximum(size, np.abs(w))
    expected = torch_adamw(w0, grads, lr, (0.9, beta2), eps, weight_decay)
    # A weight may cross zero in 20 steps: each step's ulp-level difference is relative to the
    # weight then, w_t (1 - lr wd) - lr m / (sqrt(v) + eps), not to the final one; so rtol of
    # the largest |w_t| (measured over 1,500 draws: differences up to 0.36 of this bound, and
    # 0.50 of the old one relative to the final weight).
    np.testing.assert_array_less(np.abs(w - expected), ADAM_TOL["rtol"] * size + ADAM_TOL["atol"])


def test_adam_with_coupled_weight_decay_is_not_adamw():
    """Negative control: weight decay added to the gradient (Adam's L2, torch.optim.Adam's
    weight_decay) instead of to the weights gives other weights; the comparison says so."""
    w0 = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    grads = gradients(1, (16,), 20)
    w, m, v = w0, np.zeros_like(w0), np.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        w, m, v = adamw_step(w, g + np.float32(0.1) * w, m, v, t, 1e-2, (0.9, 0.999), 1e-8, 0.0)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(w, torch_adamw(w0, grads, 1e-2, (0.9, 0.999), 1e-8, 0.1), **ADAM_TOL)


@given(seed=seeds, n=st.integers(1, 50), lr=st.sampled_from([1e-3, 0.1, 1.0]))
def test_sgd_step_equals_torch(seed, n, lr):
    w0 = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    grads = gradients(seed + 1, (n,), 5)
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.SGD([p], lr=lr)
    w = w0
    for g in grads:
        w = sgd_step(w, g, lr)
        p.grad = torch.from_numpy(g)
        opt.step()
    # torch's SGD is param.add_(grad, alpha=-lr): one fused multiply-add may round once less.
    np.testing.assert_allclose(w, p.detach().numpy(), rtol=1e-6, atol=1e-7)


@given(seed=seeds, sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       max_norm=st.sampled_from([0.01, 1.0, 100.0]))
def test_clip_by_global_norm_equals_torch(seed, sizes, max_norm):
    rng = np.random.default_rng(seed)
    grads = [(rng.standard_normal(n) * rng.choice([0.01, 1.0, 10.0])).astype(np.float32) for n in sizes]
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(g.copy())
    expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
    clipped, norm = clip_by_global_norm(grads, max_norm)
    # torch sums the squares in float32 (norm of the norms); we sum in float64: 1e-6 relative.
    np.testing.assert_allclose(norm, expected_norm, rtol=1e-6)
    for c, p in zip(clipped, params):
        np.testing.assert_allclose(c, p.grad.numpy(), rtol=1e-6, atol=1e-9)
    assert global_norm(clipped) <= max_norm * (1 + 1e-5)


@given(lr=st.sampled_from([1e-3, 3e-4]), warmup=st.integers(0, 20), extra=st.integers(1, 200),
       min_lr_ratio=st.sampled_from([0.0, 0.1]))
def test_warmup_cosine_equals_transformers(lr, warmup, extra, min_lr_ratio):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    total = warmup + extra
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_lr_ratio)
    for step in range(total + 3):
        expected = opt.param_groups[0]["lr"]
        assert warmup_cosine_lr(step, lr, warmup, total, min_lr_ratio) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        opt.step()
        schedule.step()


# ---- a whole tiny model: 20 AdamW steps against transformers + torch.optim.AdamW --------------

def test_20_adamw_steps_on_a_tiny_model_equal_torch():
    import transformers
    folder = tiny_llama()
    model = npllm.load(str(folder))
    weights = {name: np.array(w) for name, w in model.weights.items()}  # writable copies
    # The exact trajectory: transformers' model in float64, trained by torch.optim.AdamW.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float64, attn_implementation="eager")
    pad = reference.config.pad_token_id
    decay = [p for p in reference.parameters() if p.ndim >= 2]
    no_decay = [p for p in reference.parameters() if p.ndim < 2]
    settings_ = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], **settings_)
    opt = AdamW(weights, weight_decay=0.1, **settings_)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 17))
    ids[0, 3] = pad
    x, y = ids[:, :-1], ids[:, 1:]  # one batch, 20 times: the loss must fall
    losses = []
    for step in range(20):
        loss, grads = loss_and_grads(weights, model.config, x, y, padding_idx=pad)
        opt.step(weights, grads)
        torch_opt.zero_grad()
        logits = reference(torch.from_numpy(x)).logits
        torch_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1))
        torch_loss.backward()
        torch_opt.step()
        losses.append((loss, torch_loss.item()))
    # AdamW divides each gradient by its own running RMS, so where a gradient is near zero its
    # float32 rounding noise becomes a step of size ~lr: float32 training drifts from the exact
    # trajectory by more than the gradients do. Measured after these 20 steps: npllm up to
    # 1.6e-5 from float64, torch's own float32 run up to 2.1e-5. Allowed: 1e-4, a thirtieth of
    # one step (lr = 3e-3); an optimizer with a wrong term is off by whole steps.
    for name, p in reference.named_parameters():
        np.testing.assert_allclose(weights[name], p.detach().numpy(), rtol=0, atol=1e-4, err_msg=name)
    # The loss is a float32 mean of log-probabilities along the same trajectory.
    np.testing.assert_allclose([a for a, _ in losses], [b for _, b in losses], rtol=1e-5)
    assert losses[-1][0] < losses[0][0] / 10  # and it learns the batch


def test_sgd_and_adamw_update_tied_weights_once():
    folder = tiny_llama(tie_word_embeddings=True)
    model = npllm.load(str(folder))
    weights = {name: np.array(w) for name, w in model.weights.items()}
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    assert len(parameters(weights)) == len(weights) - 1
    ids = np.arange(12)[None] % model.config.vocab_size
    before = weights["lm_head.weight"].copy()
    for opt in (SGD(weights, lr=0.1), AdamW(weights, lr=1e-2)):
        loss, grads = loss_and_grads(weights, model.config, ids[:, :-1], ids[:, 1:])
        opt.step(weights, grads)
        new_loss, _ = loss_and_grads(weights, model.config, ids[:, :-1], ids[:, 1:])
        assert new_loss < loss
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    assert not np.array_equal(before, weights["lm_head.weight"])


@settings(max_examples=10)
@given(seed=seeds)
def test_adamw_state_round_trips(seed):
    w = {"a": np.random.default_rng(seed).standard_normal((3, 4)).astype(np.float32)}
    opt = AdamW(w, lr=1e-2)
    opt.step(w, {"a": np.ones((3, 4), np.float32)})
    other = AdamW(w, lr=1e-2)
    other.load_state_dict(opt.state_dict())
    assert other.step_count == 1 and np.array_equal(other.m["a"], opt.m["a"])


@settings(max_examples=20)
@given(seed=seeds, n=st.integers(1, 300), step=st.integers(1, 50),
       lr=st.sampled_from([1e-4, 1e-3, 3e-2]), weight_decay=st.sampled_from([0.0, 0.1]))
def test_adamw_numba_twin_equals_the_equation(seed, n, step, lr, weight_decay):
    from npllm.kernels.optim import adamw_step_
    rng = np.random.default_rng(seed)
    w, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = np.abs(rng.standard_normal(n)).astype(np.float32) * np.float32(1e-3)
    expected = adamw_step(w, g, m, v, step, lr, (0.9, 0.95), 1e-8, weight_decay)
    w2, m2, v2 = w.copy(), m.copy(), v.copy()
    adamw_step_(w2, g, m2, v2, step, lr, (0.9, 0.95), 1e-8, weight_decay)
    # The same float32 operations in the same order: equal but for an ulp where NumPy's
    # division or square root rounds differently from LLVM's (measured: bit-identical).
    for actual, exp in zip((w2, m2, v2), expected):
        np.testing.assert_allclose(actual, exp, rtol=2e-7, atol=0)
