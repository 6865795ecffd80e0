"""npllm.tokenizer.Tokenizer: encoding, decoding, offsets, special tokens, the chat template.

References: the tokenizer imported from the default GGUF (``real_model`` tests), transformers'
``PreTrainedTokenizerFast`` on the same tokenizer.json and template (chat template rendering),
transformers' own GGUF tokenizer conversion (same ids except around digits: it ignores
``tokenizer.ggml.pre = smollm``), and the tiny SmolLM2-shaped tokenizer of tiny_models.py (fast
tests that need no model file).
"""
import json

import pytest

from npllm.errors import NpllmError
from npllm.tokenizer import Tokenizer, TokenizerError
from tiny_models import load_reference_tokenizer, save_tokenizer

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It was a sunny afternoon in Paris.",
    "code": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\n# done\t\n",
    "digits": "In 1969, 3 astronauts flew 384400 km; 2 + 2 = 4 and 12345 * 6 = 74070.",
    "accents": "Le cœur a ses raisons. Die Katze schläft über dem Sofa. ¿Qué tal, señor?",
    "cjk": "猫はかわいい。我喜欢自然语言处理。한국어 문장입니다.",
    "emoji": "Great job 🙂👍🏽 — family: 👨‍👩‍👧 ✨",
    "whitespace": "  leading spaces,\ttabs,\r\nCRLF and trailing   ",
    "special": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
}
# Texts without digits: there transformers' GGUF tokenizer must agree with ours exactly.
NO_DIGITS = {name: t for name, t in TEXTS.items()
             if not any(c.isdigit() for c in t)}
CHATS = {
    "one user message": [{"role": "user", "content": "What is the capital of France?"}],
    "system and turns": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Arr, hello."},
        {"role": "user", "content": "Where is the treasure? 🙂"},
    ],
    "no system, two turns": [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ],
}
SMOLLM2_CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def pieces(tok, text):
    return [tok.decode([i]) for i in tok.encode(text)]


def assert_offsets_cover(tok, text, ids, offsets):
    """Offsets are character spans, in order, covering the text without gaps; a token's span is
    exactly its text unless the token holds only part of a character's bytes."""
    assert len(ids) == len(offsets)
    covered = 0
    for i, (start, end) in zip(ids, offsets):
        assert start <= covered <= end or start == covered, (text, start, end, covered)
        covered = max(covered, end)
        piece = tok.decode([i])
        if "\ufffd" not in piece:
            assert text[start:end] == piece, (text[start:end], piece)
    assert covered == len(text)


# --- the default model's tokenizer -------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(converted_default_folder):
    return converted_default_folder


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def hf_gguf_tokenizer():
    """transformers' conversion of the GGUF vocabulary (GGUFGPTConverter-style byte-level BPE)."""
    from transformers import AutoTokenizer

    from conftest import default_gguf_path

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.real_model
def test_vocabulary_and_special_tokens(tok):
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == (2, 0)  # <|im_end|>, then <|endoftext|>
    assert tok.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}
    for token, i in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)]:
        assert tok.token_to_id(token) == i and tok.id_to_token(i) == token
        assert tok.encode(token) == [i]
    assert tok.id_to_token(378) == "ĠThe" and tok.token_to_id("ĠThe") == 378
    assert tok.token_to_id("no such token") is None
    with pytest.raises(ValueError, match="token id"):
        tok.id_to_token(49152)


@pytest.mark.real_model
def test_smollm_pre_tokenizer_splits_digits(tok):
    assert pieces(tok, "\n    1. The") == ["\n    ", "1", ".", " The"]
    assert pieces(tok, "12345") == ["1", "2", "3", "4", "5"]
    assert pieces(tok, "x  12") == ["x", "  ", "1", "2"]
    assert pieces(tok, "In 1969") == ["In", " ", "1", "9", "6", "9"]
    # \p{N} covers more than ASCII digits: superscripts, Arabic-Indic digits, fractions. Each
    # is a piece of its own (one character; the vocabulary may spell its bytes with 2 tokens).
    assert [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("x²٣½")] == \
        ["x", "Â²", "Ù£", "Â½"]  # byte-level spelling of the UTF-8 bytes
    assert sorted(set(tok.encode_with_offsets("x²٣½")[1])) == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(tok, name):
    text = TEXTS[name]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text, add_special_tokens=True) == tok.encode(text)  # add_bos_token: false


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_offsets_cover_the_text(tok, name):
    text = TEXTS[name]
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert_offsets_cover(tok, text, ids, offsets)


@pytest.mark.real_model
def test_offsets_are_characters_not_bytes(tok):
    text = "é猫🙂!"  # 2 + 3 + 4 + 1 bytes, 4 characters
    ids, offsets = tok.encode_with_offsets(text)
    assert offsets[-1] == (3, 4) and tok.decode(ids[-1:]) == "!"
    assert {o for o, i in zip(offsets, ids) if "\ufffd" in tok.decode([i])} <= {(1, 2), (2, 3)}


@pytest.mark.real_model
def test_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


