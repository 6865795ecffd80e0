"""Preparing a text for the model: tokenized once with its context, split at the context's
boundary, the BOS put first, cut into sliding windows (:func:`prepare`); and the way back, the
windows' predictions assembled into a :class:`~npllm.score.results.TextScore`
(:func:`assemble`). Also the settings' checks and how the input is cut into chunks.
"""
from dataclasses import dataclass

import numpy as np

from npllm.errors import ScoreError
from npllm.score.results import BASES, TextScore, show

# The texts of a chunk are sorted by length before they are cut into batches, so that a batch
# pads little: a chunk is up to this many batches' worth of texts, cut at fixed positions of
# the input (see chunks()). Short sentences in input order padded 38% of the positions in
# batches of 16; sorted over 8 batches, far less.
SORT_BATCHES = 8
# ... and a chunk of long texts ends after this many characters (about 8 full forward passes),
# so that results, and the progress bar, keep coming.
CHUNK_CHARACTERS = 65536


@dataclass
class Row:
    """One forward pass's worth of one text: input ids and which predictions to keep."""
    item: int
    ids: np.ndarray          # int64 [L]
    logit_rows: np.ndarray   # which logits rows to read
    targets: np.ndarray      # the ids they predict
    token_index: np.ndarray  # index into the text's tokens
    context_lengths: np.ndarray
    given_token: np.ndarray  # full-text token index where the context begins (-1: the BOS)


@dataclass
class Prepared:
    index: int
    text: str
    context: str | None
    ids: list                # tokens of context + text
    offsets: list
    first: int               # first token of the text
    bos_added: bool
    rows: list
    notes: list
    slid: bool


