r"""The results of scoring: :class:`TextScore` (a text's log-probabilities, token by token, its
totals, the chain rule written out) with :class:`WordScore` and :class:`Factor`, and how they
are printed and serialised.
"""
import bisect
import math
import re
from dataclasses import dataclass, field

from npllm.score.bos import Bos

LN2 = math.log(2.0)
BASES = {"e": 1.0, "2": LN2}  # divide nats by this to get the base's unit
UNITS = {"e": "nats", "2": "bits"}


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
    given_from: list = field(default_factory=list, repr=False)
    scored_from: int = 0  # character where the scored part of full_text begins

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
        return len(self.full_text[self.scored_from:].encode("utf-8"))

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
                                                 self.context_lengths, self.given_from)]

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
            return f"P({show(full[split:], 40)}" + (
                f" | {show(full[:split], 30, left=True)})" if split else ")")

        # The product covers every listed token (the unscored first one too); the log line only
        # the scored ones: without a BOS, log P( runs fast | He).
        lhs = probability_of(min(self.scored_from, self.offsets[0][0]))
        scored_lhs = probability_of(self.scored_from)
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


def show(text, width, left=False):
    """A string as the chain rule prints it: control characters escaped, shortened to width."""
    text = (text or "").replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") \
        .replace("\r", "\\r")
    if len(text) > width:
        text = ("..." + text[-(width - 3):]) if left else (text[:width - 3] + "...")
    return text


def _factor_name(f):
    given = f.full_text[max(f.given_start, f.given_end - 40):f.given_end]  # enough to show
    return f"P({show(f.token, 20)}" + (f" | {show(given, 24, left=True)})" if given else ")")


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
