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
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, Mapping) else value


def _read_json(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _ids(value):
    """An id or a list of ids (config files use both) -> list."""
    return [] if value is None else [value] if isinstance(value, int) else list(value)


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


def compile_chat_template(source):
    """A Jinja template in the sandbox transformers uses for chat templates (untrusted code).

    As ``transformers.utils.chat_template_utils``: ``ImmutableSandboxedEnvironment`` with
    ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter
    that does not escape HTML, and the globals ``raise_exception`` and ``strftime_now``.
    """
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template is not valid Jinja: {e}") from e


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
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values()), None))
        self._compiled_template = None
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
        backend = Backend.from_file(str(folder / "tokenizer.json"))
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

    def encode_with_offsets(self, text, add_special_tokens=False):
        """``text`` -> (ids, offsets): ``text[start:end]`` is the text of token i, in characters
        (Python string indices, not bytes). Tokens that share a character (the bytes of one
        emoji) share its span; added BOS/EOS tokens get an empty span."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        ids, offsets = list(enc.ids), [tuple(o) for o in enc.offsets]
        return self._add_special(ids, offsets) if add_special_tokens else (ids, offsets)

    def encode(self, text, add_special_tokens=False):
        """``text`` -> token ids. Special tokens written in the text (``<|im_start|>``) become
        their single ids. ``add_special_tokens=True`` adds BOS when tokenizer_config.json says
        so (``add_bos_token``; SmolLM2: no)."""
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def decode(self, ids, skip_special_tokens=False):
        """Token ids -> text. Incomplete UTF-8 (half an emoji) decodes to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False,
                            **template_kwargs):
        """Render chat ``messages`` (a list of ``{"role": ..., "content": ...}``) with the
        model's chat template, as transformers' ``apply_chat_template`` does.

        ``add_generation_prompt`` appends the opening of the assistant's turn
        (``<|im_start|>assistant\\n``) so the model continues as the assistant. The template sees
        ``messages``, ``add_generation_prompt``, the special tokens (``bos_token``,
        ``eos_token``, ...) and ``template_kwargs``. Returns the text, or its ids (without
        added special tokens) when ``tokenize=True``.
        """
        import jinja2

        check_messages(messages)
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (no chat_template in "
                                 "tokenizer_config.json): it is not a chat model; encode "
                                 "plain text instead")
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self.chat_template)
        variables = {**self.special_tokens, **template_kwargs}
        try:
            text = self._compiled_template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                tools=None, documents=None, **variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template rejected the messages: {e}") from e
        return self.encode(text) if tokenize else text

    def __repr__(self):
        special = ", ".join(f"{k}={v!r}" for k, v in self.special_tokens.items())
        return f"Tokenizer(vocab_size={self.vocab_size}, {special})"
