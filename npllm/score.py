r"""Sentence log-probabilities: lecture 000's chain rule, computed with a real model.

A decoder-only model gives a text the product of its conditionals,

.. math::
    P(s) = \prod_{i=1}^{|s|} P(s_i \mid s_{<i}), \qquad
    \log P(s) = \sum_{i=1}^{|s|} \log P(s_i \mid s_{<i}),

e.g. ``P(He runs fast) = P(He) x P( runs | He) x P( fast | He runs)``. :func:`score` runs the
model once over the token ids and reads every factor off the logits
(:func:`npllm.equations.token_log_probs`: logits at position t predict token t + 1).

Choices that change the numbers, all visible in each result's metadata:

- **The first token** has no context of its own. By default the model's *document-start* token
  is put before the text (``bos="auto"``; for SmolLM2 that is ``<|endoftext|>``, the token that
  separates documents in its training data), never twice; with ``bos=False`` the first token is
  reported as *unscored* (``None``, never 0) and left out of the total.
- **Context**: ``context + text`` is tokenized once and split at the character boundary, so the
  text's tokens are the ones the model really sees; a token that straddles the boundary (``" fast"``
  when the context ends with a space) is scored as part of the text, and a note says so.
- **Long texts** are scored with a sliding window: each token is predicted exactly once, with at
  least ``window - stride`` tokens of context; ``context_lengths`` says how many tokens each
  prediction saw.
- **Batches** are padded; each text's numbers equal scoring it alone.

Log-probabilities are in nats (``base="e"``) or bits (``base=2``, surprisal in bits).
Perplexity and bits per byte do not depend on the base.
"""
import bisect
import math
import re
from dataclasses import dataclass, field

import numpy as np

from npllm.errors import NpllmError

LN2 = math.log(2.0)
BASES = {"e": 1.0, "2": LN2}  # divide nats by this to get the base's unit
UNITS = {"e": "nats", "2": "bits"}
AUTO_BOS_SEPARATOR = "<|endoftext|>"  # GPT-2-style byte-level BPE models: the document separator
DEFAULT_BATCH_SIZE = 16
MAX_BATCH_TOKENS = 2048  # rows x padded length per forward pass (bounds the [B, T, V] logits)
# Padding a row to the batch's longest costs (longest - its length) positions of work; a forward
# pass of its own costs about this many positions' worth (reading every weight, one BLAS call per
# matrix on few rows, Python): on SmolLM2, 8 tokens take 92 ms, 16 tokens 99 ms, 256 tokens 380 ms.
PASS_COST_TOKENS = 48
# The texts of a chunk are sorted by length before they are cut into batches, so that a batch
# pads little: a chunk is up to this many batches' worth of texts, cut at fixed positions of
# the input (see chunks()). Short sentences in input order padded 38% of the positions in
# batches of 16; sorted over 8 batches, far less.
SORT_BATCHES = 8
# ... and a chunk of long texts ends after this many characters (about 8 full forward passes),
# so that results, and the progress bar, keep coming.
CHUNK_CHARACTERS = 65536

__all__ = ["score", "iter_scores", "corpus_perplexity", "resolve_bos", "TextScore", "WordScore",
           "Factor", "Bos", "CorpusPerplexity", "ScoreError"]


class ScoreError(NpllmError):
    """A text that cannot be scored (empty, no continuation, too long, ...).

    ``index`` is its position in the input (None for a single text).
    """

    def __init__(self, message, index=None):
        super().__init__(message)
        self.index = index


# -- the BOS policy ---------------------------------------------------------------------------

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
    tok = _tokenizer(model)
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
            raise ScoreError(f"bos {bos!r} is not a token of this model's vocabulary; give "
                             "'auto', 'none', a token such as '<|endoftext|>', or a token id")
        return Bos(token_id, bos, bos, "chosen by the user")
    raise ScoreError(f"bos must be 'auto', True, False/'none', a token string or an id, "
                     f"got {bos!r}")


def _tokenizer(model):
    if getattr(model, "tokenizer", None) is None:
        raise ScoreError("this model has no tokenizer (no tokenizer.json in its folder): "
                         "scoring text needs one")
    return model.tokenizer


