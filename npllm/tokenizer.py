r"""Text <-> token ids, and chat messages -> the text a chat model was trained on.

A language model reads integers: lecture 000's :math:`P(s) = \prod_i P(s_i \mid s_{<i})` is over
*tokens* :math:`s_i`, pieces of text from a fixed vocabulary of V entries. :class:`Tokenizer`
wraps a Hugging Face ``tokenizer.json`` (run by the ``tokenizers`` library; npllm does no string
surgery of its own) and ``tokenizer_config.json`` (special tokens, the chat template).

SmolLM2 uses byte-level BPE: text is cut into pieces (every digit alone, words with their
leading space), each piece's UTF-8 bytes are merged into tokens by the learned merge list. Any
text can be encoded (there is no unknown token), and one character may take several tokens
(an emoji is 4 bytes).

Chat models are trained on conversations laid out with special tokens; the *chat template*
(Jinja, shipped with the model) renders a list of ``{"role", "content"}`` messages into that
layout. :meth:`Tokenizer.apply_chat_template` renders it the way transformers does.
"""
import json
import math
import re
import threading
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from npllm.errors import NpllmError

# Special tokens that end a turn or a document in common chat vocabularies. Present as special
# tokens, they stop generation too (besides eos_token): SmolLM2's <|endoftext|> and <|im_end|>.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>",
              "<end_of_turn>", "<|end|>", "</s>")


class TokenizerError(NpllmError):
    """Missing or unusable tokenizer files, no chat template, or messages not in chat format."""


def _token_content(value):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...} (None
    for anything else)."""
    value = value.get("content") if isinstance(value, Mapping) else value
    return value if isinstance(value, str) else None


def _read_json(path):
    """A JSON object from ``path`` ({} when the file is absent); a damaged one is a
    :class:`TokenizerError` naming the file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise ValueError(f"it holds a JSON {type(value).__name__}, not an object")
    except (OSError, ValueError, RecursionError) as e:
        raise TokenizerError(f"{path} is damaged ({_first_line(e)}); download the model again "
                             "(or re-import it)") from None
    return value


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _ids(value):
    """An id or a list of ids (config files use both) -> list."""
    values = [value] if not isinstance(value, (list, tuple)) else value
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def check_messages(messages):
    """Raise :class:`TokenizerError` unless ``messages`` is a list of {"role", "content"} dicts."""
    example = '[{"role": "user", "content": "Hello!"}]'
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"messages must be a list of dicts like {example}, "
                             f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"messages[{i}] must be a dict like {example[1:-1]}, "
                                 f"got {type(m).__name__}: {m!r}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = f"{type(m[key]).__name__}" if key in m else "nothing"
                raise TokenizerError(f"messages[{i}][{key!r}] must be a string, got {got} "
                                     f"(message: {m!r})")


# A chat template is code from the model's files: rendering it is bounded, so that a template
# (by mistake or on purpose) cannot hang npllm or fill its memory. A real template renders a
# conversation in a few thousand steps, into text about as long as the messages.
MAX_TEMPLATE_STEPS = 2_000_000      # lines of the compiled template run, loops included
MAX_TEMPLATE_CHARACTERS = 8_000_000  # of output, and of any string or list it builds


class ChatTemplateLimit(Exception):
    """Raised inside a render that went past a bound (turned into a :class:`TokenizerError`)."""


