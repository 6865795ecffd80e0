"""What a forward pass checks before it starts, and the positions and mask it computes with.

Kept out of the forward pass itself so that it reads like the architecture: by the time
:func:`npllm.model.llama.forward` runs, the token ids are a valid [B, T] integer array.
"""
from dataclasses import dataclass

import numpy as np

from npllm.equations import causal_mask
from npllm.errors import ArgumentError

MASKED = np.finfo(np.float32).min  # a masked score: transformers' choice, no NaN on padded rows


@dataclass
class Inputs:
    """Checked inputs of one call of a model: ids [B, T], and how to shape the answer."""
    ids: np.ndarray          # int [B, T]
    single: bool             # the caller gave ids [T]: drop the batch axis of the answer
    kept: int                # the answer covers the last ``kept`` positions
    targets: np.ndarray      # int [B, kept], or None: logits are wanted, not log P(targets)


def check_inputs(config, input_ids, cache=None, attention_mask=None, logits_to_keep=None,
                 targets=None):
    """Check one call's arguments against ``config``; raise :class:`~npllm.errors.ArgumentError`
    (a ``ValueError``) naming the problem, or return :class:`Inputs`."""
    ids = np.asarray(input_ids)
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise ArgumentError(f"input_ids must be integers of shape [T] or [B, T], got "
                         f"{ids.dtype} {ids.shape}")
    single = ids.ndim == 1
    ids = ids.reshape(1, -1) if single else ids
    B, T = ids.shape
    if T == 0:
        raise ArgumentError("input_ids is empty: give at least one token")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ArgumentError(f"input_ids must lie in [0, {config.vocab_size}), got ids from "
                         f"{ids.min()} to {ids.max()}")
    past = 0 if cache is None else cache.length
    if past + T > config.context_length:
        raise ArgumentError(
            f"{past + T} positions ({past} cached + {T} new) exceed the model's context of "
            f"{config.context_length} (max_position_embeddings / sliding_window in config.json); "
            "score long texts in windows (npllm.score's window=) or start a new cache")
    if cache is not None and cache.keys and cache.keys[0].shape[0] != B:
        raise ArgumentError(f"the cache holds {cache.keys[0].shape[0]} sequences, input_ids {B}")
    if attention_mask is not None and np.shape(attention_mask) != (B, past + T):
        raise ArgumentError(f"attention_mask must have shape (batch, cached + new tokens) = "
                         f"{(B, past + T)}, got {np.shape(attention_mask)}")
    if logits_to_keep is not None and not 0 < logits_to_keep <= T:
        raise ArgumentError(f"logits_to_keep must be between 1 and the {T} new tokens, "
                         f"got {logits_to_keep}")
    kept = logits_to_keep or T
    if targets is not None:
        targets = check_targets(config, targets, ids.shape[single:-1] + (kept,)).reshape(B, kept)
    return Inputs(ids, single, kept, targets)


def check_targets(config, targets, shape):
    """``targets`` as an integer array of ``shape`` holding token ids, or an ArgumentError."""
    targets = np.asarray(targets)
    if targets.shape != shape or not np.issubdtype(targets.dtype, np.integer):
        raise ArgumentError(f"targets must be integers shaped like the kept positions {shape}, "
                         f"got {targets.dtype} {targets.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= config.vocab_size):
        raise ArgumentError(f"targets must lie in [0, {config.vocab_size})")
    return targets


def positions_and_mask(B, T, past, attention_mask):
    """Position ids [B, T] and the additive attention mask [B, 1, T, S], S = past + T.

    Without ``attention_mask`` every sequence is whole: positions past, ..., past + T - 1 and
    the causal mask. With ``attention_mask`` [B, S] (1 = real token, 0 = padding, covering cached
    and new positions) a padded position is never attended to and real tokens are numbered
    0, 1, 2, ... whatever padding stands before them, so a padded sequence gives the same numbers
    as the same sequence alone.
    """
    S = past + T
    causal = causal_mask(T, S)  # [T, S]
    if attention_mask is None:
        positions = np.broadcast_to(np.arange(past, S), (B, T))
        return positions, np.broadcast_to(causal, (B, 1, T, S))  # views: no copies
    attention_mask = np.asarray(attention_mask)
    positions = np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0)[:, past:]
    padded = attention_mask[:, None, None, :] == 0  # [B, 1, 1, S]
    return positions, np.where(padded, MASKED, causal[None, None]).astype(np.float32)
