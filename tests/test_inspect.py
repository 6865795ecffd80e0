"""Anatomy and views (issue 7): parameter table, lecture 000's answers, next token, logit lens,
embedding PCA, positional encodings."""
import json

import numpy as np
import pytest
import torch

import npllm
from npllm import inspect as views
from npllm.cli import main
from npllm.equations import (apply_rope, filter_logits, llama_parameter_counts, rope_cos_sin,
                             rope_inverse_frequencies, softmax)
from tiny_models import load_reference, tiny_llama


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request):
    folder = tiny_llama(tie_word_embeddings=request.param)
    return npllm.load(str(folder)), load_reference(folder)


def test_parameter_total_equals_transformers_num_parameters_tiny(tiny):
    model, ref = tiny
    summary = views.parameter_summary(model)
    assert summary.total == ref.num_parameters() == model.num_parameters()
    hf = dict(ref.named_parameters(remove_duplicate=False))
    assert len(summary.rows) == len(hf) + (model.config.tie_word_embeddings and "lm_head.weight"
                                           not in hf)
    for row in summary.rows:
        if row["name"] in hf:
            assert row["shape"] == tuple(hf[row["name"]].shape)
    assert summary.groups["lm_head"] == (0 if model.config.tie_word_embeddings else
                                         model.config.vocab_size * model.config.hidden_size)
    assert abs(sum(summary.shares.values()) - 1) < 1e-12


@pytest.mark.real_model
def test_parameter_table_of_the_default_model(default_model, hf_gguf_model):
    summary = views.parameter_summary(default_model)
    assert summary.total == hf_gguf_model.num_parameters() == 134_515_008
    assert summary.groups == {"embeddings": 28_311_552, "attention": 26_542_080,
                              "mlp": 79_626_240, "norms": 35_136, "lm_head": 0}
    c = default_model.config
    counts = llama_parameter_counts(c.vocab_size, c.hidden_size, c.intermediate_size,
                                    c.num_hidden_layers, c.num_attention_heads,
                                    c.num_key_value_heads, c.head_dim, True)
    assert counts["total"] == summary.total
    text = summary.table(tensors=True)
    assert "model.layers.*.self_attn.k_proj.weight" in text and "30 x [192, 576]" in text
    assert "59.2%" in text and "19.7%" in text and "(tied)" in text
    assert summary.rows[-1] == {"name": "lm_head.weight", "shape": (49152, 576),
                                "count": 28_311_552, "group": "lm_head", "tied": True}
    # The tree and the table give the norms the same share, not 0.0% in one (issue 18).
    share = f"{100 * summary.groups['norms'] / summary.total:.2f}%"
    assert share in text and f"{summary.groups['norms']:,}   {share}  (all norms)" in repr(
        default_model)


@pytest.mark.real_model
def test_lecture_000_answers(default_model, hf_gguf_model):
    answers = views.lecture_000(default_model)
    assert answers.attention_shapes == {
        "model.layers.0.self_attn.q_proj.weight": (576, 576),
        "model.layers.0.self_attn.k_proj.weight": (192, 576),
        "model.layers.0.self_attn.v_proj.weight": (192, 576),
        "model.layers.0.self_attn.o_proj.weight": (576, 576)}
    assert answers.mlp_shapes == {"model.layers.0.mlp.gate_proj.weight": (1536, 576),
                                  "model.layers.0.mlp.up_proj.weight": (1536, 576),
                                  "model.layers.0.mlp.down_proj.weight": (576, 1536)}
    assert answers.lm_head_shape == (49152, 576) and answers.tied
    assert answers.tokens == ["He", " runs"]
    ids = torch.tensor([default_model.tokenizer.encode("He runs")])
    with torch.no_grad():
        last = hf_gguf_model(ids, output_hidden_states=True).hidden_states[-1]
    assert answers.last_hidden_state_shape == tuple(last.shape) == (1, 2, 576)
    text = str(answers)
    assert "num_parameters() = 134,515,008" in text and "MLP 79,626,240 (59.2%)" in text
    assert json.loads(json.dumps(answers.to_dict()))["mlp_share"] == pytest.approx(0.5919506)


