r"""Text generation: the autoregressive loop of lectures 002 and 003.

A language model scores the next token; generating text is a loop around it::

    ids = prompt ids
    repeat max_new_tokens times:
        logits = model(ids)[-1]                      # [V]: scores of the next token
        next   = greedy(logits)                      # or: sample from the filtered softmax
        ids   += [next]; stop at end-of-turn / end-of-text or at a stop string

Decoding strategies (lecture 002): *greedy* takes the most probable token (what temperature 0
means); *sampling* draws from :math:`\mathrm{softmax}(\text{filtered logits})`, where the logits
are divided by the temperature, then cut to the k best (top-k), then to the smallest set whose
probability reaches p (top-p), in the order transformers applies its logits processors. A seeded
``numpy.random.Generator`` makes a sampled text reproducible.

The KV cache (lecture 002): with ``use_cache=True`` the prompt is run once and every later step
feeds only the new token, whose keys and values are appended to a :class:`~npllm.KVCache`;
``use_cache=False`` recomputes the whole prefix at every step, as ``generate(use_cache=False)``
does in transformers, so the speed-up can be measured (``scripts/kv_cache_speedup.py``). A
conversation's next turn starts from the last reply's cache (``cache_from``): only what it has
not seen is run.

Entry points: :func:`generate` (a :class:`Generation` back; ``stream=`` a callback for text
pieces), :func:`generate_stream` (an iterator of text pieces) and :func:`chat` (the model's chat
template around a conversation). See ``docs/generation.md``.
"""
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from npllm.equations import filter_logits, greedy, sample, softmax
from npllm.errors import ArgumentError, NpllmError

DEFAULT_MAX_NEW_TOKENS = 128


class ContextLengthError(NpllmError):
    """The prompt plus the tokens to generate do not fit in the model's context window."""


@dataclass
class Step:
    """What happened at one decoding step.

    ``prob`` is the probability of the chosen token under the distribution it was chosen from:
    the filtered softmax when sampling, the plain softmax of the logits when greedy.
    ``candidates`` are the most probable tokens of that same distribution, as
    ``(token_id, text, prob)``, best first; tokens that filtering removed (probability 0) are left
    out, so a top-k or top-p cut is visible.
    """
    token_id: int
    text: str
    prob: float
    candidates: list


@dataclass
class Generation:
    """The outcome of :func:`generate`.

    ``ids`` are the new token ids, including the end-of-turn token when generation ended on one
    (as transformers' ``generate`` returns it) and the tokens that spelt a stop string; ``text`` is
    their decoded text without the end-of-turn token and cut before the stop string.
    ``finish_reason`` is ``"eos"`` (the model ended its turn), ``"stop"`` (a stop string was
    generated; ``stop`` says which) or ``"length"`` (``max_new_tokens`` were generated).
    ``cache`` is the KV cache after the last step (``None`` with ``use_cache=False``): print it, or
    look at ``cache.keys[layer]`` [B, K, capacity, Dh] and ``cache.length``. It holds the keys
    and values of ``cached_ids``: the prompt and every new token but the last, which was never
    fed back. ``reused_tokens`` of the prompt came from the cache of ``cache_from`` (see
    :func:`generate`) and were not computed again. ``seconds`` is the generation's time,
    ``first_token_seconds`` the part of it until the first new token (the prompt's forward
    pass); ``compile_seconds``, before both, the engine's one-time warm-up (Numba compiling its
    kernels on a model's first generation, :mod:`npllm.engine.warm`), counted in neither.
    """
    text: str
    ids: list
    prompt_ids: list
    finish_reason: str
    stop: str | None = None
    steps: list | None = None
    cache: object = field(default=None, repr=False)
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    compile_seconds: float = 0.0
    reused_tokens: int = 0

    @property
    def cached_ids(self):
        """The token ids whose keys and values ``cache`` holds, in order."""
        return (self.prompt_ids + self.ids)[:self.cache.length] if self.cache is not None else []

    @property
    def tokens_per_second(self):
        """New tokens per second over the whole generation (the first token's wait included)."""
        return len(self.ids) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decode_tokens_per_second(self):
        """Tokens per second after the first one: decoding alone, without the prompt's forward
        pass and a first run's one-time compilation (NaN for a single token)."""
        seconds = self.seconds - self.first_token_seconds
        return (len(self.ids) - 1) / seconds if len(self.ids) > 1 and seconds > 0 \
            else float("nan")

    def to_dict(self):
        """A JSON-ready dict (no cache)."""
        d = {k: v for k, v in asdict(self).items() if k != "cache"}
        d["tokens_per_second"] = self.tokens_per_second
        d["decode_tokens_per_second"] = self.decode_tokens_per_second
        if self.steps is None:
            del d["steps"]
        return d


