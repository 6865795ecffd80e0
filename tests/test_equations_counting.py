"""npllm.equations.counting against transformers' LlamaForCausalLM(config).num_parameters()."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from npllm.equations import (attention_parameters, chinchilla_optimal_tokens, embedding_parameters,
                             forward_flops_per_token, llama_parameter_counts, mlp_parameters,
                             norm_parameters, training_flops)

SMOLLM2_135M = dict(V=49152, D=576, F=1536, L=30, H=9, K=3, Dh=64, tied=True)


def hf_model(V, D, F, L, H, K, Dh, tied):
    config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                         num_attention_heads=H, num_key_value_heads=K, head_dim=Dh,
                         tie_word_embeddings=tied)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return LlamaForCausalLM(config)


def by_module(model):
    """Sum of tensor sizes, grouped like llama_parameter_counts (shared tensors counted once)."""
    groups = dict(embeddings=0, attention=0, mlp=0, norms=0, lm_head=0)
    for name, p in model.named_parameters():  # named_parameters() skips a tied lm_head
        key = ("embeddings" if "embed_tokens" in name else "attention" if "self_attn" in name
               else "mlp" if ".mlp." in name else "norms" if "norm" in name else "lm_head")
        groups[key] += p.numel()
    return groups


@settings(max_examples=15)  # each example builds a model; 15 cover tied/untied and GQA ratios
@given(V=st.integers(1, 300), K=st.integers(1, 3), ratio=st.sampled_from([1, 3, 9]),
       Dh=st.sampled_from([2, 4, 8]), F=st.integers(1, 64), L=st.integers(1, 3), tied=st.booleans())
def test_counts_match_transformers_tiny_models(V, K, ratio, Dh, F, L, tied):
    H = K * ratio
    D = H * Dh
    model = hf_model(V, D, F, L, H, K, Dh, tied)
    counts = llama_parameter_counts(V, D, F, L, H, K, Dh, tied)
    assert counts["total"] == model.num_parameters()
    assert {k: v for k, v in counts.items() if k != "total"} == by_module(model)


def test_smollm2_135m_counts():
    counts = llama_parameter_counts(**SMOLLM2_135M)
    assert counts == {"embeddings": 28_311_552, "attention": 26_542_080, "mlp": 79_626_240,
                      "norms": 35_136, "lm_head": 0, "total": 134_515_008}
    model = hf_model(**SMOLLM2_135M)
    assert model.num_parameters() == 134_515_008
    assert {k: v for k, v in counts.items() if k != "total"} == by_module(model)
    # Untied, the LM head would add another V x D matrix.
    untied = llama_parameter_counts(**{**SMOLLM2_135M, "tied": False})
    assert untied["total"] - counts["total"] == untied["lm_head"] == 49152 * 576


def test_per_module_formulas():
    # One SmolLM2 layer: q, o are 576 x 576; k, v are 576 x 192 (3 KV heads of 64).
    assert attention_parameters(576, 9, 3, 64) == 2 * 576 * 576 + 2 * 576 * 192
    assert mlp_parameters(576, 1536) == 3 * 576 * 1536
    assert norm_parameters(576) == 576
    assert embedding_parameters(49152, 576) == 49152 * 576


def test_scaling_law_arithmetic():
    n = 134_515_008
    assert chinchilla_optimal_tokens(n) == 20 * n
    assert forward_flops_per_token(n) == 2 * n
    assert training_flops(n, 2e12) == 6 * n * 2e12


def test_counting_errors_name_the_argument():
    with pytest.raises(ValueError, match="H must be a multiple of the key/value heads K, got H=9, K=2"):
        attention_parameters(576, 9, 2, 64)
    with pytest.raises(ValueError, match="V must be a positive integer"):
        embedding_parameters(0, 576)
    with pytest.raises(ValueError, match="n_tokens must be positive"):
        training_flops(10, 0)
    with pytest.raises(ValueError, match="L must be a positive integer"):
        llama_parameter_counts(**{**SMOLLM2_135M, "L": 2.5})
