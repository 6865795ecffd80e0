"""npllm: decoder-only language models in NumPy, one lecture equation per function.

Notation used for array shapes throughout the package (docstrings and comments):

    B   batch size (sequences)          T   tokens (query positions)
    S   key/value positions (T plus what the KV cache already holds)
    D   model width (hidden size)       V   vocabulary size
    H   query heads                     K   key/value heads (grouped-query attention: H = K * G)
    Dh  head width (D = H * Dh for Llama-family models)
    F   MLP (intermediate) width        L   number of decoder layers

All computation is float32. ``npllm.equations`` holds the readable NumPy functions,
``npllm.model.llama`` composes them into the forward pass (the reference, for reading),
``npllm.kernels`` holds their Numba twins and ``npllm.engine`` runs the forward pass fast,
tested equal to the reference.
"""
__version__ = "0.1.0"

from npllm.model import KVCache, Model, load  # noqa: E402
from npllm.score import corpus_perplexity, score  # noqa: E402
from npllm.generate import chat, generate  # noqa: E402
from npllm.training import train  # noqa: E402

__all__ = ["KVCache", "Model", "load", "score", "corpus_perplexity", "generate", "chat", "train",
           "__version__"]