class Stream:
    """The text pieces of a generation, as they are produced; ``result`` once it is exhausted.

    ::

        stream = generate_stream(model, "Once upon a time", max_new_tokens=40)
        for piece in stream:
            print(piece, end="", flush=True)
        stream.result.finish_reason
    """

    def __init__(self, pieces):
        self._pieces, self.result = pieces, None

    def __iter__(self):
        result = yield from self._pieces
        if result is not None:  # a second iteration of an exhausted stream returns None
            self.result = result


# ----------------------------------------------------------------------------------------------
# Checking the arguments


def check_sampling(max_new_tokens, temperature, top_k, top_p, seed):
    """Raise ``ValueError`` naming the first argument that is out of range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ArgumentError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature is not None and not (isinstance(temperature, (int, float, np.floating))
                                        and math.isfinite(temperature) and temperature >= 0):
        raise ArgumentError(f"temperature must be a finite number >= 0 (0 means greedy), "
                            f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 0):
        raise ArgumentError(f"top_k must be an integer >= 0 (0 keeps every token), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float, np.floating))
                                  and 0 < top_p <= 1):
        raise ArgumentError(f"top_p must lie in (0, 1] (1 keeps every token), got {top_p!r}")
    if seed is not None and not isinstance(seed, np.random.Generator) and (
            isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ArgumentError(f"seed must be an integer >= 0 (or a numpy.random.Generator), "
                         f"got {seed!r}")


def decoding_settings(temperature=None, top_k=None, top_p=None, do_sample=None):
    """Resolve the sampling arguments to ``(do_sample, temperature, top_k, top_p)``.

    Sampling is on when ``do_sample`` says so, or (``do_sample=None``) when any of temperature,
    top_k, top_p is given; temperature 0 always means greedy. Unset values take the neutral
    settings of transformers: temperature 1, top_k 0 (off), top_p 1 (off).
    """
    if do_sample is None:
        do_sample = any(x is not None for x in (temperature, top_k, top_p))
    temperature = 1.0 if temperature is None else float(temperature)
    top_k = 0 if top_k is None else int(top_k)
    top_p = 1.0 if top_p is None else float(top_p)
    return bool(do_sample) and temperature > 0, temperature, top_k, top_p


def prompt_token_ids(model, prompt, max_new_tokens, truncate=False):
    """Token ids of ``prompt`` (a string, or ids already) that leave room for ``max_new_tokens``.

    A plain string is encoded with the tokenizer's special tokens (a BOS token where the model
    uses one), as transformers' ``tokenizer(prompt)`` does. When prompt + new tokens exceed the
    context window: a :class:`ContextLengthError`, or with ``truncate=True`` the oldest prompt
    tokens are dropped (from the left).
    """
    config = model.config
    if isinstance(prompt, str):
        if not prompt:
            raise ArgumentError("the prompt is empty: give some text to continue")
        if model.tokenizer is None:
            raise NpllmError("this model has no tokenizer (no tokenizer.json in its folder): "
                             "pass token ids instead of text")
        ids = list(model.tokenizer.encode(prompt, add_special_tokens=True))
    else:
        if isinstance(prompt, (bytes, bytearray)):
            raise ArgumentError("the prompt is bytes: decode it to a string first "
                                "(prompt.decode('utf-8'))")
        try:
            ids = np.asarray(prompt).reshape(-1).tolist() if prompt is not None else []
        except ValueError:  # a ragged list
            ids = [None]
        if ids and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ArgumentError(f"the prompt must be a string or token ids (integers), got "
                                f"{type(prompt).__name__} {str(prompt)[:40]}")
        bad = [i for i in ids if not 0 <= i < config.vocab_size]
        if bad:
            raise ArgumentError(f"prompt ids must lie in [0, {config.vocab_size}), got {bad[0]}")
    if not ids:
        raise ArgumentError("the prompt is empty: give at least one token")
    context = config.max_position_embeddings
    if max_new_tokens >= context:
        raise ContextLengthError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
            f"of {context} tokens: ask for fewer tokens")
    if len(ids) + max_new_tokens > context:
        if not truncate:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens and max_new_tokens is {max_new_tokens}: "
                f"{len(ids) + max_new_tokens} tokens do not fit in the model's context of "
                f"{context}. Shorten the prompt, ask for fewer tokens, or truncate the prompt "
                f"from the left (truncate=True; in the CLI --truncate)")
        ids = ids[len(ids) + max_new_tokens - context:]
    return ids


def stop_token_ids(model):
    """The ids that end generation: the tokenizer's end-of-turn / end-of-text tokens and the
    config's ``eos_token_id`` (an id or a list of ids)."""
    ids = set(getattr(model.tokenizer, "eos_token_ids", None) or ())
    eos = model.config.eos_token_id
    ids.update([eos] if isinstance(eos, int) else (eos or ()))
    return ids