# -- results ----------------------------------------------------------------------------------

@dataclass
class WordScore:
    """A whitespace-delimited word: the sum of its tokens' log-probabilities (None if one of
    them is unscored). ``start``/``end``: character span in ``TextScore.full_text``."""
    word: str
    start: int
    end: int
    log_prob: float | None
    n_tokens: int

    def to_dict(self):
        return {"word": self.word, "start": self.start, "end": self.end,
                "log_prob": self.log_prob, "n_tokens": self.n_tokens}


@dataclass
class Factor:
    """One conditional of the chain rule: P(token | given), ``given`` being the text the
    prediction was conditioned on (the BOS not shown), ``full_text[given_start:given_end]``."""
    token: str
    log_prob: float | None      # in ``base``
    context_length: int | None  # tokens conditioned on, the BOS included
    base: str
    given_start: int
    given_end: int
    full_text: str = field(repr=False)

    @property
    def given(self):
        return self.full_text[self.given_start:self.given_end]

    @property
    def prob(self):
        return None if self.log_prob is None else math.exp(self.log_prob * BASES[self.base])


@dataclass
class TextScore:
    r"""The log-probability of one text, token by token (see :func:`score`).

    ``tokens``, ``token_ids``, ``offsets``, ``log_probs``, ``context_lengths`` (and ``ranks``,
    ``entropies``, ``is_greedy`` when asked) have one entry per token of ``text``.
    ``offsets[i] = (start, end)`` spans ``full_text`` (= ``context + text``). ``log_probs[i]`` is
    :math:`\log P(s_i \mid s_{<i})` in ``base`` (None: unscored, the first token when there is
    no BOS). ``context_lengths[i]``: how many tokens the prediction conditioned on (the BOS and
    the context's tokens included; fewer than all the tokens before it only when a sliding
    window cut them off).
    """
    text: str
    context: str | None
    tokens: list
    token_ids: list
    offsets: list
    log_probs: list
    context_lengths: list
    base: str = "e"
    bos: Bos | None = None
    bos_added: bool = False
    window: int | None = None
    stride: int | None = None
    slid: bool = False
    ranks: list | None = None
    entropies: list | None = None
    is_greedy: list | None = None
    notes: list = field(default_factory=list)
    index: int | None = None
    n_context_tokens: int = 0
    _given_from: list = field(default_factory=list, repr=False)
    _scored_from: int = 0  # character where the scored part of full_text begins

    # -- the numbers ---------------------------------------------------------------------------
    @property
    def full_text(self):
        return (self.context or "") + self.text

    @property
    def unit(self):
        return UNITS[self.base]

    @property
    def n_tokens(self):
        return len(self.token_ids)

    @property
    def n_scored(self):
        return sum(lp is not None for lp in self.log_probs)

    @property
    def total(self):
        """log P(text | context): the sum of the scored tokens' log-probabilities."""
        return math.fsum(lp for lp in self.log_probs if lp is not None)

    @property
    def mean(self):
        """Mean log-probability per scored token."""
        return self.total / self.n_scored

    @property
    def total_nats(self):
        return self.total * BASES[self.base]

    @property
    def perplexity(self):
        r""":math:`\exp(-\frac{1}{N}\sum_i \ln P(s_i \mid s_{<i}))` over the scored tokens
        (``npllm.equations.perplexity``, in float64)."""
        return math.exp(-self.mean * BASES[self.base])

    @property
    def n_bytes(self):
        """UTF-8 bytes of the scored text (what the scored tokens spell out)."""
        return len(self.full_text[self._scored_from:].encode("utf-8"))

    @property
    def bits_per_byte(self):
        r"""Bits per byte, :math:`-\log_2 P / n_{\text{bytes}}` (``npllm.equations.bits_per_byte``
        in float64): comparable across tokenizers."""
        return -self.total_nats / (LN2 * self.n_bytes) if self.n_bytes else None

    @property
    def greedy(self):
        """Whether every scored token is the model's most likely one (None unless asked)."""
        if self.is_greedy is None:
            return None
        return all(g for g in self.is_greedy if g is not None)

    @property
    def words(self):
        """Word-level scores: each token's log-probability added to the whitespace-delimited
        word of ``text`` holding its first non-space character (a token of spaces only goes to
        the next word, or to the last word at the end), so the words' sum is the total."""
        full, start = self.full_text, len(self.context or "")
        spans = [(m.start() + start, m.end() + start) for m in re.finditer(r"\S+", self.text)]
        if not spans:
            return []
        starts = [ws for ws, _ in spans]
        owner = []
        for s, e in self.offsets:
            pos = next((k for k in range(s, e) if not full[k].isspace()), None)
            if pos is None:  # spaces only: the next word, else the last one
                w = min(bisect.bisect_left(starts, e), len(spans) - 1)
            else:  # the word holding pos (the first word if pos is in the context)
                w = max(bisect.bisect_right(starts, pos) - 1, 0)
            owner.append(w)
        mine = [[] for _ in spans]
        for lp, w in zip(self.log_probs, owner):
            mine[w].append(lp)
        return [WordScore(full[ws:we], ws, we,
                          None if None in lps else math.fsum(lps), len(lps))
                for (ws, we), lps in zip(spans, mine)]

    # -- the chain rule written out ----------------------------------------------------------------
    def factors(self):
        """The chain rule's factors, one :class:`Factor` per token: P(token | the text before)."""
        full = self.full_text
        return [Factor(tok, lp, n, self.base, g, s, full)
                for tok, (s, _), lp, n, g in zip(self.tokens, self.offsets, self.log_probs,
                                                 self.context_lengths, self._given_from)]

    def explain(self, max_width=100):
        """The product of conditionals with its numbers, e.g.::

            P(He runs fast) = P(He) x P( runs | He) x P( fast | He runs)
            ...one line per factor: probability and log-probability...
            log P = -4.39 + -5.17 + -2.41 = -11.97 nats
        """
        factors = self.factors()
        unit = self.unit
        full = self.full_text

        def probability_of(split):  # P(what follows split | what precedes it)
            return f"P({_show(full[split:], 40)}" + (
                f" | {_show(full[:split], 30, left=True)})" if split else ")")

        # The product covers every listed token (the unscored first one too); the log line only
        # the scored ones: without a BOS, log P( runs fast | He).
        lhs = probability_of(min(self._scored_from, self.offsets[0][0]))
        scored_lhs = probability_of(self._scored_from)
        terms = [_factor_name(f) for f in factors]
        if len(terms) > 8:
            terms = terms[:3] + ["..."] + terms[-1:]
        product = " x ".join(terms)
        lines = [_wrap(lhs if product == lhs else f"{lhs} = {product}", max_width), ""]
        header = f"  {'#':>3}  {'factor':<44} {'probability':>12} {'log P (' + unit + ')':>15}"
        lines += [header, "  " + "-" * (len(header) - 2)]
        for i, f in enumerate(factors):
            if f.log_prob is None:
                p, lp = "unscored", "-"
            else:
                p, lp = _num(f.prob), f"{f.log_prob:.4f}"
            lines.append(f"  {i + 1:>3}  {_fit(_factor_name(f), 44):<44} {p:>12} {lp:>15}")
        lines.append("  " + "-" * (len(header) - 2))
        if self.n_scored:
            total = self.total
            label = "product" if self.n_scored == self.n_tokens else "product of the scored factors"
            lines.append(f"  {'':>3}  {label:<44} {_num(math.exp(self.total_nats)):>12} "
                         f"{total:>15.4f}")
            addends = [f"{f.log_prob:.4f}" for f in factors if f.log_prob is not None]
            if len(addends) > 6:
                addends = addends[:3] + ["..."] + addends[-1:]
            log = "log2" if self.base == "2" else "log"
            sum_ = " + ".join(addends) + " = " if len(addends) > 1 else ""
            lines += ["", _wrap(f"{log} {scored_lhs} = {sum_}{total:.4f} {unit}", max_width)]
            plural = "s" if self.n_scored > 1 else ""
            lines.append(f"{self.n_scored} scored token{plural}: mean {self.mean:.4f} "
                         f"{unit}/token, "
                         f"perplexity {self.perplexity:.4g}, "
                         f"{self.bits_per_byte:.4f} bits per byte ({self.n_bytes} bytes)")
        lines.append(self._bos_line())
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _bos_line(self):
        if self.bos is None or self.bos.id is None:
            return "no BOS token: the first token has no context and is not scored"
        how = "prepended" if self.bos_added else "already at the start of the text"
        return (f"every factor is also conditioned on the document start {self.bos.token} "
                f"(id {self.bos.id}, {how})")

    def __str__(self):
        return self.explain()

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self, words=False):
        """A JSON-ready dict (floats at full precision; None for what is not defined)."""
        n = self.n_scored
        d = {
            "text": self.text, "context": self.context,
            "total": self.total if n else None, "mean": self.mean if n else None,
            "perplexity": self.perplexity if n else None,
            "bits_per_byte": self.bits_per_byte if n else None,
            "n_tokens": self.n_tokens, "n_scored": n, "n_bytes": self.n_bytes,
            "n_context_tokens": self.n_context_tokens,
            "tokens": self.tokens, "token_ids": self.token_ids,
            "offsets": [list(o) for o in self.offsets], "log_probs": self.log_probs,
            "context_lengths": self.context_lengths,
        }
        for name in ("ranks", "entropies", "is_greedy"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        if self.is_greedy is not None:
            d["greedy"] = self.greedy
        if words:
            d["words"] = [w.to_dict() for w in self.words]
        d["base"] = self.base
        d["bos"] = self.bos.token if self.bos is not None else None
        d["bos_added"] = self.bos_added
        d["slid"] = self.slid
        d["notes"] = list(self.notes)
        return d


def _show(text, width, left=False):
    """A string as the chain rule prints it: control characters escaped, shortened to width."""
    text = (text or "").replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") \
        .replace("\r", "\\r")
    if len(text) > width:
        text = ("..." + text[-(width - 3):]) if left else (text[:width - 3] + "...")
    return text


def _factor_name(f):
    given = f.full_text[max(f.given_start, f.given_end - 40):f.given_end]  # enough to show
    return f"P({_show(f.token, 20)}" + (f" | {_show(given, 24, left=True)})" if given else ")")


def _fit(s, width):
    return s if len(s) <= width else s[:width - 4] + "...)"


def _num(p):
    return f"{p:.6f}" if p >= 1e-4 else f"{p:.4e}"


def _wrap(line, width):
    if len(line) <= width:
        return line
    import textwrap
    return "\n".join(textwrap.wrap(line, width, subsequent_indent="    ", break_long_words=False,
                                   break_on_hyphens=False))


# -- preparing a text: tokens, BOS, context split, windows ----------------------------------------

@dataclass
class _Row:
    """One forward pass's worth of one text: input ids and which predictions to keep."""
    item: int
    ids: np.ndarray          # int64 [L]
    logit_rows: np.ndarray   # which logits rows to read
    targets: np.ndarray      # the ids they predict
    token_index: np.ndarray  # index into the text's tokens
    context_lengths: np.ndarray
    given_token: np.ndarray  # full-text token index where the context begins (-1: the BOS)


@dataclass
class _Prepared:
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


def _check_settings(model, base, window, stride, batch_size):
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


def _prepare(index, text, context, tok, bos, window, stride, slide):
    """Tokenize ``context + text`` once, split it, add the BOS, cut it into windows."""
    if not isinstance(text, str):
        raise ScoreError(f"text must be a string, got {type(text).__name__}", index)
    if context is not None and not isinstance(context, str):
        raise ScoreError(f"context must be a string or None, got {type(context).__name__}", index)
    context = context or None  # "" is no context
    if text == "":
        if context:
            raise ScoreError(f"the context {_show(context, 40, left=True)!r} has no "
                             "continuation: give the text to score after it", index)
        raise ScoreError("the text is empty: there is nothing to score", index)
    full = (context or "") + text
    try:
        full.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ScoreError(f"the text is not valid Unicode ({e.reason} at character {e.start})",
                         index) from None
    ids, offsets = tok.encode_with_offsets(full)
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
        rows.append(_Row(index, inputs, positions - a - 1, seq[positions], positions - o - first,
                         positions - a, np.full(len(positions), context_from)))
    return _Prepared(index, text, context, ids, offsets, first, bos_added, rows, notes,
                     len(spans) > 1)


# -- running the model ----------------------------------------------------------------------------

def batch_plan(lengths, batch_size):
    """Rows of these lengths into padded batches, ``[[row, ...], ...]``.

    Rows go longest first (ties in their order); a row joins the batch unless that would pad it
    by more than ``PASS_COST_TOKENS`` positions (a forward pass of its own is cheaper then), the
    batch has ``batch_size`` rows, or it would exceed ``MAX_BATCH_TOKENS``.
    """
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    batches, i = [], 0
    while i < len(order):
        longest, size = lengths[order[i]], 1
        while (size < batch_size and i + size < len(order)
               and (size + 1) * longest <= MAX_BATCH_TOKENS
               and longest - lengths[order[i + size]] <= PASS_COST_TOKENS):
            size += 1
        batches.append(order[i:i + size])
        i += size
    return batches


def _run_rows(model, rows, batch_size, with_rank, with_entropy, with_greedy):
    """Forward passes over ``rows`` in the padded batches of :func:`batch_plan`; results per
    row, in order. When only log-probabilities are asked for, the forward pass returns them
    directly (``targets=``) and the [B, T, V] logits are never formed.

    On the Numba backend the batches run two at a time
    (:func:`npllm.model.threads.map_on_two_threads`: between BLAS's products, the rest of a
    forward pass would use one core). With logits, only when two batches' logits together fit
    in ``MAX_BATCH_TOKENS`` positions, the most that one batch may hold: the peak memory stays
    within that bound.
    """
    from npllm.backend import backend_name
    from npllm.equations import greedy, log_softmax, token_log_probs
    from npllm.model import threads

    need_logits = with_rank or with_entropy or with_greedy

    def run(which):  # one padded batch -> a result per row
        batch = [rows[r] for r in which]
        longest = len(batch[0].ids)
        ids = np.zeros((len(batch), longest), dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        targets = np.zeros((len(batch), longest), dtype=np.int64)
        for k, row in enumerate(batch):  # right padding: real tokens keep positions 0, 1, ...
            ids[k, :len(row.ids)] = row.ids
            mask[k, :len(row.ids)] = 1
            targets[k, row.logit_rows] = row.targets
        mask = mask if len(batch) > 1 else None
        if not need_logits:  # log P(target) at every position [B, T]; the padding's are never read
            log_probs = model(ids, attention_mask=mask, targets=targets)
            return [{"log_probs": log_probs[k, row.logit_rows].astype(np.float64)}
                    for k, row in enumerate(batch)]
        logits = model(ids, attention_mask=mask)  # [B, T, V]
        out = []
        for k, row in enumerate(batch):
            x = logits[k, row.logit_rows]  # [n, V]: the predictions we keep
            res = {"log_probs": token_log_probs(x, row.targets).astype(np.float64)}
            target_logit = np.take_along_axis(x, row.targets[:, None], axis=-1)
            if with_rank:  # 1 + how many tokens the model found strictly more likely
                res["ranks"] = (x > target_logit).sum(-1) + 1
            if with_entropy:
                lp = log_softmax(x).astype(np.float64)
                res["entropies"] = -(np.exp(lp) * lp).sum(-1)
            if with_greedy:
                res["is_greedy"] = greedy(x) == row.targets
            out.append(res)
        return out

    plan = batch_plan([len(row.ids) for row in rows], batch_size)
    fits = not need_logits or 2 * max((len(b) * len(rows[b[0]].ids) for b in plan),
                                      default=0) <= MAX_BATCH_TOKENS
    if fits and threads.batches_pay(len(plan), backend_name(getattr(model, "backend", None))):
        done = threads.map_on_two_threads(run, plan)
    else:
        done = [run(which) for which in plan]
    out = [None] * len(rows)
    for which, results in zip(plan, done):
        for r, res in zip(which, results):
            out[r] = res
    return out


def _assemble(prep, results, tok, bos, base, window, stride, with_rank, with_entropy,
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
        _given_from=given_from, _scored_from=scored_from, **extra)


def _normalise_items(texts, context):
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if context is None or isinstance(context, str):
        contexts = [context] * len(texts)
    else:
        contexts = list(context)
        if len(contexts) != len(texts):
            raise ScoreError(f"context must be one string or one per text: got {len(contexts)} "
                             f"contexts for {len(texts)} texts")
    return single, list(zip(texts, contexts))


def chunks(items, batch_size):
    """The input's chunks, ``[range(start, stop), ...]``: items scored together (sorted by
    length, then cut into batches of ``batch_size``), ``SORT_BATCHES * batch_size`` items each,
    fewer where their texts and contexts pass ``CHUNK_CHARACTERS``. They depend on the items
    only, not on where a run starts."""
    out, start, characters = [], 0, 0
    for i, (text, context) in enumerate(items):
        n = len(text or "") + len(context or "")
        if i > start and (i - start >= SORT_BATCHES * batch_size
                          or characters + n > CHUNK_CHARACTERS):
            out.append(range(start, i))
            start, characters = i, 0
        characters += n
    if start < len(items):
        out.append(range(start, len(items)))
    return out


def iter_scores(model, items, *, bos="auto", base="e", window=None, stride=None, slide=True,
                batch_size=DEFAULT_BATCH_SIZE, with_rank=False, with_entropy=False,
                with_greedy=False, skip=(), progress=False):
    """Score ``items`` (texts, or ``(text, context)`` pairs) and yield ``(index, result)`` in
    input order, one chunk of items at a time (:func:`chunks`: up to ``SORT_BATCHES``
    batches' worth). ``result`` is a :class:`TextScore` or the :class:`ScoreError` that the
    item raised.

    A chunk's texts are sorted by length and cut into batches of ``batch_size``, so that little
    is padded. Chunks are cut at fixed positions of the input, so an item's numbers do not
    depend on where a run started: ``skip`` (indices already done, e.g. by an interrupted run)
    leaves them out of the output, and the rest come out bit for bit as in one uninterrupted
    run.
    """
    tok = _tokenizer(model)
    bos_choice = resolve_bos(model, bos)
    base, window, stride, batch_size = _check_settings(model, base, window, stride, batch_size)
    items = [(it, None) if isinstance(it, str) or it is None else tuple(it) for it in items]
    skip = set(skip)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items) - len(skip & set(range(len(items)))), unit="text",
                   desc="scoring", disable=None)
    try:
        for chunk in chunks(items, batch_size):
            if all(i in skip for i in chunk):
                continue
            prepared, results = {}, {}
            for i in chunk:
                text, context = items[i]
                try:
                    prepared[i] = _prepare(i, text, context, tok, bos_choice, window, stride,
                                           slide)
                except ScoreError as e:
                    e.index = i
                    results[i] = e
            rows = [row for p in prepared.values() for row in p.rows]
            outs = _run_rows(model, rows, batch_size, with_rank, with_entropy, with_greedy)
            k = 0
            for i, p in prepared.items():
                mine = outs[k:k + len(p.rows)]
                k += len(p.rows)
                results[i] = _assemble(p, mine, tok, bos_choice, base, window, stride,
                                       with_rank, with_entropy, with_greedy)
            for i in chunk:
                if i not in skip:
                    yield i, results[i]
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def score(model, texts, context=None, *, bos="auto", base="e", window=None, stride=None,
          slide=True, batch_size=DEFAULT_BATCH_SIZE, with_rank=False, with_entropy=False,
          with_greedy=False, progress=False, return_errors=False, client=None):
    r"""Log-probabilities of ``texts`` under ``model``, token by token (lecture 000).

    .. math::
        \log P(\text{text} \mid \text{context}) = \sum_{i} \log P(s_i \mid s_{<i})

    ``texts``: one string (returns one :class:`TextScore`) or a list (returns a list).
    ``context``: None, one string for all texts, or one per text (None allowed): only the text
    after it is scored, conditioned on it. ``context + text`` is tokenized once and split at the
    character boundary; a token straddling it is scored with the text (a note says so).

    ``bos``: ``"auto"`` (default: the model's document-start token, see :func:`resolve_bos`; never
    added twice), ``False``/``"none"`` (the first token is unscored: ``None``, not 0), a token or
    an id. ``base``: ``"e"`` (nats) or ``2`` (bits). ``window``: tokens per forward pass
    (default: the model's ``max_position_embeddings``); longer texts are scored with a sliding
    window advancing ``stride`` tokens (default ``window // 2``), so every token is predicted
    once with at least ``window - stride`` tokens of context; ``slide=False`` makes such texts an
    error instead. ``batch_size``: texts (or windows) per forward pass; padding changes nothing.
    ``with_rank`` (1 = the most likely token), ``with_entropy`` (of the predicted distribution,
    in ``base``), ``with_greedy`` (is the token the argmax) add per-token lists.

    ``client``: a ``dask.distributed.Client``: the texts are scored on its workers
    (:mod:`npllm.distributed`; each loads the model from its folder once), same results.

    A text that cannot be scored raises :class:`ScoreError` (``index`` says which); with
    ``return_errors=True`` its slot holds the error instead and the others are still scored.

    >>> s = score(model, "He runs fast")                          # doctest: +SKIP
    >>> print(s.explain())                                         # doctest: +SKIP
    P(He runs fast) = P(He) x P( runs | He) x P( fast | He runs)
    """
    if client is not None:  # a dask.distributed Client: scored on its workers, same results
        from npllm import distributed
        return distributed.score(model, texts, context, client=client, bos=bos, base=base,
                                 window=window, stride=stride, slide=slide,
                                 batch_size=batch_size, with_rank=with_rank,
                                 with_entropy=with_entropy, with_greedy=with_greedy,
                                 progress=progress, return_errors=return_errors)
    single, items = _normalise_items(texts, context)
    results = []
    for _, r in iter_scores(model, items, bos=bos, base=base, window=window, stride=stride,
                            slide=slide, batch_size=batch_size, with_rank=with_rank,
                            with_entropy=with_entropy, with_greedy=with_greedy,
                            progress=progress):
        if isinstance(r, ScoreError) and not return_errors:
            where = "" if single else f"texts[{r.index}]: "
            raise ScoreError(f"{where}{r}", r.index)
        results.append(r)
    return results[0] if single else results


