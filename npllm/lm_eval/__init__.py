r"""npllm inside EleutherAI's lm-evaluation-harness: an ``lm_eval`` model named ``npllm``.

The harness asks a model three questions, and this module answers them with npllm's forward
pass (lecture 000's chain rule) and its generation loop (lecture 002):

- ``loglikelihood(context, continuation)``:
  :math:`\log P(\text{continuation} \mid \text{context}) = \sum_{i} \log P(c_i \mid
  \text{context}, c_{<i})` and ``is_greedy`` (every :math:`c_i` is the argmax of its
  distribution), with the token split of the harness's own ``HFLM``: ``context + continuation``
  and ``context`` are tokenized separately and the joint tokens are cut at the context's length
  (trailing spaces of the context move to the continuation first; an empty context becomes the
  prefix token). ``npllm.score`` splits at the character boundary instead (see
  ``docs/scoring.md``); here the harness's rule is kept so that numbers match published
  ``HFLM`` results.
- ``loglikelihood_rolling(text)``: the log-probability of a whole document, scored in the
  harness's disjoint rolling windows (``lm_eval.utils.get_rolling_token_windows``: each token
  predicted once, the first after the prefix token).
- ``generate_until(context, {"until": [...], "max_gen_toks": n, ...})``: ``npllm.generate``
  (greedy unless sampling is asked for), cut at the first stop string.

Use it from Python (``lm_eval.simple_evaluate(model=NpllmLM(...))`` or ``model="npllm"`` once
this module is imported) or from the command line: ``python -m npllm.lm_eval --tasks ...``
(lm-eval 0.4 has no plugin mechanism for models, so ``lm_eval --model npllm`` alone cannot find
it). Nothing else in npllm imports lm_eval: it is the optional extra ``npllm[eval]``.
"""
import sys

import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - the extra is installed for the tests
    from npllm.errors import NpllmError
    raise NpllmError("npllm.lm_eval needs lm-evaluation-harness: pip install 'npllm[eval]' "
                     f"(import failed: {e})") from e

from npllm.equations import greedy, log_softmax

__all__ = ["NpllmLM", "main"]

DEFAULT_BATCH_SIZE = 16
# Rows x padded length per forward pass: bounds the [B, T, V] logits that is_greedy needs
# (the same bound as npllm.score's batches).
MAX_BATCH_TOKENS = 2048
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default


def _int_or_none(value):
    return None if value in (None, "", "None", "none") else int(value)