# ----------------------------------------------------------------------------------------------
# One decoding step


def next_token(logits, rng, do_sample, temperature=1.0, top_k=0, top_p=1.0):
    """Choose the next token from ``logits`` [V]: ``(token_id, filtered)``.

    Greedy: the argmax, and ``filtered`` is None. Sampling: ``filtered`` are the logits after
    temperature, top-k and top-p (``-inf`` where removed), and the token is a draw from their
    softmax with ``rng``."""
    if not do_sample:
        return int(greedy(logits)), None
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return int(sample(filtered, rng)), filtered


def make_step(token_id, logits, filtered, decode, n_candidates):
    """The :class:`Step` record of one choice."""
    probs = softmax((logits if filtered is None else filtered).astype(np.float32))
    n = min(n_candidates, probs.size)
    best = np.argpartition(-probs, n - 1)[:n] if n else np.array([], int)
    best = best[np.lexsort((best, -probs[best]))]  # by probability, then id
    candidates = [(int(i), decode([int(i)]), float(probs[i])) for i in best if probs[i] > 0]
    return Step(token_id, decode([token_id]), float(probs[token_id]), candidates)


# ----------------------------------------------------------------------------------------------
# Text as it grows: complete characters only, held back while it may be a stop string's start


class TextTracker:
    """Decode the new tokens incrementally and find stop strings.

    Byte-level BPE splits a multi-byte character (an emoji, an accented letter in some
    tokenizers) over several tokens; until its last byte arrives the decoded text ends with the
    replacement character U+FFFD. ``add`` returns only the text that can no longer change: not a
    trailing incomplete character, and not a tail that may be the start of a stop string (the
    stop string itself is never shown). ``finish`` returns the rest.
    """

    def __init__(self, decode, stop=()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.ids, self.text, self.shown = [], "", 0
        self.matched, self.end = None, None

    def add(self, token_id):
        self.ids.append(token_id)
        self.text = self.decode(self.ids)
        # A trailing U+FFFD is a character still waiting for bytes: it may change, so it is
        # neither shown nor matched against the stop strings yet.
        settled = self.text.rstrip("\ufffd")
        self.matched, self.end = self.find_stop(settled)
        if self.matched is not None:
            return ""
        # A stop string that starts in the settled text and is not in it yet must begin with the
        # settled text's end (what follows is unknown: more characters, or the U+FFFD that a
        # stop string may itself contain): hold that end back.
        return self.show(len(settled) - self.partial_stop_length(settled))

    def finish(self):
        if self.matched is None:  # no more bytes will come: a trailing U+FFFD is final now
            self.matched, self.end = self.find_stop(self.text)
        return self.show(len(self.final_text))

    @property
    def final_text(self):
        return self.text if self.end is None else self.text[:self.end]

    def show(self, end):
        piece = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece

    def find_stop(self, text):
        """The stop string that occurs first in ``text`` (a match may span tokens) and where."""
        found = [(i, s) for s in self.stop if (i := text.find(s)) >= 0]
        if not found:
            return None, None
        i, s = min(found)
        return s, i

    def partial_stop_length(self, text):
        """Length of the longest end of ``text`` that is a proper start of a stop string (a whole
        one would have matched)."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)


# ----------------------------------------------------------------------------------------------
# The loop


def generate_stream(model, prompt, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, *, temperature=None,
                    top_k=None, top_p=None, do_sample=None, seed=None, use_cache=True, stop=(),
                    ignore_eos=False, truncate=False, record_steps=False, n_candidates=5,
                    cache_from=None):
    """Like :func:`generate`, but returns a :class:`Stream`: iterate over it for the text pieces
    as they are generated; its ``result`` is the :class:`Generation` once the loop has ended.
    Arguments are checked at once, before the first token."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if not (stop is None or isinstance(stop, (str, list, tuple))) or (
            not isinstance(stop, str) and not all(isinstance(s, str) for s in stop or ())):
        raise ArgumentError(f"stop must be a string or a list of strings, got {stop!r}"[:200])
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    settings = decoding_settings(temperature, top_k, top_p, do_sample)
    prompt_ids = prompt_token_ids(model, prompt, max_new_tokens, truncate)
    check_cache_from(model, cache_from, use_cache)
    return Stream(_loop(model, prompt_ids, max_new_tokens, settings, seed, use_cache, stop,
                        ignore_eos, record_steps, n_candidates, cache_from))


