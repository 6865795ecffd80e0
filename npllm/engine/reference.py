"""The reference engine: the family's reference forward as written (:func:`npllm.model.llama.forward`
for Llama; :mod:`npllm.model.families` for the others), nothing else.

What ``NPLLM_ENGINE=reference`` (or ``npllm.load(name, engine="reference")``) runs: the forward
pass the docs show, composed of the readable NumPy equations. Asking for fewer logits or for
log-probabilities is composed from the whole logits, as the lecture writes it.
"""
import numpy as np

from npllm.equations import token_log_probs
from npllm.model.families import family_forward
from npllm.trace import no_trace


class ReferenceEngine:
    name = "reference"

    def __init__(self, config, weights):
        self.config, self.weights = config, weights
        self.forward = family_forward(config)

    def __call__(self, inputs, cache=None, attention_mask=None, trace=no_trace):
        """Logits [B, kept, V], or log P(targets) [B, kept] (:class:`~npllm.model.inputs.Inputs`)."""
        logits = self.forward(self.weights, self.config, inputs.ids, cache, attention_mask, trace)
        logits = logits[:, -inputs.kept:]
        if inputs.targets is None:
            return logits
        log_probs = token_log_probs(logits, inputs.targets)
        if attention_mask is not None:  # padding predicts nothing: 0, as the Numba engine gives
            log_probs = np.where(np.asarray(attention_mask)[:, -inputs.kept:] != 0, log_probs, 0)
        return log_probs.astype(np.float32)

    def warm_up(self):
        """Nothing to compile: 0 seconds (:class:`npllm.engine.warm.WarmUp`)."""
        return 0.0

    def map(self, fn, items, at_once=None):
        """``[fn(item) for item in items]``."""
        return [fn(item) for item in items]

    def __repr__(self):
        return f"{self.name} ({self.forward.__module__}.forward, NumPy equations)"