def _bool_or_none(value):
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@register_model("npllm")
class NpllmLM(TemplateLM):
    """An lm-evaluation-harness model backed by an npllm model.

    ``pretrained``: what ``npllm.load`` accepts (a folder, a ``.gguf`` file, a Hub id; None: the
    default model) or a model already loaded. ``batch_size``: sequences per forward pass (also
    bounded by 2,048 padded tokens). ``max_length``: the context the harness may use (default:
    the model's ``max_position_embeddings``, as ``HFLM``). ``max_gen_toks``: default number of
    tokens ``generate_until`` may produce (256, as ``HFLM``). ``prefix_token_id``: the token put
    before an empty context and before rolling windows (default as ``HFLM``: the tokenizer's BOS,
    else its EOS). ``add_bos_token``: as ``HFLM``'s (None: the tokenizer decides).
    ``seed``: for sampled generations. ``backend``: npllm's backend (``numba``/``numpy``).
    """

    def __init__(self, pretrained=None, batch_size=DEFAULT_BATCH_SIZE, max_length=None,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, prefix_token_id=None, add_bos_token=None,
                 seed=None, backend=None, max_batch_size=None, device=None, **unused):
        super().__init__()
        import npllm

        if unused:
            print(f"npllm.lm_eval: ignoring model arguments {sorted(unused)}", file=sys.stderr)
        if pretrained is None or isinstance(pretrained, str):
            self.model = npllm.load(pretrained or None, backend=backend)
        else:
            self.model = pretrained
        if self.model.tokenizer is None:
            raise ValueError("npllm.lm_eval needs a model with a tokenizer (tokenizer.json)")
        self.tokenizer = self.model.tokenizer
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = DEFAULT_BATCH_SIZE
        self._batch_size = int(batch_size)
        self._max_length = _int_or_none(max_length)
        self._max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = _int_or_none(prefix_token_id)
        self.add_bos_token = _bool_or_none(add_bos_token)
        self.seed = _int_or_none(seed)

    # -- what the harness asks about the model ----------------------------------------------
    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        if self._prefix_token_id is not None:
            return self._prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self):
        return self._max_length or self.model.config.max_position_embeddings

    @property
    def max_gen_toks(self):
        return self._max_gen_toks

    @property
    def batch_size(self):
        return self._batch_size

    @property
    def tokenizer_name(self):
        return str(getattr(self.model, "source", "npllm")).replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """The model's chat template around ``chat_history``, as ``HFLM`` renders it: with the
        assistant's opening when ``add_generation_prompt``, else continuing the last message
        (transformers' ``continue_final_message``: the text ends with its content)."""
        text = self.tokenizer.apply_chat_template(chat_history,
                                                  add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt and chat_history:
            last = chat_history[-1]["content"].strip()
            end = text.rfind(last)
            if last and end >= 0:
                text = text[:end + len(last)]
        return text

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        """Token ids as ``HFLM.tok_encode``: the tokenizer's special tokens unless told
        otherwise, and none when the text already starts with the prefix token."""
        special = add_special_tokens
        if special is None:
            special = True if self.add_bos_token is None else self.add_bos_token
            prefix = self.tokenizer.decode([self.prefix_token_id])
            if prefix and string.startswith(prefix):
                special = False
        ids = list(self.tokenizer.encode(string, add_special_tokens=special))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens=True):
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring --------------------------------------------------------------------------------
    def _rows(self, pairs):
        """(input ids, scored targets) per (context ids, continuation ids), as HFLM builds them:
        the last ``max_length + 1`` tokens, the input without its last token."""
        rows = []
        for context, continuation in pairs:
            if not context or not continuation:
                raise ValueError("a loglikelihood request needs context and continuation tokens")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit in "
                                 f"max_length={self.max_length} (HFLM refuses it too)")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], list(continuation)))
        return rows

    def _batches(self, order, rows):
        batch = []
        for i in order:
            longest = len(rows[batch[0]][0]) if batch else len(rows[i][0])
            if batch and (len(batch) >= self.batch_size
                          or (len(batch) + 1) * longest > MAX_BATCH_TOKENS):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _score(self, pairs, with_greedy=True, disable_tqdm=False, desc="npllm loglikelihood"):
        r"""``[(log P(continuation | context), is_greedy)]`` for ``(context ids, continuation
        ids)`` pairs: :math:`\sum_i \log \mathrm{softmax}(z_{t_i})[c_i]` over the continuation's
        positions, one padded forward pass per batch (longest first, as HFLM orders them).

        Rows are left-padded so that every continuation ends at the last position: only its
        last ``max(len(continuation))`` positions go through the LM head (``logits_to_keep``);
        without ``is_greedy`` the model returns the targets' log-probabilities directly
        (``targets=``) and no logits are formed.
        """
        from tqdm import tqdm

        rows = self._rows(pairs)
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
        out = [None] * len(rows)
        bar = tqdm(total=len(rows), desc=desc, disable=disable_tqdm or None, file=sys.stderr)
        for batch in self._batches(order, rows):
            T = max(len(rows[i][0]) for i in batch)
            keep = max(len(rows[i][1]) for i in batch)
            ids = np.zeros((len(batch), T), dtype=np.int64)
            mask = np.zeros((len(batch), T), dtype=np.int64)
            targets = np.zeros((len(batch), keep), dtype=np.int64)
            for b, i in enumerate(batch):
                inp, cont = rows[i]
                ids[b, T - len(inp):], mask[b, T - len(inp):] = inp, 1
                targets[b, keep - len(cont):] = cont
            if with_greedy:
                logits = self.model(ids, attention_mask=mask, logits_to_keep=keep)  # [B, k, V]
                for b, i in enumerate(batch):
                    n = len(rows[i][1])
                    z = logits[b, keep - n:].astype(np.float64)
                    cont = targets[b, keep - n:]
                    lp = log_softmax(z)[np.arange(n), cont]
                    out[i] = (float(np.sum(lp)), bool(np.all(greedy(z) == cont)))
            else:
                lp = self.model(ids, attention_mask=mask, logits_to_keep=keep,
                                targets=targets)  # [B, k]
                for b, i in enumerate(batch):
                    n = len(rows[i][1])
                    out[i] = (float(np.sum(lp[b, keep - n:], dtype=np.float64)), None)
            bar.update(len(batch))
        bar.close()
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        results = self._score([(ctx, cont) for _, ctx, cont in requests],
                              disable_tqdm=disable_tqdm)
        for (request, _, _), answer in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each document in the harness's disjoint rolling windows of ``max_length`` tokens
        (the first window starts with the prefix token); the windows' sums added up."""
        strings = [req.args[0] for req in requests]
        owner, windows = [], []
        for k, string in enumerate(strings):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                owner.append(k)
                windows.append(window)
        scores = self._score(windows, with_greedy=False, disable_tqdm=disable_tqdm,
                             desc="npllm loglikelihood_rolling")
        totals = [0.0] * len(strings)
        for k, (lp, _) in zip(owner, scores):
            totals[k] += lp
        for string, total in zip(strings, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    # -- generation -----------------------------------------------------------------------------
    def _end_ids(self):
        """The ids that end a generation for transformers' ``generate`` (the config's
        ``eos_token_id``), and the texts that spell them (stop strings for npllm.generate)."""
        eos = self.model.config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or ())
        if self.eot_token_id is not None and not ids:
            ids = [self.eot_token_id]
        return ids, [self.tokenizer.decode([i]) for i in ids]

    def generate_until(self, requests, disable_tqdm=False):
        """``npllm.generate`` on each context, cut as ``HFLM`` cuts its generations: at the
        model's EOS token, then (decoded without special tokens) before the first stop string.

        transformers stops at the config's ``eos_token_id`` only; npllm.generate also stops at
        other end-of-text tokens (``<|endoftext|>``), so it runs with ``ignore_eos`` and the
        config's EOS tokens as stop strings, which gives the same text.
        """
        import npllm
        from tqdm import tqdm

        end_ids, end_texts = self._end_ids()
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False) \
            if self.eot_token_id is not None else None
        out = []
        for req in tqdm(requests, desc="npllm generate_until", disable=disable_tqdm or None,
                        file=sys.stderr):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context in "
                                 f"max_length={self.max_length}")
            ids = self.tok_encode(context, left_truncate_len=room)
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            sampling = {}
            if do_sample and temperature > 0:
                sampling = dict(do_sample=True, temperature=temperature, seed=self.seed,
                                top_k=kwargs.pop("top_k", None), top_p=kwargs.pop("top_p", None))
            generation = npllm.generate(self.model, ids, max_new_tokens=max_gen_toks,
                                        stop=[s for s in until + end_texts if s],
                                        ignore_eos=True, truncate=True, **sampling)
            new = list(generation.ids)
            for k, token in enumerate(new):
                if token in end_ids:
                    new = new[:k]
                    break
            text = postprocess_generated_text(self.tok_decode(new), stop=until,
                                              think_end_token=None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


def main(argv=None):
    """``python -m npllm.lm_eval [lm-eval options]``: lm-eval's own command line with the
    ``npllm`` model registered (``--model npllm`` is added when no ``--model`` is given)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ["--model", "npllm", *argv]
    sys.argv = ["lm_eval", *argv]
    return cli_evaluate()