@pytest.mark.real_model
def test_chat_template_renders_smollm2_chatml(tok):
    chat = CHATS["one user message"]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == SMOLLM2_CHAT
    assert tok.apply_chat_template(chat) == SMOLLM2_CHAT.removesuffix("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert ids == tok.encode(SMOLLM2_CHAT) and ids[0] == 1 and ids.count(2) == 2


@pytest.mark.real_model
@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CHATS))
def test_chat_template_equals_transformers(tok, folder, name, generation_prompt):
    """transformers renders the same template string with its own Jinja setup."""
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text())
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), chat_template=config["chat_template"],
        bos_token=config["bos_token"], eos_token=config["eos_token"])
    expected = reference.apply_chat_template(CHATS[name], tokenize=False,
                                             add_generation_prompt=generation_prompt)
    assert tok.apply_chat_template(CHATS[name], add_generation_prompt=generation_prompt) == expected
    assert tok.encode(expected) == reference.encode(expected, add_special_tokens=False)


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(NO_DIGITS))
def test_equals_transformers_gguf_tokenizer_without_digits(tok, hf_gguf_tokenizer, name):
    text = NO_DIGITS[name]
    assert tok.encode(text) == hf_gguf_tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.real_model
def test_transformers_gguf_tokenizer_ignores_the_smollm_pre_tokenizer(tok, hf_gguf_tokenizer):
    """transformers builds a plain GPT-2 pre-tokenizer for ``pre = smollm``: its regex
    ``\\s+(?!\\S)`` leaves the last space of a run to join the digits (`` 1``), and as SmolLM2's
    vocabulary has no space+digit token, that space becomes a token of its own. SmolLM2 was
    trained with digits split off first (as llama.cpp does for ``smollm``), so ours is right."""
    text = "\n    1. The"
    theirs = hf_gguf_tokenizer.encode(text, add_special_tokens=False)
    assert [hf_gguf_tokenizer.decode([i]) for i in theirs] == ["\n   ", " ", "1", ".", " The"]
    assert pieces(tok, text) == ["\n    ", "1", ".", " The"]
    # Digits not preceded by whitespace runs come out the same either way.
    same = "Version 2.0 of 3 things"
    assert tok.encode(same) == hf_gguf_tokenizer.encode(same, add_special_tokens=False)
    differ = [t for t in ["x  12", "a = [1, 2,  3]", "1\n\n2", TEXTS["digits"], TEXTS["code"]]
              if tok.encode(t) != hf_gguf_tokenizer.encode(t, add_special_tokens=False)]
    assert differ == ["x  12", "a = [1, 2,  3]", "1\n\n2"]


# --- errors and configuration (tiny tokenizer: no model file needed) --------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return Tokenizer.from_folder(tiny_folder)


@pytest.mark.parametrize("messages, message", [
    ("Hello", "messages must be a list of dicts.*got str"),
    ({"role": "user", "content": "Hello"}, "messages must be a list of dicts.*got dict"),
    ([("user", "Hello")], r"messages\[0\] must be a dict.*got tuple"),
    ([{"role": "user"}], r"messages\[0\]\['content'\] must be a string, got nothing"),
    ([{"content": "Hello"}], r"messages\[0\]\['role'\] must be a string, got nothing"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
     r"messages\[1\]\['content'\] must be a string, got int"),
    (None, "messages must be a list of dicts.*got NoneType"),
])
def test_bad_chat_messages_are_clear_errors(tiny, messages, message):
    with pytest.raises(TokenizerError, match=message):
        tiny.apply_chat_template(messages)


def test_tiny_matches_transformers(tiny, tiny_folder):
    reference = load_reference_tokenizer(tiny_folder)
    for text in TEXTS.values():
        assert tiny.encode(text) == reference.encode(text, add_special_tokens=False)
        ids, offsets = tiny.encode_with_offsets(text)
        assert_offsets_cover(tiny, text, ids, offsets)
    for chat in CHATS.values():
        assert (tiny.apply_chat_template(chat, add_generation_prompt=True)
                == reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert tiny.eos_token_ids == (2, 0) and tiny.bos_token_id == 1


def test_add_bos_token_from_config(tiny):
    with_bos = Tokenizer(tiny.backend, {**tiny.config, "add_bos_token": True})
    assert with_bos.encode("Hello", add_special_tokens=True) == [1, *tiny.encode("Hello")]
    assert with_bos.encode("Hello") == tiny.encode("Hello")
    ids, offsets = with_bos.encode_with_offsets("Hello", add_special_tokens=True)
    assert ids[0] == 1 and offsets[0] == (0, 0)


def test_template_errors_and_missing_template(tiny):
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversations must start with the user') }}"
                "{% endif %}{{ bos_token }}{{ messages[0]['content'] }}")
    strict = Tokenizer(tiny.backend, {**tiny.config, "chat_template": template})
    assert strict.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi"
    with pytest.raises(TokenizerError, match="rejected the messages: Conversations must start"):
        strict.apply_chat_template([{"role": "assistant", "content": "hi"}])
    base = Tokenizer(tiny.backend, {k: v for k, v in tiny.config.items() if k != "chat_template"})
    with pytest.raises(TokenizerError, match="no chat template"):
        base.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = Tokenizer(tiny.backend, {**tiny.config, "chat_template": "{% for %}"})
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_sandbox(tiny):
    """Chat templates come from the internet: the sandbox refuses Python internals."""
    sneaky = Tokenizer(tiny.backend, {**tiny.config, "chat_template":
                                      "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(Exception, match="unsafe|access"):
        sneaky.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(NpllmError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_decode_rejects_ids_outside_the_vocabulary(tiny):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 384\)"):
        tiny.decode([1, 384])
    with pytest.raises(TypeError):
        tiny.encode(b"bytes")
