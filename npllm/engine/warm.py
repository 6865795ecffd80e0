"""Compiling the kernels of generation before generation is timed.

Numba compiles each kernel at its first call, or loads it from its on-disk cache: about ten
seconds after an installation, a fraction of a second after that. Counted inside a generation,
that time would be reported as decoding speed (a first ``npllm generate`` saying 0.6 tokens/s
for a model that decodes 30), so generation first asks its engine to warm up, and reports the
time apart (:attr:`npllm.generate.Generation.compile_seconds`).
"""
import time

import numpy as np

from npllm.model.cache import KVCache
from npllm.model.inputs import check_inputs


class WarmUp:
    """What the Numba engines share: :meth:`warm_up`, once per engine."""

    warmed = False

    def warm_up(self):
        """Run the engine once as generation does, on a scratch KV cache: a two-token prompt,
        then one decoding step (the packed, fused path when the engine has one), so that every
        kernel of generation is compiled or loaded -> the seconds it took (0 after the first
        call)."""
        if self.warmed:
            return 0.0
        self.warmed = True
        start = time.perf_counter()
        cache = KVCache.empty(self.config, 1, 4)
        for ids in ([[0, 0]], [[0]]):
            self(check_inputs(self.config, np.array(ids), cache, None, 1, None), cache)
        return time.perf_counter() - start
