"""Tiny, seeded Llama-family models for tests: real transformers checkpoints in a few kilobytes.

Import it from any test module as a plain module (pytest puts ``tests/`` on ``sys.path``, because
``tests/`` has a ``conftest.py`` and no ``__init__.py``; this works with ``pytest``, ``python -m
pytest`` and under pytest-xdist)::

    from tiny_models import make_tiny_llama, tiny_llama, load_reference

    def test_something(tmp_path):
        folder = make_tiny_llama(tmp_path / "m", tie_word_embeddings=True)   # a fresh folder
        reference = load_reference(folder)     # transformers' model, float32, eval, eager attention

    def test_read_only_use():
        folder = tiny_llama(num_key_value_heads=1)   # built once per process, shared: do not modify

(``from tests.tiny_models import ...`` only works when the repository root is on ``sys.path``,
e.g. under ``python -m pytest``; prefer the form above.)

What a folder holds (as ``save_pretrained`` writes it, plus a tokenizer shaped like SmolLM2's):

- ``config.json`` and ``model.safetensors`` (or shards with ``max_shard_size``): a
  ``LlamaForCausalLM`` (or ``MistralForCausalLM``) with D=64, L=2, F=128, H=4, K=2 (Dh=16),
  max_position_embeddings=256, rms_norm_eps=1e-6, every parameter drawn from ``seed`` (norm
  weights too, so a test notices a norm weight that is ignored or swapped);
- ``tokenizer.json``: a byte-level BPE trained on :data:`CORPUS` (deterministic, vocabulary
  :data:`TOKENIZER_VOCAB_SIZE`), SmolLM2's pre-tokenizer (digits split one by one, then the GPT-2
  byte-level split) and special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at ids
  0, 1, 2;
- ``tokenizer_config.json``: SmolLM2-Instruct's (bos ``<|im_start|>``, eos ``<|im_end|>``, its
  ChatML chat template with the default system prompt), and ``special_tokens_map.json``;
- the model's ``bos_token_id`` = 1, ``eos_token_id`` = 2, ``pad_token_id`` = 2 (as SmolLM2's).

The model's vocabulary equals the tokenizer's unless ``vocab_size`` asks for a larger one (real
models pad the embedding matrix; the extra rows have no token).
"""
import json
import tempfile
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB_SIZE = 384
# SmolLM2-135M-Instruct's chat template (tokenizer_config.json), verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model assigns a probability to every
sequence of tokens: the probability of a sentence is the product of the probabilities of each
token given the tokens before it. In log space the product becomes a sum, which is why we add
log probabilities instead of multiplying small numbers. The model reads the tokens, turns each
one into a vector, and lets every position attend to the positions before it. Attention compares
a query with all the keys, turns the scores into weights with a softmax, and mixes the values.
Rotary position embeddings rotate pairs of coordinates by an angle that grows with the position.
The feed-forward network widens the vector, applies a gate, and narrows it again. A normalisation
keeps the numbers in a good range. At the end, the language model head turns the last vector into
one score per token of the vocabulary, and the softmax turns the scores into probabilities.
Greedy decoding picks the most likely token; sampling draws one at random, after temperature,
top-k and top-p have reshaped the distribution. The cache keeps the keys and values of the tokens
already seen, so each new token costs one step instead of a whole pass over the prefix.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 and 1,000,000 tokens per second.
Code: def add(a, b): return a + b  # comments, (parentheses), [brackets], {braces} and "quotes".
Accents and symbols: café, naïve, über, 東京, emoji 🙂, the end.
"""

_TOKENIZER_JSON = None  # trained once per process (deterministic)
_CACHE = {}  # tiny_llama(): kwargs -> folder
_CACHE_ROOT = None


def train_tokenizer():
    """The tiny tokenizer: a ``tokenizers.Tokenizer`` (byte-level BPE, SmolLM2's pre-tokenizer)."""
    global _TOKENIZER_JSON
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if _TOKENIZER_JSON is None:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator([CORPUS], trainer=trainer)
        for i, token in enumerate(SPECIAL_TOKENS):
            assert tokenizer.token_to_id(token) == i, (token, tokenizer.token_to_id(token))
        _TOKENIZER_JSON = tokenizer.to_str()
    return Tokenizer.from_str(_TOKENIZER_JSON)


def save_tokenizer(folder):
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 256,
        "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
        "vocab_size": tokenizer.get_vocab_size(),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
               "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
               "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return tokenizer.get_vocab_size()


def make_tiny_llama(path, *, num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=False, rope_theta=10000.0, dtype="float32", seed=0,
                    model_type="llama", vocab_size=None, max_shard_size=None, **overrides):
    """Build a seeded tiny model folder at ``path`` (created if needed) and return it as a Path.

    ``dtype``: "float32", "bfloat16" or "float16", the dtype the weights are stored in.
    ``model_type``: "llama" or "mistral". ``max_shard_size`` (e.g. "20KB"): write a sharded
    checkpoint with ``model.safetensors.index.json``. ``overrides`` go to the transformers config
    (``hidden_size``, ``num_hidden_layers``, ``intermediate_size``, ``head_dim``, ``rms_norm_eps``,
    ``max_position_embeddings``, ``sliding_window``, ...).
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars
    path = Path(path)
    n_tokens = save_tokenizer(path)
    if vocab_size is None:
        vocab_size = n_tokens
    elif vocab_size < n_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {n_tokens}")
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=num_attention_heads,
                    num_key_value_heads=num_key_value_heads, max_position_embeddings=256,
                    rms_norm_eps=1e-6, rope_theta=rope_theta,
                    tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
                    pad_token_id=2, hidden_act="silu")
    settings.update(overrides)
    if model_type == "llama":
        config, model_class = transformers.LlamaConfig(**settings), transformers.LlamaForCausalLM
    elif model_type == "mistral":
        config, model_class = (transformers.MistralConfig(**settings),
                               transformers.MistralForCausalLM)
    else:
        raise ValueError(f"model_type must be 'llama' or 'mistral', got {model_type!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:  # RMSNorm weights: around 1, but not 1
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
                elif "embed_tokens" in name:
                    p.copy_(torch.randn(p.shape, generator=generator))
                else:  # std 1/sqrt(fan_in): activations and logits of order 1
                    p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
    model = model.to(getattr(torch, dtype)).eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def tiny_llama(**kwargs):
    """``make_tiny_llama(**kwargs)`` built once per process in a temporary folder: read it only."""
    global _CACHE_ROOT
    key = tuple(sorted(kwargs.items()))
    if key not in _CACHE:
        if _CACHE_ROOT is None:
            _CACHE_ROOT = tempfile.TemporaryDirectory(prefix="npllm-tiny-")
        _CACHE[key] = make_tiny_llama(Path(_CACHE_ROOT.name) / f"m{len(_CACHE)}", **kwargs)
    return _CACHE[key]


def load_reference(path):
    """transformers' model for the folder: float32, eval mode, eager attention (the plain math)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def load_reference_tokenizer(path):
    """transformers' tokenizer for the folder (the reference for npllm's tokenizer and chat)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)