# -- corpus perplexity ----------------------------------------------------------------------------

@dataclass
class CorpusPerplexity:
    r"""Token-weighted perplexity of a corpus: :math:`\exp(\text{NLL})`, where
    :math:`\text{NLL} = -\sum_d \ln P(d) / \sum_d n_d` pools every scored token of every
    document (long documents weigh more, as they should).

    ``stderr`` is the standard error of the perplexity, from the standard error of the mean NLL
    by the delta method (:math:`\mathrm{SE}(e^m) \approx e^m\,\mathrm{SE}(m)`); ``ci95`` is
    :math:`e^{m \pm 1.96\,\mathrm{SE}(m)}`. ``SE(m)`` treats *documents* as the independent units
    (tokens of one document are correlated): the ratio estimator's linearization
    :math:`\mathrm{SE}(m)^2 = \frac{D}{D-1}\sum_d (\ell_d - m\,n_d)^2 / N^2`, with
    :math:`\ell_d` a document's NLL and :math:`n_d` its scored tokens. With a single document it
    falls back to treating tokens as independent (``stderr_method`` says which), which
    understates the uncertainty. ``stderr_tokens`` is always the independent-tokens figure,
    :math:`\mathrm{sd}(\text{token NLL})/\sqrt{N}` (what llama.cpp prints), for comparison.
    """
    n_documents: int
    n_tokens: int
    n_bytes: int
    total_log_prob: float     # nats
    mean_nll: float           # nats per token
    perplexity: float
    stderr: float | None
    ci95: tuple | None
    stderr_method: str
    stderr_tokens: float | None
    bits_per_byte: float
    n_failed: int = 0
    errors: list = field(default_factory=list)
    bos: Bos | None = None
    window: int | None = None
    stride: int | None = None

    def to_dict(self):
        d = {k: getattr(self, k) for k in (
            "n_documents", "n_tokens", "n_bytes", "total_log_prob", "mean_nll", "perplexity",
            "stderr", "stderr_method", "stderr_tokens", "bits_per_byte", "n_failed", "window",
            "stride")}
        d["ci95"] = list(self.ci95) if self.ci95 else None
        d["bos"] = self.bos.to_dict() if self.bos else None
        d["errors"] = [{"index": e.index, "error": str(e)} for e in self.errors]
        return d

    def __str__(self):
        lines = [f"perplexity      {self.perplexity:.4f}"
                 + (f" ± {self.stderr:.4f} (95% CI {self.ci95[0]:.4f} to {self.ci95[1]:.4f}; "
                    f"standard error over {self.stderr_method})" if self.stderr is not None
                    else ""),
                 f"mean NLL        {self.mean_nll:.6f} nats/token "
                 f"({self.mean_nll / LN2:.6f} bits/token)",
                 f"bits per byte   {self.bits_per_byte:.6f}",
                 f"tokens scored   {self.n_tokens} in {self.n_documents} documents "
                 f"({self.n_bytes} bytes)"]
        if self.bos is not None:
            lines.append(f"BOS             {self.bos.token or 'none'}")
        if self.window is not None:
            lines.append(f"window          {self.window} tokens, stride {self.stride}")
        if self.n_failed:
            lines.append(f"failed          {self.n_failed} documents (not counted)")
        return "\n".join(lines)


