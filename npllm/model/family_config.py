"""config.json of the lectures' other families -> :class:`FamilyConfig`, and any config -> its class.

Llama and Mistral keep :class:`~npllm.model.config.LlamaConfig`. StableLM, Phi-3, Qwen2 and GPT-2
(lecture 000 prints StableLM 3B, lecture 002 loads Phi-3-mini) are read into one
:class:`FamilyConfig`: the same field names as ``LlamaConfig`` where the models agree (V, D, F, L,
H, K, Dh), plus the switches where they differ. Absent keys get transformers' documented default
for that ``model_type``; what npllm does not implement is refused with one line naming the key.

How each family's keys map to the fields:

=========================  ==============  ==============  =====================  =============
field                      stablelm        phi3            qwen2                  gpt2
=========================  ==============  ==============  =====================  =============
norm (``norm``)            LayerNorm       RMSNorm         RMSNorm                LayerNorm
``norm_eps``               layer_norm_eps  rms_norm_eps    rms_norm_eps           layer_norm_epsilon
``qkv_bias``               use_qkv_bias    false           true                   true
``rotary_dim``             Dh * partial_   Dh * partial_   Dh                     0 (learned
                           rotary_factor   rotary_factor                          positions)
``parallel_residual``      use_parallel_   false           false                  false
                           residual
``sliding_window``         none            sliding_window  if use_sliding_window  none
=========================  ==============  ==============  =====================  =============

GPT-2 names its sizes n_embd, n_layer, n_head, n_inner (None: 4 D), n_positions.
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from npllm.errors import ConfigError
from npllm.model.config import LlamaConfig, _check_positive_int, _rope_theta

FAMILIES = ("stablelm", "phi3", "qwen2", "gpt2")
SUPPORTED = ("llama", "mistral") + FAMILIES
ARCHITECTURES = {"stablelm": "StableLmForCausalLM", "phi3": "Phi3ForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
GPT2_NAMES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers",
              "n_head": "num_attention_heads", "n_positions": "max_position_embeddings",
              "n_inner": "intermediate_size", "layer_norm_epsilon": "norm_eps"}
# transformers' defaults (StableLmConfig, Phi3Config, Qwen2Config, GPT2Config) for absent keys.
DEFAULTS = {
    "stablelm": dict(vocab_size=50304, hidden_size=2560, intermediate_size=6912,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=4096, norm_eps=1e-5, tie_word_embeddings=False,
                     bos_token_id=0, eos_token_id=0, hidden_act="silu"),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=4096,
                 norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
                 hidden_act="silu"),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  max_position_embeddings=32768, norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, hidden_act="silu"),
    "gpt2": dict(vocab_size=50257, hidden_size=768, intermediate_size=None, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=None, max_position_embeddings=1024,
                 norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=50256,
                 eos_token_id=50256, hidden_act="gelu_new"),
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class FamilyConfig:
    """The architecture of a StableLM, Phi-3, Qwen2 or GPT-2 decoder (see the module docstring).

    Letters as in ``npllm/__init__.py``; ``rotary_dim`` is the number of coordinates of each head
    that RoPE rotates (Dh for Qwen2, a quarter of Dh for StableLM 3B, 0 for GPT-2).
    """
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str
    rope_theta: float = 10000.0
    rotary_dim: int = 0
    qkv_bias: bool = False
    parallel_residual: bool = False
    sliding_window: int = None
    bos_token_id: object = None
    eos_token_id: object = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                              f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ConfigError(f"the rotated part of each head (head_dim x partial_rotary_factor "
                              f"= {self.rotary_dim}) must be even and at most head_dim")
        if self.model_type != "gpt2" and self.rotary_dim == 0:
            raise ConfigError("partial_rotary_factor leaves no coordinate to rotate: RoPE needs "
                              "head_dim x partial_rotary_factor >= 2")
        if self.hidden_act not in ACTIVATIONS or (self.model_type == "gpt2") != (
                ACTIVATIONS[self.hidden_act] != "silu"):
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported for "
                              f"{self.model_type}: npllm implements "
                              + ("gelu_new / gelu" if self.model_type == "gpt2" else "silu"))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def num_key_value_groups(self):
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def context_length(self):
        """Longest sequence npllm computes exactly as transformers does (a sliding window is
        full causal attention up to its width, as for Mistral)."""
        return min(self.max_position_embeddings, self.sliding_window or math.inf)

    @property
    def activation(self):
        """The MLP's activation as npllm names it: "silu", "gelu_tanh" or "gelu"."""
        return ACTIVATIONS[self.hidden_act]

    @classmethod
    def from_dict(cls, d):
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(unsupported_message(model_type))
        d = {GPT2_NAMES.get(k, k): v for k, v in d.items()} if model_type == "gpt2" else dict(d)
        values = {k: d[k] if d.get(k) is not None else default
                  for k, default in DEFAULTS[model_type].items()}
        values["norm_eps"] = d.get("layer_norm_eps", d.get("rms_norm_eps", values["norm_eps"]))
        values["num_key_value_heads"] = values["num_key_value_heads"] or values[
            "num_attention_heads"]
        values["intermediate_size"] = values["intermediate_size"] or 4 * values["hidden_size"]
        values["hidden_act"] = d.get("activation_function", values["hidden_act"])
        head_dim = d.get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
        values.update(model_type=model_type, head_dim=head_dim)
        _refuse(model_type, d)
        if model_type != "gpt2":
            rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
            factor = rope.pop("partial_rotary_factor", d.get(
                "partial_rotary_factor", 0.25 if model_type == "stablelm" else 1.0))
            values["rope_theta"] = float(_rope_theta(
                {"rope_parameters": rope, "rope_theta": d.get("rope_theta")}, 10000.0))
            values["rotary_dim"] = int(head_dim * factor)
        values["qkv_bias"] = {"stablelm": bool(d.get("use_qkv_bias")), "phi3": False,
                              "qwen2": True, "gpt2": True}[model_type]
        values["parallel_residual"] = bool(d.get("use_parallel_residual"))
        if model_type == "phi3" or (model_type == "qwen2" and d.get("use_sliding_window")):
            values["sliding_window"] = d.get("sliding_window")
        return cls(**values)

    def to_dict(self):
        """This config as a dict with the family's architecture name (npllm's field names)."""
        return {"architectures": [ARCHITECTURES[self.model_type]], **asdict(self)}


