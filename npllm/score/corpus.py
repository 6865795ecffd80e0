r"""Corpus perplexity: every document scored alone, all their tokens pooled, with a standard
error (:func:`corpus_perplexity`, :class:`CorpusPerplexity`)."""
import math
from dataclasses import dataclass, field

import numpy as np

from npllm.errors import ScoreError
from npllm.score.api import iter_scores
from npllm.score.batching import DEFAULT_BATCH_SIZE
from npllm.score.bos import Bos, resolve_bos
from npllm.score.results import BASES, LN2
from npllm.score.windows import check_settings, normalise_items


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
                      batch_size=DEFAULT_BATCH_SIZE, progress=False, split_special_tokens=False):
    """Token-weighted perplexity of many documents with its standard error
    (:class:`CorpusPerplexity`, whose docstring says how the error is computed).

    Each document is scored alone (BOS, sliding window as :func:`score`); documents that
    cannot be scored (empty; too long with ``slide=False``) are counted in ``n_failed``, kept
    in ``errors`` and left out.
    """
    _, items = normalise_items(texts, None)
    ok, errors = [], []
    for _, r in iter_scores(model, items, bos=bos, window=window, stride=stride, slide=slide,
                            batch_size=batch_size, progress=progress,
                            split_special_tokens=split_special_tokens):
        (errors if isinstance(r, ScoreError) else ok).append(r)
    _, window, stride, _ = check_settings(model, "e", window, stride, batch_size)
    return CorpusPerplexity(**corpus_stats(ok), n_failed=len(errors), errors=errors,
                            bos=resolve_bos(model, bos), window=window, stride=stride)