def corpus_stats(scores):
    """:class:`CorpusPerplexity` numbers from finished :class:`TextScore` results."""
    doc_nll = np.array([-s.total_nats for s in scores], dtype=np.float64)
    doc_n = np.array([s.n_scored for s in scores], dtype=np.float64)
    token_nll = np.concatenate([-np.array([lp for lp in s.log_probs if lp is not None])
                                * BASES[s.base] for s in scores]) if scores else np.zeros(0)
    N, D = doc_n.sum(), len(scores)
    if N == 0:
        raise ScoreError("no document could be scored: there is no perplexity to report")
    m = doc_nll.sum() / N
    se_tokens = float(token_nll.std(ddof=1) / math.sqrt(N)) if N > 1 else None
    if D > 1:
        se, method = math.sqrt(D / (D - 1) * ((doc_nll - m * doc_n) ** 2).sum()) / N, "documents"
    else:
        se, method = se_tokens, "tokens (one document: assumes independent tokens)"
    ppl = math.exp(m)
    n_bytes = sum(s.n_bytes for s in scores)
    return dict(n_documents=D, n_tokens=int(N), n_bytes=n_bytes,
                total_log_prob=-float(doc_nll.sum()), mean_nll=float(m), perplexity=ppl,
                stderr=None if se is None else ppl * se,
                ci95=None if se is None else (math.exp(m - 1.96 * se), math.exp(m + 1.96 * se)),
                stderr_method=method,
                stderr_tokens=None if se_tokens is None else ppl * se_tokens,
                bits_per_byte=float(doc_nll.sum() / (LN2 * n_bytes)) if n_bytes else None)


def corpus_perplexity(model, texts, *, bos="auto", window=None, stride=None, slide=True,
                      batch_size=DEFAULT_BATCH_SIZE, progress=False):
    """Token-weighted perplexity of many documents with its standard error
    (:class:`CorpusPerplexity`, whose docstring says how the error is computed).

    Each document is scored alone (BOS, sliding window as :func:`score`); documents that
    cannot be scored (empty; too long with ``slide=False``) are counted in ``n_failed``, kept
    in ``errors`` and left out.
    """
    _, items = _normalise_items(texts, None)
    ok, errors = [], []
    for _, r in iter_scores(model, items, bos=bos, window=window, stride=stride, slide=slide,
                            batch_size=batch_size, progress=progress):
        (errors if isinstance(r, ScoreError) else ok).append(r)
    _, window, stride, _ = _check_settings(model, "e", window, stride, batch_size)
    return CorpusPerplexity(**corpus_stats(ok), n_failed=len(errors), errors=errors,
                            bos=resolve_bos(model, bos), window=window, stride=stride)