def _refuse(model_type, d):
    """One clear line for what a family's config asks and npllm does not implement."""
    if model_type == "stablelm" and d.get("qk_layernorm"):
        raise ConfigError("qk_layernorm: true (StableLM 2 12B) is not supported: npllm implements "
                          "StableLM without the per-head LayerNorm of q and k")
    if model_type == "gpt2" and (d.get("scale_attn_by_inverse_layer_idx")
                                 or d.get("scale_attn_weights") is False):
        raise ConfigError("GPT-2 attention scaled other than by 1/sqrt(Dh) is not supported "
                          "(scale_attn_weights, scale_attn_by_inverse_layer_idx)")
    if model_type == "qwen2" and d.get("use_sliding_window") and d.get("max_window_layers"):
        raise ConfigError("use_sliding_window: true is not supported for Qwen2 (sliding window on "
                          "some layers only): use a config with use_sliding_window false")


def unsupported_message(model_type):
    return (f"model_type {model_type!r} is not supported: npllm implements "
            f"{', '.join(SUPPORTED)}; choose a model whose config.json says one of these")


def config_from_dict(d):
    """The config class of ``d``'s ``model_type``: LlamaConfig for llama and mistral,
    FamilyConfig for the other families, one clear ConfigError for anything else."""
    if not isinstance(d, dict):
        raise ConfigError(f"a model config must be a JSON object, got {type(d).__name__}")
    if d.get("model_type") in ("llama", "mistral"):
        return LlamaConfig.from_dict(d)
    return FamilyConfig.from_dict(d)