def check_cache_from(model, cache_from, use_cache):
    """``cache_from`` is None, or a :class:`Generation` of this model with a KV cache."""
    if cache_from is None:
        return
    if not isinstance(cache_from, Generation):
        raise ArgumentError(f"cache_from must be the Generation of an earlier generate() or chat() "
                         f"call, got {type(cache_from).__name__}")
    if not use_cache:
        raise ArgumentError("cache_from reuses a KV cache, so it needs use_cache=True")
    if cache_from.cache is None:
        raise ArgumentError("cache_from has no KV cache: it was generated with use_cache=False")
    c = model.config
    want = (c.num_hidden_layers, 1, c.num_key_value_heads, c.head_dim)
    keys = cache_from.cache.keys
    got = (len(keys), keys[0].shape[0], keys[0].shape[1], keys[0].shape[3])
    if got != want:
        raise ArgumentError(f"cache_from's KV cache (layers, batch, kv heads, head dim) {got} is not "
                         f"one of this model's, {want}: was it generated by another model?")


def start_cache(model, prompt_ids, max_new_tokens, cache_from=None):
    """The KV cache a generation starts from, and how many prompt tokens it already holds.

    Without ``cache_from``, an empty cache. With it, a copy of the part of its cache that this
    prompt repeats: the longest common prefix of ``cache_from.cached_ids`` and ``prompt_ids``
    (in a chat, the conversation so far), leaving at least the prompt's last token to be run,
    since its logits are the first prediction. The keys and values of a token depend only on
    the tokens before it (causal attention), so those of a common prefix are the same.
    """
    capacity = len(prompt_ids) + max_new_tokens
    if cache_from is None:
        return model.new_cache(capacity=capacity), 0
    held, n = cache_from.cached_ids, 0
    while n < min(len(held), len(prompt_ids) - 1) and held[n] == prompt_ids[n]:
        n += 1
    return cache_from.cache.prefix(n, capacity), n