def check_settings(model, base, window, stride, batch_size):
    base = str(base)
    if base not in BASES:
        raise ScoreError(f"base must be 'e' (nats) or 2 (bits), got {base!r}")
    limit = int(model.config.max_position_embeddings)
    if window is None:
        window = limit
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 2:
        raise ScoreError(f"window must be a whole number of tokens >= 2, got {window!r}")
    if window > limit:
        raise ScoreError(f"window {window} is longer than the model's context of {limit} "
                         "positions (max_position_embeddings); give at most that")
    window = int(window)
    if stride is None:
        stride = max(1, window // 2)
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) \
            or not 1 <= stride <= window - 1:
        raise ScoreError(f"stride must be a whole number of tokens in [1, window - 1] = "
                         f"[1, {window - 1}], got {stride!r} (each window keeps the last "
                         "window - stride tokens before the scored ones as context)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ScoreError(f"batch_size must be a positive whole number, got {batch_size!r}")
    return base, window, int(stride), int(batch_size)


def prepare(index, text, context, tok, bos, window, stride, slide, split_special_tokens=False):
    """Tokenize ``context + text`` once, split it, add the BOS, cut it into windows."""
    if not isinstance(text, str):
        raise ScoreError(f"text must be a string, got {type(text).__name__}", index)
    if context is not None and not isinstance(context, str):
        raise ScoreError(f"context must be a string or None, got {type(context).__name__}", index)
    context = context or None  # "" is no context
    if text == "":
        if context:
            raise ScoreError(f"the context {show(context, 40, left=True)!r} has no "
                             "continuation: give the text to score after it", index)
        raise ScoreError("the text is empty: there is nothing to score", index)
    full = (context or "") + text
    try:
        full.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ScoreError(f"the text is not valid Unicode ({e.reason} at character {e.start})",
                         index) from None
    ids, offsets = tok.encode_with_offsets(full, split_special_tokens=split_special_tokens)
    ids, offsets = list(ids), [tuple(o) for o in offsets]
    notes = []
    boundary = len(context or "")
    first = next(i for i, (_, e) in enumerate(offsets) if e > boundary) if boundary else 0
    if boundary and offsets[first][0] < boundary:
        s, e = offsets[first]
        notes.append(f"the token {full[s:e]!r} straddles the boundary between context and text "
                     f"(characters {s}-{e}, boundary at {boundary}); it is scored as part of the "
                     "text, conditioned on the context's tokens before it")

    bos_added = False
    if bos.id is not None:
        if ids[:1] == [bos.id]:
            notes.append(f"the text already starts with {bos.token}: not added again")
        else:
            bos_added = True
    seq = ([bos.id] if bos_added else []) + ids
    o = 1 if bos_added else 0
    n = len(seq)
    p_start = max(first + o, 1)  # position 0 has nothing before it
    if p_start > n - 1:
        if bos.id is not None:  # the text is the BOS itself, not added again
            raise ScoreError(f"nothing to score: the text is only the document-start token "
                             f"{bos.token} (the BOS), with nothing after it; to score those "
                             "characters as plain text, split special tokens (CLI: "
                             "--split-special-tokens)", index)
        raise ScoreError("nothing to score: the text is a single token, and without a BOS the "
                         "first token has no context (turn the BOS on)", index)
    seq = np.asarray(seq, dtype=np.int64)

    def given(a):  # full-text token index where a window's context begins
        return a - o

    spans = []
    if n - 1 <= window:  # one forward pass over the whole text
        spans = [(0, n - 1, p_start)]
    elif not slide:
        raise ScoreError(f"the text needs {n - 1} model inputs ({len(ids)} tokens"
                         f"{' after the BOS' if bos_added else ''}), more than the window of "
                         f"{window}; allow a sliding window (slide=True, the default; CLI: drop "
                         "--no-slide) or shorten the text", index)
    else:
        q = p_start
        b = window if q <= window else min(q + stride - 1, n - 1)
        while True:
            spans.append((0 if b <= window else b - window, b, q))
            q = b + 1
            if q > n - 1:
                break
            b = min(q + stride - 1, n - 1)
        notes.append(f"{n - 1} model inputs, more than the window of {window}: scored with a "
                     f"sliding window in {len(spans)} passes (stride {stride}); "
                     "context_lengths says how much context each token had")

    rows = []
    for a, b, q in spans:
        inputs = seq[a:b].copy()
        restart = a > 0 and bos_added and bos.every_window
        if restart:  # the window's first token becomes the BOS (models trained with BOS first)
            inputs[0] = bos.id
        positions = np.arange(q, b + 1)
        context_from = given(a + 1) if restart else given(a)
        rows.append(Row(index, inputs, positions - a - 1, seq[positions], positions - o - first,
                         positions - a, np.full(len(positions), context_from)))
    return Prepared(index, text, context, ids, offsets, first, bos_added, rows, notes,
                     len(spans) > 1)


def assemble(prep, results, tok, bos, base, window, stride, with_rank, with_entropy,
              with_greedy):
    n = len(prep.ids) - prep.first
    div = BASES[base]
    log_probs, ctx = [None] * n, [None] * n
    extra = {name: [None] * n for name, on in
             (("ranks", with_rank), ("entropies", with_entropy), ("is_greedy", with_greedy)) if on}
    given_token = [None] * n
    for row, res in zip(prep.rows, results):
        for j, t in enumerate(row.token_index):
            log_probs[t] = float(res["log_probs"][j] / div)
            ctx[t] = int(row.context_lengths[j])
            given_token[t] = int(row.given_token[j])
            for name in extra:
                v = res[name][j]
                extra[name][t] = (float(v / div) if name == "entropies" else
                                  bool(v) if name == "is_greedy" else int(v))
    assert all(lp is not None for lp in log_probs[1:]), "a token was not predicted"
    first, offsets = prep.first, prep.offsets
    full = (prep.context or "") + prep.text
    given_from = []
    for t in range(n):
        g = given_token[t]
        given_from.append(offsets[g][0] if g is not None and g >= 0 else 0)
    notes = list(prep.notes)
    boundary = len(prep.context or "")
    scored_from = min(boundary, offsets[first][0])
    if log_probs[0] is None:
        given_from[0] = offsets[first][0]
        scored_from = offsets[first][1] if n > 1 else len(full)
        notes.append(f"the first token {full[offsets[first][0]:offsets[first][1]]!r} has no "
                     "context (no BOS): it is reported as unscored (None) and left out of the "
                     "total, mean, perplexity and bytes")
    ids = prep.ids[first:]
    return TextScore(
        text=prep.text, context=prep.context, tokens=[tok.decode([i]) for i in ids],
        token_ids=[int(i) for i in ids], offsets=[tuple(o) for o in offsets[first:]],
        log_probs=log_probs, context_lengths=ctx, base=base, bos=bos,
        bos_added=prep.bos_added, window=window, stride=stride, slid=prep.slid,
        notes=notes, index=prep.index, n_context_tokens=first,
        given_from=given_from, scored_from=scored_from, **extra)


def normalise_items(texts, context):
    single = isinstance(texts, str)
    texts = [texts] if single else as_list(texts, "texts")
    if context is None or isinstance(context, str):
        contexts = [context] * len(texts)
    else:
        contexts = as_list(context, "context")
        if len(contexts) != len(texts):
            raise ScoreError(f"context must be one string or one per text: got {len(contexts)} "
                             f"contexts for {len(texts)} texts")
    return single, list(zip(texts, contexts))


def as_list(value, name):
    """A list of the strings given as ``name`` (a list, tuple or other iterable of them)."""
    if isinstance(value, (bytes, bytearray)):
        raise ScoreError(f"{name} is bytes: decode it to a string first (.decode('utf-8'))")
    if value is None or isinstance(value, dict) or not hasattr(value, "__iter__"):
        raise ScoreError(f"{name} must be a string or a list of strings, got "
                         f"{type(value).__name__}")
    return list(value)


def chunks(items, batch_size):
    """The input's chunks, ``[range(start, stop), ...]``: items scored together (sorted by
    length, then cut into batches of ``batch_size``), ``SORT_BATCHES * batch_size`` items each,
    fewer where their texts and contexts pass ``CHUNK_CHARACTERS``. They depend on the items
    only, not on where a run starts."""
    out, start, characters = [], 0, 0
    for i, (text, context) in enumerate(items):
        n = sum(len(s) for s in (text, context) if isinstance(s, str))
        if i > start and (i - start >= SORT_BATCHES * batch_size
                          or characters + n > CHUNK_CHARACTERS):
            out.append(range(start, i))
            start, characters = i, 0
        characters += n
    if start < len(items):
        out.append(range(start, len(items)))
    return out