def read_config(path):
    """Read ``path`` (a config.json, or a folder holding one) with :func:`config_from_dict`."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} as a config.json ({type(e).__name__}: {e}); "
                          "a model folder needs the config.json save_pretrained writes") from None
    if isinstance(d, dict) and d.get("model_type") in ("llama", "mistral"):
        return LlamaConfig.from_file(path)  # its own messages for every problem
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def family_shapes(config):
    """``{name: (shape, symbolic shape)}`` of a family's tensors as its safetensors files hold
    them (GPT-2's Conv1D matrices [in, out]; every other matrix [out, in])."""
    c, L = config, config.num_hidden_layers
    V, D, F = c.vocab_size, c.hidden_size, c.intermediate_size
    Hd, Kd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    if c.model_type == "gpt2":
        shapes = {"transformer.wte.weight": ((V, D), "[V, D]"),
                  "transformer.wpe.weight": ((c.max_position_embeddings, D), "[P, D]")}
        for i in range(L):
            p = f"transformer.h.{i}."
            shapes.update({
                p + "ln_1.weight": ((D,), "[D]"), p + "ln_1.bias": ((D,), "[D]"),
                p + "attn.c_attn.weight": ((D, 3 * D), "[D, 3D]"),
                p + "attn.c_attn.bias": ((3 * D,), "[3D]"),
                p + "attn.c_proj.weight": ((D, D), "[D, D]"), p + "attn.c_proj.bias": ((D,), "[D]"),
                p + "ln_2.weight": ((D,), "[D]"), p + "ln_2.bias": ((D,), "[D]"),
                p + "mlp.c_fc.weight": ((D, F), "[D, F]"), p + "mlp.c_fc.bias": ((F,), "[F]"),
                p + "mlp.c_proj.weight": ((F, D), "[F, D]"), p + "mlp.c_proj.bias": ((D,), "[D]")})
        shapes.update({"transformer.ln_f.weight": ((D,), "[D]"),
                       "transformer.ln_f.bias": ((D,), "[D]"),
                       "lm_head.weight": ((V, D), "[V, D]")})
        return shapes
    norm = ("weight", "bias") if c.model_type == "stablelm" else ("weight",)
    shapes = {"model.embed_tokens.weight": ((V, D), "[V, D]")}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({f"{p}input_layernorm.{n}": ((D,), "[D]") for n in norm})
        if c.model_type == "phi3":
            shapes[p + "self_attn.qkv_proj.weight"] = ((Hd + 2 * Kd, D), "[(H+2K)*Dh, D]")
        else:
            for name, rows, symbol in (("q", Hd, "H*Dh"), ("k", Kd, "K*Dh"), ("v", Kd, "K*Dh")):
                shapes[f"{p}self_attn.{name}_proj.weight"] = ((rows, D), f"[{symbol}, D]")
                if c.qkv_bias:
                    shapes[f"{p}self_attn.{name}_proj.bias"] = ((rows,), f"[{symbol}]")
        shapes[p + "self_attn.o_proj.weight"] = ((D, Hd), "[D, H*Dh]")
        if not c.parallel_residual:
            shapes.update({f"{p}post_attention_layernorm.{n}": ((D,), "[D]") for n in norm})
        if c.model_type == "phi3":
            shapes[p + "mlp.gate_up_proj.weight"] = ((2 * F, D), "[2F, D]")
        else:
            shapes[p + "mlp.gate_proj.weight"] = ((F, D), "[F, D]")
            shapes[p + "mlp.up_proj.weight"] = ((F, D), "[F, D]")
        shapes[p + "mlp.down_proj.weight"] = ((D, F), "[D, F]")
    shapes.update({f"model.norm.{n}": ((D,), "[D]") for n in norm})
    shapes["lm_head.weight"] = ((V, D), "[V, D]")
    return shapes


def embedding_name(config):
    """The token embedding's tensor name (what a tied LM head shares)."""
    return "transformer.wte.weight" if config.model_type == "gpt2" else "model.embed_tokens.weight"
