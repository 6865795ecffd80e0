"""Optimizers over a whole model: the update equations of :mod:`npllm.equations.optim` applied to
every weight, with the state they carry from step to step (AdamW's two moments, the step count).

Weights are the ``{HF name: array}`` dict of a model; tied names (``lm_head.weight`` and
``model.embed_tokens.weight`` as one array) are one parameter, updated once. Updates are written
into the weight arrays, so a :class:`~npllm.model.Model` holding them sees the new values.
"""

import numpy as np

from npllm.equations import adamw_step, sgd_step


def parameters(weights):
    """``{name: array}`` with each array once (the first name of a tied pair), in model order:
    the parameters as transformers' ``model.named_parameters()`` lists them."""
    seen, unique = set(), {}
    for name, w in weights.items():
        if id(w) not in seen:
            seen.add(id(w))
            unique[name] = w
    return unique


def decays(name, w):
    """Whether AdamW's weight decay applies: to matrices (embeddings, projections), not to the
    norms' gains, whose natural value is 1, not 0 (as nanoGPT and llm.c's PyTorch script do)."""
    return w.ndim >= 2


class SGD:
    """Plain gradient descent: ``W <- W - lr * G`` for every weight (``torch.optim.SGD``)."""

    def __init__(self, weights, lr=1e-2):
        self.lr, self.step_count = lr, 0

    def step(self, weights, grads, lr=None):
        lr = self.lr if lr is None else lr
        for name, w in parameters(weights).items():
            w[...] = sgd_step(w, grads[name], lr)
        self.step_count += 1

    def state_dict(self):
        return {"step": np.array(self.step_count)}

    def load_state_dict(self, state):
        self.step_count = int(state["step"])


def fused(engine=None):
    """Whether AdamW runs its Numba twin (:mod:`npllm.kernels.optim`): on the Numba engine
    (the default), not with ``NPLLM_ENGINE=reference`` or ``engine="reference"``. Same numbers
    either way."""
    from npllm.engine import engine_name
    return engine_name(engine) == "numba"


class AdamW:
    """AdamW over a model (``torch.optim.AdamW`` with two parameter groups: matrices with
    ``weight_decay``, norm gains without). The state is the first and second moments m, v per
    weight and the number of steps taken. The update is :func:`npllm.equations.adamw_step`, or
    its Numba twin (one pass, in place) on the Numba engine (``engine``: a name, or None for
    ``$NPLLM_ENGINE``), each weight shared between ``threads`` threads (None: the machine's,
    :func:`~npllm.engine.threads.machine_threads`)."""

    def __init__(self, weights, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 engine=None, threads=None):
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        params = parameters(weights)
        self.m = {name: np.zeros(w.shape, np.float32) for name, w in params.items()}
        self.v = {name: np.zeros(w.shape, np.float32) for name, w in params.items()}
        self.step_count = 0
        self.fused = fused(engine)  # chosen once, like a model's engine
        self.split = None
        if self.fused:
            from npllm.engine.training import Team
            from npllm.engine.threads import machine_threads
            team = Team(threads or machine_threads())
            if team.threads > 1:  # pieces of a weight of at least 2^16 numbers (256 KB)
                self.split = lambda fn, n: team.rows(fn, n, 1 << 16)

    def step(self, weights, grads, lr=None):
        """One update of every weight (in place) from ``grads`` (same names)."""
        lr = self.lr if lr is None else lr
        self.step_count += 1
        step = adamw_step
        if self.fused:
            from functools import partial

            from npllm.kernels.optim import adamw_step_
            step = partial(adamw_step_, split=self.split)
        for name, w in parameters(weights).items():
            decay = self.weight_decay if decays(name, w) else 0.0
            new = step(w, grads[name], self.m[name], self.v[name], self.step_count, lr,
                       self.betas, self.eps, decay)
            if new is not None:  # the equation returns new arrays; its twin wrote in place
                w[...], self.m[name], self.v[name] = new

    def state_dict(self):
        """The state as flat arrays (for a safetensors file): ``m.<name>``, ``v.<name>``, ``step``."""
        state = {"step": np.array(self.step_count, np.int64)}
        state.update({f"m.{name}": m for name, m in self.m.items()})
        state.update({f"v.{name}": v for name, v in self.v.items()})
        return state

    def load_state_dict(self, state):
        for name in self.m:
            self.m[name] = np.array(state[f"m.{name}"], np.float32)
            self.v[name] = np.array(state[f"v.{name}"], np.float32)
        self.step_count = int(state["step"])
