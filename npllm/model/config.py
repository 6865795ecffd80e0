"""config.json -> :class:`LlamaConfig`: the numbers that fix a Llama-family model's shapes.

A Hugging Face model folder describes its architecture in ``config.json``. npllm reads every
constant of the forward pass from it (RMSNorm's eps, RoPE's theta, the head width, the number of
key/value heads, whether the LM head is tied to the embeddings) and hard-codes none: where a key is
absent, the value is transformers' documented default for that ``model_type``, exactly as
``transformers.LlamaConfig`` / ``MistralConfig`` would fill it in.

Supported: ``model_type`` ``llama`` and ``mistral`` (same decoder: RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP, no biases). The lectures' other families (StableLM, Phi-3, Qwen2, GPT-2)
have their own config class, :class:`npllm.model.family_config.FamilyConfig`;
:func:`npllm.model.family_config.read_config` picks the class by ``model_type``. What npllm
does not implement is refused with a :class:`~npllm.errors.ConfigError` naming the key, rather
than silently computing something else: RoPE scaling (``rope_type`` other than ``default``:
linear, dynamic, yarn, llama3, ...), partial rotary embeddings, attention or MLP biases, activations other than SiLU.

The sizes (``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
``num_attention_heads``) are required: transformers would default them to Llama-2-7B's, which for
any real folder only turns a missing key into a confusing shape error at load time.

Mistral's sliding window: transformers' Mistral lets token i attend only to the last
``sliding_window`` positions. npllm implements full causal attention, which is *identical* for
sequences of at most ``sliding_window`` tokens, so such configs are accepted and
:attr:`LlamaConfig.context_length` is ``min(max_position_embeddings, sliding_window)``: the longest
sequence for which npllm's numbers equal transformers'. Callers (forward pass, generation) should
refuse longer inputs.

RoPE's theta can be written two ways in config.json, and both are read (the newer one wins, as in
transformers 5):

    "rope_theta": 100000.0                                           (transformers 4.x)
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}   (transformers 5)

(the deprecated ``rope_scaling`` key, when not null, is read like ``rope_parameters``).
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from npllm.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# transformers treats both names as SiLU (ACT2FN["silu"], ACT2FN["swish"]).
SILU_NAMES = ("silu", "swish")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads")

# transformers' documented defaults (LlamaConfig, MistralConfig, RotaryEmbeddingConfigMixin),
# used only for keys config.json leaves out. None for num_key_value_heads / head_dim means
# "derive": num_attention_heads and hidden_size // num_attention_heads.
HF_DEFAULTS = {
    "llama": dict(num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=None),
    "mistral": dict(num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=4096),
}


@dataclass(frozen=True)
class LlamaConfig:
    """The architecture of a Llama-family decoder (field names as in HF's config.json).

    Shapes in terms of the fields (letters as in ``npllm/__init__.py``): V = vocab_size,
    D = hidden_size, F = intermediate_size, L = num_hidden_layers, H = num_attention_heads,
    K = num_key_value_heads, Dh = head_dim. Frozen: use ``dataclasses.replace(config, ...)`` to
    vary a field (the replaced copy is validated again).

    ``eos_token_id`` is an int, a tuple of ints (config.json may list several stop ids) or None.
    """
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = None  # None -> num_attention_heads (no grouped-query attention)
    head_dim: int = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: object = 2
    model_type: str = "llama"
    hidden_act: str = "silu"
    sliding_window: int = None  # Mistral only; see the module docstring

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(_unsupported_type_message(self.model_type))
        for name in REQUIRED_KEYS + ("max_position_embeddings",):
            _check_positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        _check_positive_int("num_key_value_heads", self.num_key_value_heads)
        _check_positive_int("head_dim", self.head_dim)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads}), as transformers "
                              "requires")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                              f"multiple of num_key_value_heads ({self.num_key_value_heads}): each "
                              "key/value head serves a whole group of query heads")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of "
                              "coordinates")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
            set_(name, float(value))
        if self.hidden_act not in SILU_NAMES:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported: npllm implements "
                              "the Llama MLP with SiLU (hidden_act 'silu')")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError("tie_word_embeddings must be true or false, got "
                              f"{self.tie_word_embeddings!r}")
        if self.sliding_window is not None:
            _check_positive_int("sliding_window", self.sliding_window)
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if isinstance(value, list):
                value = tuple(value)
                set_(name, value)
            ids = value if isinstance(value, tuple) else (value,)
            if name == "bos_token_id" and isinstance(value, tuple):
                raise ConfigError(f"bos_token_id must be one token id or null, got {value!r}")
            for i in ids:
                if i is not None and (isinstance(i, bool) or not isinstance(i, int) or i < 0):
                    raise ConfigError(f"{name} must be a token id (int >= 0), a list of them or "
                                      f"null, got {value!r}")

    # ---- derived numbers -------------------------------------------------------------------
    @property
    def num_key_value_groups(self):
        """G = H / K, the query heads sharing one key/value head (HF's name)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def context_length(self):
        """Longest sequence npllm computes exactly as transformers does (see module docstring)."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    # ---- reading and writing config.json ---------------------------------------------------
    @classmethod
    def from_dict(cls, d):
        """Build from a config.json dict (HF defaults for absent keys; unsupported: refused)."""
        if not isinstance(d, dict):
            raise ConfigError("a model config must be a JSON object (dict), got "
                              f"{type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no model_type; npllm implements the Llama family "
                              f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)})")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(_unsupported_type_message(model_type))
        missing = [k for k in REQUIRED_KEYS if d.get(k) is None]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}: npllm needs the model's "
                              f"sizes ({', '.join(REQUIRED_KEYS)})")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ConfigError(f"{key}: true is not supported: npllm implements Llama without "
                                  "biases in the attention and MLP projections")
        defaults = HF_DEFAULTS[model_type]
        values = {k: d[k] for k in REQUIRED_KEYS}
        # head_dim / num_key_value_heads written as null mean "derive", as in transformers.
        values.update({key: d.get(key, default) for key, default in defaults.items()})
        values["rope_theta"] = _rope_theta(d, defaults["rope_theta"])
        if model_type == "llama":  # transformers' Llama has no sliding window
            values["sliding_window"] = None
        values["model_type"] = model_type
        return cls(**values)

    @classmethod
    def from_file(cls, path):
        """Read ``path`` (a config.json, or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a model folder needs the config.json that "
                              "transformers' save_pretrained writes") from None
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              "re-download or re-create it") from None
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            why = e if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise ConfigError(f"{path} is not valid JSON ({why}); re-download or re-create it") \
                from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self):
        """A config.json dict that transformers (4.x, 5.x) and :meth:`from_dict` both read back."""
        d = {"architectures": [ARCHITECTURES[self.model_type]]}
        d.update(asdict(self))
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        if self.model_type == "llama":
            d.pop("sliding_window")
            d.update(attention_bias=False, mlp_bias=False)
        return d

    def save(self, folder):
        """Write ``folder/config.json`` (see :meth:`to_dict`)."""
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _rope_theta(d, default):
    """theta from ``rope_parameters``, ``rope_scaling`` or ``rope_theta`` (transformers' order)."""
    rope = d.get("rope_scaling") or d.get("rope_parameters")
    if rope is None:
        rope = {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_parameters must be an object like {{\"rope_type\": \"default\", "
                          f"\"rope_theta\": 10000.0}}, got {rope!r}")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported: npllm implements one "
                          "RoPE for all layers")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"RoPE scaling rope_type {rope_type!r} is not supported: npllm "
                          "implements the original RoPE only (rope_type 'default'); use a model "
                          "without rope scaling")
    factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if factor is not None and factor != 1:
        raise ConfigError(f"partial_rotary_factor {factor!r} is not supported: npllm rotates the "
                          "whole head (partial_rotary_factor 1)")
    theta = rope.get("rope_theta")
    if theta is None:
        theta = d.get("rope_theta")
    return default if theta is None else theta


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _unsupported_type_message(model_type):
    return (f"model_type {model_type!r} is not supported: npllm implements the Llama family "
            f"(model_type {', '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)}); choose a model "
            "whose config.json says one of these")