def test_next_token_before_and_after_filters(tiny):
    model, _ = tiny
    text = "The quick brown fox"
    ids = model.tokenizer.encode(text)
    logits = model(np.array(ids))[-1]
    view = views.next_token(model, text, k=8)
    probs = softmax(logits)
    np.testing.assert_allclose(view.before, np.sort(probs)[::-1][:8], rtol=1e-6)
    np.testing.assert_array_equal(view.before, probs[view.ids])
    np.testing.assert_array_equal(view.after, view.before)  # no filter
    assert view.kept == model.config.vocab_size
    view = views.next_token(model, text, k=8, temperature=0.5, top_k=5, top_p=0.9)
    expected = softmax(filter_logits(logits, temperature=0.5, top_k=5, top_p=0.9))
    np.testing.assert_allclose(view.after, expected[view.ids], rtol=1e-6)
    assert view.kept == np.isfinite(filter_logits(logits, 0.5, 5, 0.9)).sum() <= 5
    assert (view.after[view.kept:] == 0).all() and view.after[0] > view.before[0]
    assert "temperature=0.5, top_k=5, top_p=0.9" in str(view)
    with pytest.raises(ValueError, match="k .* positive"):
        views.next_token(model, text, k=0)


def test_next_token_in_the_chat_template(tiny):
    model, _ = tiny
    view = views.next_token(model, "Hello", k=3, chat=True)
    assert view.text.startswith("<|im_start|>system") and view.text.endswith("assistant\n")