def _bounded_sandbox():
    """transformers' sandbox with bounds on what one operation or call may build."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def too_big(n, what):
        if n > MAX_TEMPLATE_CHARACTERS:
            raise ChatTemplateLimit(f"it builds {what} of {n:,} items, more than the "
                                    f"{MAX_TEMPLATE_CHARACTERS:,} allowed")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**", "%"])

        def call_binop(self, context, operator, left, right):
            sized = (str, list, tuple)
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, sized) and isinstance(n, int):
                        too_big(len(seq) * n, "a repeated sequence")
            elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
                too_big(len(left) + len(right), "a concatenation")
            elif operator == "**" and isinstance(left, (int, float)) and \
                    isinstance(right, (int, float)) and abs(left) > 1 and right > 0:
                too_big(int(abs(right) * math.log2(abs(left)) / 8), "a power (in bytes)")
            elif operator == "%" and isinstance(left, str):
                widths = [int(w) for w in re.findall(r"%[-+ #0]*(\d+)", left)]
                too_big(max(widths, default=0), "a %-format width")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            for value in (*args, *kwargs.values()):  # "x".ljust(10**9), "x".zfill(...)
                if isinstance(value, int) and not isinstance(value, bool):
                    too_big(value, "a call with a size")
            return super().call(__context, __obj, *args, **kwargs)

    return Bounded


def compile_chat_template(source):
    """A Jinja template in the sandbox transformers uses for chat templates (untrusted code).

    As ``transformers.utils.chat_template_utils``: ``ImmutableSandboxedEnvironment`` with
    ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter
    that does not escape HTML, and the globals ``raise_exception`` and ``strftime_now``. Bounded
    besides (:func:`render_chat_template`): no operation, call or filter may build more than
    :data:`MAX_TEMPLATE_CHARACTERS` items.
    """
    import functools

    import jinja2
    from jinja2.ext import loopcontrols

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def bounded_filter(f):
        @functools.wraps(f)  # keeps Jinja's pass_context/pass_environment marks
        def wrapper(*args, **kwargs):
            for value in (*args, *kwargs.values()):  # "x"|center(10**9), |indent(...)
                if isinstance(value, int) and not isinstance(value, bool) and \
                        value > MAX_TEMPLATE_CHARACTERS:
                    raise ChatTemplateLimit(f"a filter was given the size {value:,}, more than "
                                            f"the {MAX_TEMPLATE_CHARACTERS:,} allowed")
            return f(*args, **kwargs)
        return wrapper

    env = _bounded_sandbox()(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template is not valid Jinja: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a template too deeply nested, ...
        raise TokenizerError(f"the chat template cannot be compiled: {type(e).__name__}: "
                             f"{_first_line(e)}") from None


def render_chat_template(template, **variables):
    """``template.render(**variables)``, bounded: at most :data:`MAX_TEMPLATE_STEPS` lines of
    the compiled template run (counted with ``sys.settrace`` in the template's own frames: a
    deterministic bound, not a clock) and at most :data:`MAX_TEMPLATE_CHARACTERS` of output.
    Any failure (a bound, ``raise_exception``, ``{% include %}`` with no loader, a range the
    sandbox refuses, ...) is a :class:`TokenizerError`."""
    import sys

    import jinja2

    steps = 0

    def local(frame, event, arg):
        nonlocal steps
        steps += 1
        if steps > MAX_TEMPLATE_STEPS:
            raise ChatTemplateLimit(f"it ran more than {MAX_TEMPLATE_STEPS:,} steps")
        return local

    def calls(frame, event, arg):  # only the template's code is counted (compiled as <template>)
        return local if frame.f_code.co_filename == "<template>" else None

    pieces, size = [], 0
    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_TEMPLATE_CHARACTERS:
                raise ChatTemplateLimit(f"its output passed {MAX_TEMPLATE_CHARACTERS:,} "
                                        "characters")
            pieces.append(piece)
    except ChatTemplateLimit as e:
        raise TokenizerError(f"the chat template was stopped: {e} (a chat template renders a "
                             "conversation in far less); is the template broken?") from None
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template rejected the messages: {_first_line(e)}") \
            from None
    except Exception as e:  # noqa: BLE001 - the template is code from the model's files
        raise TokenizerError(f"the chat template failed: {type(e).__name__}: {_first_line(e)}") \
            from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)


class Tokenizer:
    """A model's tokenizer: ``tokenizer.json`` + ``tokenizer_config.json`` of a model folder.

    >>> tok = Tokenizer.from_folder(folder)                 # doctest: +SKIP
    >>> ids = tok.encode("The capital of France is")        # doctest: +SKIP
    >>> tok.decode(ids)                                      # doctest: +SKIP
    'The capital of France is'
    """

    def __init__(self, backend, config=None, stop_ids=()):
        """``backend``: a ``tokenizers.Tokenizer``; ``config``: the tokenizer_config.json dict;
        ``stop_ids``: extra ids that end generation (from generation_config.json / config.json).
        """
        self.backend = backend
        self.config = dict(config or {})
        self.special_tokens = {name: _token_content(self.config[name])
                               for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                               if _token_content(self.config.get(name)) is not None}
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template
                     if isinstance(t, Mapping)}
            self.chat_template = named.get("default", next(iter(named.values()), None))
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise TokenizerError(f"the chat template must be a string (Jinja source), got "
                                 f"{type(self.chat_template).__name__}; is "
                                 "tokenizer_config.json damaged?")
        self._compiled_template = None
        self._lock = threading.Lock()
        self.added_special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        ends = [self.eos_token_id, *stop_ids]
        ends += [i for i in map(self.token_to_id, END_TOKENS) if i in self.added_special_ids]
        # All ids that end generation, eos_token_id first.
        self.eos_token_ids = tuple(dict.fromkeys(i for i in ends if i is not None))

    @classmethod
    def from_folder(cls, path):
        """Load ``tokenizer.json`` and, when present, ``tokenizer_config.json`` (the chat template
        may also be in ``chat_template.jinja``), ``generation_config.json`` and ``config.json``
        (their ``eos_token_id``, one id or a list, also stops generation)."""
        from tokenizers import Tokenizer as Backend

        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}; npllm needs the fast (Rust) "
                                 "tokenizer file that Hugging Face model folders ship")
        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise TokenizerError(f"{folder / 'tokenizer.json'} is damaged or not a tokenizers "
                                 f"file ({_first_line(e)}); download the model again (or "
                                 "re-import it)") from None
        config = _read_json(folder / "tokenizer_config.json")
        if not config.get("chat_template") and (folder / "chat_template.jinja").is_file():
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        stop_ids = [*_ids(_read_json(folder / "generation_config.json").get("eos_token_id")),
                    *_ids(_read_json(folder / "config.json").get("eos_token_id"))]
        return cls(backend, config, stop_ids)

    # -- vocabulary -----------------------------------------------------------------------

    @property
    def vocab_size(self):
        """Number of token ids (V), added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        """The id of a token string (as the vocabulary spells it: ``Ġthe``), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id):
        """The vocabulary entry of an id (byte-level spelling: a leading space is ``Ġ``)."""
        token = self.backend.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id must be in [0, {self.vocab_size}), got {token_id}")
        return token

    def _special_id(self, name):
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self):
        """Id of the beginning-of-sequence token (SmolLM2: ``<|im_start|>``), or None."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self):
        """Id of the end-of-sequence token (SmolLM2-Instruct: ``<|im_end|>``), or None."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self):
        """Id of the padding token, or None."""
        return self._special_id("pad_token")

    # -- text <-> ids ---------------------------------------------------------------------

    def _add_special(self, ids, offsets):
        """Prepend BOS / append EOS when tokenizer_config.json asks for it (add_bos_token /
        add_eos_token) and the tokenizer's own post-processor has not already done so."""
        bos, eos = self.bos_token_id, self.eos_token_id
        if self.config.get("add_bos_token") and bos is not None and ids[:1] != [bos]:
            ids, offsets = [bos, *ids], [(0, 0), *offsets]
        if self.config.get("add_eos_token") and eos is not None and ids[-1:] != [eos]:
            end = offsets[-1][1] if offsets else 0
            ids, offsets = [*ids, eos], [*offsets, (end, end)]
        return ids, offsets

    def encode_with_offsets(self, text, add_special_tokens=False, split_special_tokens=False):
        """``text`` -> (ids, offsets): ``text[start:end]`` is the text of token i, in characters
        (Python string indices, not bytes). Tokens that share a character (the bytes of one
        emoji) share its span; added BOS/EOS tokens get an empty span.
        ``split_special_tokens=True``: special-token strings in ``text`` are plain text (as in
        transformers), not their special ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if split_special_tokens:
            with self._lock:  # the flag is the backend's: set it for this call only
                self.backend.encode_special_tokens = True
                try:
                    enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
                finally:
                    self.backend.encode_special_tokens = False
        else:
            enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        return self._add_special(ids, offsets) if add_special_tokens else (ids, offsets)

    def encode(self, text, add_special_tokens=False, split_special_tokens=False):
        """``text`` -> token ids. Special tokens written in the text (``<|im_start|>``) become
        their single ids, unless ``split_special_tokens=True`` (then they are plain text).
        ``add_special_tokens=True`` adds BOS when tokenizer_config.json says so
        (``add_bos_token``; SmolLM2: no)."""
        return self.encode_with_offsets(text, add_special_tokens, split_special_tokens)[0]

    def decode(self, ids, skip_special_tokens=False):
        """Token ids -> text. Incomplete UTF-8 (half an emoji) decodes to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False,
                            allow_special_tokens=True, **template_kwargs):
        """Render chat ``messages`` (a list of ``{"role": ..., "content": ...}``) with the
        model's chat template, as transformers' ``apply_chat_template`` does.

        ``add_generation_prompt`` appends the opening of the assistant's turn
        (``<|im_start|>assistant\\n``) so the model continues as the assistant. The template sees
        ``messages``, ``add_generation_prompt``, the special tokens (``bos_token``,
        ``eos_token``, ...) and ``template_kwargs``. Returns the text, or its ids (without
        added special tokens) when ``tokenize=True``.

        ``allow_special_tokens`` (with ``tokenize=True``): whether a special-token string
        written in a message's content (``"<|im_start|>system"``) becomes that special token, as
        in transformers (True, the default here), or stays plain text (False), so that no
        message can open a new turn (:func:`npllm.chat` uses False unless asked).
        Rendering is bounded (:func:`render_chat_template`); every failure of the template is a
        :class:`TokenizerError`.
        """
        check_messages(messages)
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (no chat_template in "
                                 "tokenizer_config.json): it is not a chat model; encode "
                                 "plain text instead")
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        variables = {**self.special_tokens, **template_kwargs}
        messages = [dict(m) for m in messages]
        protect = tokenize and not allow_special_tokens and self._special_pattern(messages)
        if protect:  # the special-token strings of the content go through as placeholders
            marker = next(chr(c) for c in range(0xF0000, 0xFFFFE)
                          if not any(chr(c) in m["content"] for m in messages))
            names = {t: f"{marker}{i}{marker}" for i, t in enumerate(self.special_strings)}
            for m in messages:
                m["content"] = protect.sub(lambda x: names[x.group(0)], m["content"])
        text = render_chat_template(self._compiled_template, messages=messages,
                                    add_generation_prompt=add_generation_prompt, tools=None,
                                    documents=None, **variables)
        if not tokenize:
            return text
        if not protect:
            return self.encode(text)
        # Special tokens the template wrote are special; between them, the text (the content's
        # special-token strings put back) is encoded as plain text. Encoding splits the text at
        # special tokens first in the same way (SmolLM2's added tokens strip no spaces).
        back = {v: k for k, v in names.items()}
        unname = re.compile("|".join(map(re.escape, back)))
        ids = []
        for i, part in enumerate(self._special_pattern(None).split(text)):
            if i % 2:
                ids.append(self.token_to_id(part))
            elif part:
                ids += self.encode(unname.sub(lambda x: back[x.group(0)], part),
                                   split_special_tokens=True)
        return ids

    @property
    def special_strings(self):
        """The strings of the special added tokens (``<|im_start|>``, ...), longest first."""
        return sorted((self.backend.id_to_token(i) for i in self.added_special_ids),
                      key=lambda t: (-len(t), t))

    def _special_pattern(self, messages):
        """A regex of the special-token strings, split into groups; with ``messages``, only
        when their content holds one (else None)."""
        if not self.added_special_ids:
            return None
        pattern = re.compile("(" + "|".join(map(re.escape, self.special_strings)) + ")")
        if messages is not None and not any(pattern.search(m["content"]) for m in messages):
            return None
        return pattern

    def __repr__(self):
        special = ", ".join(f"{k}={v!r}" for k, v in self.special_tokens.items())
        return f"Tokenizer(vocab_size={self.vocab_size}, {special})"