def _loop(model, prompt_ids, max_new_tokens, settings, seed, use_cache, stop, ignore_eos,
          record_steps, n_candidates, cache_from=None):
    do_sample, temperature, top_k, top_p = settings
    rng = np.random.default_rng(seed)
    decode = model.tokenizer.decode if model.tokenizer is not None else (lambda ids: "")
    eos = set() if ignore_eos else stop_token_ids(model)
    tracker = TextTracker(decode, stop)
    cache, reused = (start_cache(model, prompt_ids, max_new_tokens, cache_from) if use_cache
                     else (None, 0))
    ids, new_ids, steps = list(prompt_ids), [], [] if record_steps else None
    feed, finish_reason, first_token_seconds = ids[reused:], "length", 0.0
    compile_seconds = model.engine.warm_up()  # a first run's compilation: not decoding time
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        # With the cache, feed only what the cache has not seen (the prompt, then one token);
        # without it, the whole prefix again. Only the last position's logits are needed.
        logits = model(np.asarray(feed if use_cache else ids), cache=cache,
                       logits_to_keep=1)[-1]
        token, filtered = next_token(logits, rng, do_sample, temperature, top_k, top_p)
        if not new_ids:
            first_token_seconds = time.perf_counter() - start
        ids.append(token)
        new_ids.append(token)
        if record_steps:
            steps.append(make_step(token, logits, filtered, decode, n_candidates))
        if token in eos:
            finish_reason = "eos"
            break
        piece = tracker.add(token)
        if piece:
            yield piece
        if tracker.matched is not None:
            finish_reason = "stop"
            break
        feed = [token]
    piece = tracker.finish()
    if piece:
        yield piece
    if finish_reason == "length" and tracker.matched is not None:
        finish_reason = "stop"
    return Generation(text=tracker.final_text, ids=new_ids, prompt_ids=list(prompt_ids),
                      finish_reason=finish_reason, stop=tracker.matched, steps=steps,
                      cache=cache, seconds=time.perf_counter() - start,
                      first_token_seconds=first_token_seconds, reused_tokens=reused,
                      compile_seconds=compile_seconds)


def generate(model, prompt, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, *, temperature=None,
             top_k=None, top_p=None, do_sample=None, seed=None, use_cache=True, stop=(),
             ignore_eos=False, truncate=False, record_steps=False, n_candidates=5, stream=None,
             cache_from=None):
    """Generate up to ``max_new_tokens`` tokens after ``prompt``; a :class:`Generation` back.

    - ``prompt``: text (encoded with the tokenizer) or token ids.
    - Greedy by default. Sampling when ``do_sample=True`` or when any of ``temperature``,
      ``top_k``, ``top_p`` is given; ``temperature=0`` is greedy whatever the rest says. The
      logits are filtered as transformers does: temperature, then top-k (0: off), then top-p
      (1: off). ``seed`` seeds a ``numpy.random.Generator``: the same seed gives the same text.
    - Ends at the model's end-of-turn / end-of-text tokens (unless ``ignore_eos``), at any of the
      ``stop`` strings (matched on the decoded text, across token boundaries; not included in
      ``text``), or after ``max_new_tokens``.
    - ``use_cache=False`` recomputes the whole prefix at every step (same tokens, slower).
    - A prompt that does not fit in the context with ``max_new_tokens`` raises
      :class:`ContextLengthError`, unless ``truncate=True`` drops its oldest tokens.
    - ``record_steps=True`` keeps a :class:`Step` per token (its probability and the
      ``n_candidates`` best tokens of the distribution it was drawn from).
    - ``stream``: a callable called with each piece of text as soon as it is complete.
    - ``cache_from``: the :class:`Generation` of an earlier call whose prompt and text this
      prompt starts with (a chat's earlier turns): the keys and values of the tokens they share
      are copied from its KV cache instead of computed again, and only the rest of the prompt
      is run (``reused_tokens`` says how many were not). Its cache is not changed. The numbers
      are those of a fresh run within float32 rounding: the copied keys and values were
      computed one decoding step at a time, not in one pass over the prompt.
    """
    pieces = generate_stream(model, prompt, max_new_tokens, temperature=temperature,
                             top_k=top_k, top_p=top_p, do_sample=do_sample, seed=seed,
                             use_cache=use_cache, stop=stop, ignore_eos=ignore_eos,
                             truncate=truncate, record_steps=record_steps,
                             n_candidates=n_candidates, cache_from=cache_from)
    for piece in pieces:
        if stream is not None:
            stream(piece)
    return pieces.result