def test_logit_lens_last_layer_is_the_model_and_each_layer_its_norm(tiny):
    model, ref = tiny
    text = "The quick brown fox jumps"
    ids = model.tokenizer.encode(text)
    lens = views.logit_lens(model, text, k=3)
    L, T = model.config.num_hidden_layers, len(ids)
    assert lens.ids.shape == lens.probs.shape == (L, T, 3)
    np.testing.assert_array_equal(lens.ids[-1, :, 0], model(np.array(ids)).argmax(-1))
    with torch.no_grad():  # transformers' own norm and head on its hidden state of layer 0
        hidden = ref(torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
        expected = torch.softmax(ref.lm_head(ref.model.norm(hidden)), -1)[0].numpy()
    np.testing.assert_allclose(lens.probs[0], np.sort(expected, -1)[:, ::-1][:, :3], atol=1e-5)
    assert (np.diff(lens.probs, axis=-1) <= 0).all()
    assert lens.tokens == [model.tokenizer.decode([i]) for i in ids]
    assert str(lens).count("\n") == L + 1


def test_pca_is_the_svd_of_the_centred_vectors():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 10)) @ np.diag(np.linspace(3, 0.1, 10))
    p = views.pca(X, labels="abcdef")
    centred = X - X.mean(0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
    np.testing.assert_allclose(p.explained, eigenvalues[::-1][:2] / eigenvalues.sum(), rtol=1e-6)
    np.testing.assert_allclose(np.abs(p.components), np.abs(eigenvectors[:, ::-1][:, :2].T),
                               atol=1e-5)
    np.testing.assert_allclose(p.coords, centred @ p.components.T, atol=1e-4)
    np.testing.assert_allclose(p.project(X), p.coords, atol=1e-4)
    # the sign convention makes the picture reproducible: each axis' largest coordinate > 0
    assert all(p.coords[np.abs(p.coords[:, j]).argmax(), j] > 0 for j in range(2))
    np.testing.assert_allclose(views.pca(-X).coords, p.coords, atol=1e-4)
    with pytest.raises(ValueError, match="at least two"):
        views.pca(X[:1])
    assert views.pca(X[:2]).coords.shape == (2, 2)  # one direction only: padded


def test_embeddings_ignore_word_order_until_the_model_or_a_product_adds_it(tiny):
    model, _ = tiny
    sentences = ["the cat sat on the mat", "the mat sat on the cat", "a dog"]
    plain = views.text_vectors(model, sentences)
    np.testing.assert_allclose(plain[0], plain[1], atol=1e-6)  # a mean of embeddings
    added = views.text_vectors(model, sentences, positional="add")
    np.testing.assert_allclose(added[0], added[1], atol=1e-5)  # adding PE: still the same mean
    multiplied = views.text_vectors(model, sentences, positional="multiply")
    assert np.abs(multiplied[0] - multiplied[1]).max() > 1e-3
    last = views.text_vectors(model, sentences, hidden_state=-1)
    assert np.abs(last[0] - last[1]).max() > 1e-3  # attention with RoPE sees the order
    result = views.embedding_pca(model, sentences)
    assert result.coords.shape == (3, 2) and result.labels == sentences
    assert "mean token embeddings" in str(result)
    with pytest.raises(ValueError, match="hidden_state=0"):
        views.text_vectors(model, sentences, hidden_state=1, positional="add")
    with pytest.raises(ValueError, match="hidden_state must be in"):
        views.text_vectors(model, sentences, hidden_state=9)


def test_positional_encodings(tiny):
    model, _ = tiny
    c = model.config
    view = views.positional_encodings(model, n_positions=32, C=100.0)
    assert view.sinusoidal.shape == (32, c.hidden_size)
    assert view.rope_angles.shape == (32, c.head_dim // 2)
    assert view.sinusoidal_similarity[0] == pytest.approx(1) == view.rope_similarity[0]
    # RoPE scores depend on the offset only: R_m x . R_n x == R_(m-n) x . R_0 x
    x = np.ones((32, c.head_dim), np.float32)
    cos, sin = rope_cos_sin(np.arange(32), rope_inverse_frequencies(c.head_dim, c.rope_theta))
    rotated = apply_rope(x, cos, sin)
    scores = rotated @ rotated.T / (rotated[0] @ rotated[0])
    for offset in (1, 5, 17):
        np.testing.assert_allclose(np.diagonal(scores, -offset), view.rope_similarity[offset],
                                   atol=1e-4)
    assert "C=100" in str(view)


def test_inspect_command_prints_tree_table_and_json(tiny, capsys):
    model, ref = tiny
    folder = str(model.folder)
    assert main(["inspect", "-m", folder, "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "model.layers.*.mlp.up_proj.weight" in out
    assert f"{ref.num_parameters():,}" in out
    assert main(["inspect", "-m", folder, "--json", "--lecture-000", "quick fox"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == data["parameters"] == ref.num_parameters()
    assert data["lecture_000"]["last_hidden_state_shape"][2] == model.config.hidden_size
    assert sum(data["groups"].values()) == data["total"]
    assert main(["inspect", "-m", folder, "--lecture-000"]) == 0
    assert "'He runs' -> tokens" in capsys.readouterr().out


def test_batched_text_vectors_equal_each_text_alone(tiny):
    model, _ = tiny
    texts = ["the cat sat on the mat", "a dog", "the quick brown fox jumps over"]
    batched = views.text_vectors(model, texts, hidden_state=-1)
    for text, row in zip(texts, batched):
        np.testing.assert_allclose(row, views.text_vectors(model, [text], hidden_state=-1)[0],
                                   atol=1e-5)
    middle = views.text_vectors(model, texts, hidden_state=1)
    ids = model.tokenizer.encode(texts[1])
    from npllm.trace import Trace
    trace = Trace("layers.0.output")
    model(np.array(ids), trace=trace)
    np.testing.assert_allclose(middle[1], trace["layers.0.output"][0].mean(0), atol=1e-5)


def test_tokens_that_hold_part_of_a_character_show_their_bytes(tiny):
    import codecs
    model, _ = tiny
    text = "emoji 🙂 and 東京"
    ids = model.tokenizer.encode(text)
    shown = views.token_strings(model, ids)
    assert any(model.tokenizer.decode([i]) == "\ufffd" for i in ids)  # the case in question
    assert "\ufffd" not in "".join(shown) and any("\\x" in t for t in shown)
    # the escaped bytes, put back together, are the text's UTF-8 bytes
    assert b"".join(codecs.escape_decode(t.encode("utf-8"))[0] for t in shown) == text.encode()
