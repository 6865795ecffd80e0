"""Which reference forward pass runs a model: one file per family, chosen by ``model_type``.

=========  ===========================  ===============================================
family     reference                    models
=========  ===========================  ===============================================
llama      :mod:`npllm.model.llama`     Llama, SmolLM2 (npllm's default), Mistral
stablelm   :mod:`npllm.model.stablelm`  StableLM-3B-4e1t (lecture 000), StableLM 2
phi3       :mod:`npllm.model.phi3`      Phi-3-mini (lecture 002)
qwen2      :mod:`npllm.model.qwen2`     Qwen2, Qwen2.5
gpt2       :mod:`npllm.model.gpt2`      GPT-2 (lecture 000)
=========  ===========================  ===============================================

``docs/families.md`` sets their differing lines side by side.
"""
from npllm.model import gpt2, llama, phi3, qwen2, stablelm

FORWARDS = {"llama": llama.forward, "mistral": llama.forward, "stablelm": stablelm.forward,
            "phi3": phi3.forward, "qwen2": qwen2.forward, "gpt2": gpt2.forward}


def family_forward(config):
    """The reference ``forward(weights, config, ids, cache, attention_mask, trace)`` of
    ``config.model_type``."""
    return FORWARDS[config.model_type]