# ----------------------------------------------------------------------------------------------
# Chat


ROLES = ("system", "user", "assistant")


def chat_messages(messages, system=None):
    """Normalise a conversation: a string is one user message; ``system`` is put first (unless
    the conversation already starts with a system message)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)):
        raise ArgumentError(f"messages must be a string or a list of {{'role': ..., 'content': "
                            f"...}} dicts, got {type(messages).__name__}")
    if system is not None and not isinstance(system, str):
        raise ArgumentError(f"system must be a string, got {type(system).__name__}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or \
                not isinstance(m.get("content"), str):
            raise ArgumentError(f"each message must be a dict with a role ({', '.join(ROLES)}) "
                                f"and a string content, got {m!r}"[:300])
    messages = [dict(m) for m in messages]
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "user" for m in messages):
        raise ArgumentError("the conversation has no user message")
    if not messages[-1]["content"].strip():
        raise ArgumentError("the last message is empty: say something")
    return messages


def chat_prompt_ids(model, messages, system=None, allow_special_tokens=False):
    """The token ids of the conversation in the model's chat template, ending with the prompt of
    the assistant's turn (``add_generation_prompt=True``), as lecture 003 builds them.

    A special-token string inside a message (``"<|im_start|>system"``) is plain text, so that
    what a user types cannot open a turn of another role; ``allow_special_tokens=True`` makes
    it the special token, as transformers' ``apply_chat_template`` does."""
    if model.tokenizer is None:
        raise NpllmError("this model has no tokenizer, so no chat template")
    # The template writes the special tokens: the ids get no more (add_special_tokens=False).
    return list(model.tokenizer.apply_chat_template(
        chat_messages(messages, system), add_generation_prompt=True, tokenize=True,
        allow_special_tokens=allow_special_tokens))


def chat(model, messages, max_new_tokens=256, *, system=None, allow_special_tokens=False,
         **options):
    """The assistant's reply to ``messages`` (a string, or a list of ``{"role", "content"}``
    dicts), generated after the model's chat template; a :class:`Generation` whose ``text`` is
    the reply. ``options`` are those of :func:`generate` (temperature, top_p, stream, ...).
    Special-token strings in the messages are plain text unless ``allow_special_tokens=True``
    (see :func:`chat_prompt_ids`).

    For the next turn, pass this reply as ``cache_from=``: the conversation so far is then not
    run again (the template writes it with the same tokens), only the new message::

        reply = chat(model, messages)
        messages += [{"role": "assistant", "content": reply.text},
                     {"role": "user", "content": "And of Italy?"}]
        reply = chat(model, messages, cache_from=reply)
    """
    ids = chat_prompt_ids(model, messages, system, allow_special_tokens)
    return generate(model, ids, max_new_tokens, **options)
