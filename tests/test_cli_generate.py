"""``npllm generate`` and ``npllm chat`` (issue 5): streaming output, --json, --steps, the chat
loop from a pipe (/reset, /quit), and bad input -> one clear line on stderr, exit status 2.

Most tests run the command in-process on a tiny model; two run the installed command in a
subprocess, as a user would: a bad argument (no traceback) and
``echo "What is the capital of France?" | npllm chat`` on the default model.
"""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npllm.cli import main
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def tiny():
    return str(tiny_llama())


def run_cli(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def npllm_command():
    """The installed ``npllm`` script next to this Python, else ``python -m npllm``."""
    script = Path(sys.executable).with_name("npllm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "npllm"]


# ---------------------------------------------------------------------------------------------
# npllm generate


def test_generate_streams_the_continuation(capsys, tiny):
    status, out, err = run_cli(capsys, "generate", "-m", tiny, "--backend", "numpy", "-n", 12,
                               "The quick brown fox")
    assert status == 0
    from npllm.generate import generate
    import npllm
    expected = generate(npllm.load(tiny, backend="numpy"), "The quick brown fox", 12)
    assert out == expected.text + "\n"
    assert f"[{len(expected.ids)} tokens, {expected.finish_reason}," in err


def test_generate_json_and_steps(capsys, tiny):
    status, out, _ = run_cli(capsys, "generate", "-m", tiny, "--backend", "numpy", "-n", 8,
                             "--temperature", 0.7, "--top-k", 20, "--seed", 5, "--steps",
                             "--json", "Hello, world!")
    assert status == 0
    data = json.loads(out)
    assert data["prompt"] == "Hello, world!"
    assert len(data["ids"]) == len(data["steps"]) <= 8
    assert data["finish_reason"] in ("eos", "stop", "length")
    step = data["steps"][0]
    assert step["token_id"] == data["ids"][0] and 0 < step["prob"] <= 1
    assert len(step["candidates"]) <= 5
    # The same seed again gives the same text.
    again = json.loads(run_cli(capsys, "generate", "-m", tiny, "--backend", "numpy", "-n", 8,
                               "--temperature", 0.7, "--top-k", 20, "--seed", 5, "--json",
                               "Hello, world!")[1])
    assert again["text"] == data["text"]


def test_generate_steps_table(capsys, tiny):
    argv = ["generate", "-m", tiny, "--backend", "numpy", "-n", 4, "The cache"]
    status, out, _ = run_cli(capsys, *argv, "--steps", "--candidates", 3)
    assert status == 0
    ids = json.loads(run_cli(capsys, *argv, "--json")[1])["ids"]
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["step", "id", "prob",
                                                                            "token"])
    rows = lines[header + 1:]
    assert [int(r.split()[1]) for r in rows] == ids  # one row per token: step, id, prob, ...


def test_generate_chat_flag_and_stop(capsys, tiny):
    status, out, _ = run_cli(capsys, "generate", "-m", tiny, "--backend", "numpy", "-n", 5,
                             "--chat", "--system", "Be brief.", "--json", "Hi")
    assert status == 0
    prompt = json.loads(out)["prompt"]
    assert prompt.startswith("<|im_start|>system\nBe brief.") and prompt.endswith("assistant\n")
    argv = ["generate", "-m", tiny, "--backend", "numpy", "-n", 20, "--json", "The quick brown"]
    free = json.loads(run_cli(capsys, *argv)[1])["text"]
    stop = free[5:8]
    stopped = json.loads(run_cli(capsys, *argv, "--stop", stop, "--stop", "absent")[1])
    assert stopped["finish_reason"] == "stop" and stopped["stop"] == stop
    assert stopped["text"] == free[:free.index(stop)]


BAD_INPUT = [
    (["generate", "-n", "-1", "hi"], "max_new_tokens must be a positive integer"),
    (["generate", "--temperature", "-0.5", "hi"], "temperature must be a finite number >= 0"),
    (["generate", "--top-k", "-2", "hi"], "top_k must be an integer >= 0"),
    (["generate", "--top-p", "0", "hi"], "top_p must lie in (0, 1]"),
    (["generate", "--top-p", "1.5", "hi"], "top_p must lie in (0, 1]"),
    (["generate", ""], "the prompt is empty"),
    (["generate", "-m", "no-such-org/no-such-model", "hi"], "no-such-org/no-such-model"),
    (["chat", "-n", "-3"], "max_new_tokens must be a positive integer"),
    (["chat", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["chat", "--top-k", "-1"], "top_k must be an integer >= 0"),
    (["chat", "--top-p", "2"], "top_p must lie in (0, 1]"),
    (["chat", "-m", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_exit_2(capsys, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown name must not wait for the network
    status, out, err = run_cli(capsys, *argv, stdin="hello\n", monkeypatch=monkeypatch)
    assert status == 2 and out == ""
    assert err.startswith(f"npllm {argv[0]}: error: ") and message in err
    assert "Traceback" not in err


def test_context_overflow_in_the_cli(capsys, tiny):
    status, _, err = run_cli(capsys, "generate", "-m", tiny, "--backend", "numpy", "-n", 250,
                             "The quick brown fox jumps over the lazy dog")
    assert status == 2 and "--truncate" in err
    status, out, _ = run_cli(capsys, "generate", "-m", tiny, "--backend", "numpy", "-n", 250,
                             "--truncate", "--json", "The quick brown fox jumps over the lazy dog")
    assert status == 0 and len(json.loads(out)["prompt_ids"]) == 256 - 250


def test_bad_input_in_a_subprocess_has_no_traceback():
    done = subprocess.run([*npllm_command(), "generate", "--top-p", "2", "hello"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "npllm generate: error: top_p must lie in (0, 1] (1 keeps every token), got 2.0"]


# ---------------------------------------------------------------------------------------------
# npllm chat


def test_chat_from_a_pipe_one_message_per_line(capsys, monkeypatch, tiny):
    lines = "Hello!\n\nWhat is the capital of France?\n/reset\nWhat is the capital of France?\n" \
            "/quit\nnever read\n"
    status, out, err = run_cli(capsys, "chat", "-m", tiny, "--backend", "numpy", "-n", 6,
                               "--json", stdin=lines, monkeypatch=monkeypatch)
    assert status == 0
    turns = [json.loads(line) for line in out.splitlines()]
    assert [t["user"] for t in turns] == ["Hello!", "What is the capital of France?",
                                          "What is the capital of France?"]
    # Turn 2 sees turn 1 in its prompt; after /reset turn 3 starts over with the same question.
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"] + turns[0]["tokens"]
    assert turns[2]["prompt_tokens"] < turns[1]["prompt_tokens"]
    import npllm
    from npllm.generate import chat_prompt_ids
    fresh = chat_prompt_ids(npllm.load(tiny, backend="numpy"), "What is the capital of France?")
    assert turns[2]["prompt_tokens"] == len(fresh) and "(conversation reset)" in err
    # Turn 2 starts from turn 1's KV cache (at least its prompt); /reset forgets it.
    assert turns[0]["reused_prompt_tokens"] == 0 == turns[2]["reused_prompt_tokens"]
    assert turns[1]["reused_prompt_tokens"] >= turns[0]["prompt_tokens"]


def test_chat_without_the_cache(capsys, monkeypatch, tiny):
    """--no-cache: every turn recomputes its whole prompt, and says so."""
    status, out, err = run_cli(capsys, "chat", "-m", tiny, "--backend", "numpy", "-n", 4,
                               "--no-cache", "--json", stdin="Hello!\nAnd again?\n",
                               monkeypatch=monkeypatch)
    assert status == 0, err
    turns = [json.loads(line) for line in out.splitlines()]
    assert len(turns) == 2 and [t["reused_prompt_tokens"] for t in turns] == [0, 0]


def test_chat_plain_output_and_unknown_command(capsys, monkeypatch, tiny):
    status, out, err = run_cli(capsys, "chat", "-m", tiny, "--backend", "numpy", "-n", 4,
                               "--system", "Be brief.", "--temperature", "0.2", "--top-p", "0.9",
                               "--seed", "1", stdin="/frobnicate\nHi\n", monkeypatch=monkeypatch)
    assert status == 0
    assert "unknown command /frobnicate" in err and "/reset" in err
    assert out.strip() and out.endswith("\n")  # the reply, then a newline


@pytest.mark.real_model
def test_echo_capital_of_france_into_npllm_chat_says_paris():
    """The issue's acceptance check, verbatim: ``echo ... | npllm chat`` on the default model."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    echo = shutil.which("echo")
    producer = subprocess.Popen([echo, "What is the capital of France?"], stdout=subprocess.PIPE)
    done = subprocess.run([*npllm_command(), "chat"], stdin=producer.stdout, capture_output=True,
                          text=True, timeout=600, env=env)
    producer.wait()
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "Traceback" not in done.stderr


def test_chat_in_a_terminal(capsys, monkeypatch, tiny):
    """Interactive mode: a prompt per message, /reset, and Ctrl-D (EOF) ends the chat."""
    typed = iter(["Hello!", "/reset", "Hi again"])

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", fake_input)
    status, out, err = run_cli(capsys, "chat", "-m", tiny, "--backend", "numpy", "-n", 3,
                               "--json")
    assert status == 0
    assert "Chatting with" in err and "/quit" in err and "(conversation reset)" in err
    assert [json.loads(line)["user"] for line in out.splitlines()] == ["Hello!", "Hi again"]
