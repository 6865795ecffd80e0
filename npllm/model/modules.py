"""A layer's tensors by module name, for the family forward passes (:mod:`npllm.model.stablelm`,
:mod:`~npllm.model.phi3`, :mod:`~npllm.model.qwen2`, :mod:`~npllm.model.gpt2`).

``modules(weights, "model.layers.3.", ("input_layernorm", "self_attn.q_proj"))`` gives
``w.input_layernorm.weight``, ``w.q_proj.weight`` and ``w.q_proj.bias`` (None when the model
has no such bias), so a forward pass reads ``linear(h, w.q_proj.weight, w.q_proj.bias)`` whether
the family has biases or not.
"""
from types import SimpleNamespace


def modules(weights, prefix, names):
    """``{last part of name: (weight, bias or None)}`` of the modules ``prefix + name``, as
    attributes."""
    return SimpleNamespace(**{
        name.split(".")[-1]: SimpleNamespace(weight=weights.get(f"{prefix}{name}.weight"),
                                             bias=weights.get(f"{prefix}{name}.bias"))
        for name in names})
