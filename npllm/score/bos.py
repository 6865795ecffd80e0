"""The BOS policy: which token is put before every text, so that its first token has a context.

See :func:`resolve_bos`; every result names the token it used (:class:`Bos`).
"""
from dataclasses import dataclass

import numpy as np

from npllm.errors import ScoreError

AUTO_BOS_SEPARATOR = "<|endoftext|>"  # GPT-2-style byte-level BPE models: the document separator


@dataclass(frozen=True)
class Bos:
    """The token put before every text so that its first token has a context (or none)."""
    id: int | None
    token: str | None
    policy: str       # what was asked: "auto", "none", or the token asked for
    reason: str       # why this token (printed in metadata and docs)
    every_window: bool = False  # sliding windows after the first also start with it

    def to_dict(self):
        return {"policy": self.policy, "id": self.id, "token": self.token, "reason": self.reason,
                "every_window": self.every_window}


def resolve_bos(model, bos="auto"):
    """The document-start token for ``model`` under policy ``bos``, as a :class:`Bos`.

    ``bos``: ``"auto"`` or ``True``: the tokenizer's BOS when its config prepends one
    (``add_bos_token``: Llama 2/3, Mistral); else ``<|endoftext|>`` when the vocabulary has it as
    a special token (the separator between training documents of GPT-2-style byte-level BPE
    models: SmolLM2, Qwen2, GPT-2; lm-evaluation-harness's rolling log-likelihood prefixes the
    same token); else the tokenizer's ``bos_token``; else none.
    ``False``, ``None`` or ``"none"``: no BOS (the first token is unscored).
    A token string (``"<|im_start|>"``) or an id: that token.

    Sliding windows after the first start with the BOS too only when the tokenizer prepends it
    to every text (``every_window``: such models always saw it at position 0); otherwise they
    start mid-text, as the packed sequences such models were trained on do (on SmolLM2, putting
    ``<|endoftext|>`` first in every window made the scores no closer to full-context ones).
    """
    tok = tokenizer_of(model)
    if isinstance(bos, Bos):
        return bos
    if bos is None or bos is False or (isinstance(bos, str) and bos.lower() in ("none", "off")):
        return Bos(None, None, "none", "turned off: the first token has no context and is "
                                       "not scored")
    if isinstance(bos, (int, np.integer)) and not isinstance(bos, bool):
        if not 0 <= bos < model.config.vocab_size:
            raise ScoreError(f"bos id must be in [0, {model.config.vocab_size}), got {bos}")
        return Bos(int(bos), tok.id_to_token(int(bos)), str(int(bos)), "chosen by the user")
    if bos is True or bos == "auto":
        config = getattr(tok, "config", {}) or {}
        if config.get("add_bos_token") and tok.bos_token_id is not None:
            return Bos(tok.bos_token_id, tok.id_to_token(tok.bos_token_id), "auto",
                       "the tokenizer prepends it to every text (add_bos_token)",
                       every_window=True)
        eot = tok.token_to_id(AUTO_BOS_SEPARATOR)
        if eot is not None and eot in getattr(tok, "added_special_ids", {eot}):
            return Bos(eot, AUTO_BOS_SEPARATOR, "auto",
                       "the special token that separates documents in training")
        if tok.bos_token_id is not None:
            return Bos(tok.bos_token_id, tok.id_to_token(tok.bos_token_id), "auto",
                       "the tokenizer's bos_token")
        return Bos(None, None, "auto", "the model has no document-start token: the first "
                                       "token has no context and is not scored")
    if isinstance(bos, str):
        token_id = tok.token_to_id(bos)
        if token_id is None:
            ids = tok.encode(bos) if bos else []
            hint = (f" (as text it is the one token {tok.id_to_token(ids[0])!r}, id {ids[0]}: "
                    "give that spelling or the id)" if len(ids) == 1 else "")
            raise ScoreError(f"bos {bos!r} is not a token of this model's vocabulary{hint}; "
                             "give 'auto', 'none', a token such as '<|endoftext|>' (as the "
                             "vocabulary spells it), or a token id")
        return Bos(token_id, bos, bos, "chosen by the user")
    raise ScoreError(f"bos must be 'auto', True, False/'none', a token string or an id, "
                     f"got {bos!r}")


def tokenizer_of(model):
    if getattr(model, "tokenizer", None) is None:
        raise ScoreError("this model has no tokenizer (no tokenizer.json in its folder): "
                         "scoring text needs one")
    return model.tokenizer
