"""The lecture equations, one pure NumPy function each (no I/O, no state, float32).

Modules follow the lectures' topics: ``probability`` (chain rule, cross-entropy, perplexity),
``softmax`` (softmax, log-softmax, LM head), ``attention`` (causal mask, scaled dot-product,
grouped-query attention, KV-cache decoding), ``position`` (RoPE in both layouts, sinusoidal
encoding), ``mlp`` (SiLU, GELU, SwiGLU), ``norm`` (RMSNorm, LayerNorm), ``decoding`` (greedy,
temperature, top-k, top-p, sampling), ``counting`` (parameters, FLOPs, Chinchilla), ``bpe``
(learning and applying byte-pair merges), ``recurrent`` (RNN, LSTM, GRU cells, BPTT), ``grad``
(the backward of every forward equation) and ``optim`` (SGD, AdamW, clipping, the schedule).
Shape letters (T, S, D, H, K, Dh, F, V, L) are those of the package docstring.
Every function is tested against torch / transformers in ``tests/test_equations_*.py``.
"""
from .attention import (attention_pattern, causal_mask, decode_attention, grouped_query_attention,
                        merge_heads, repeat_kv, scaled_dot_product_attention, split_heads)
from .bpe import apply_merges, bpe_encode, count_pairs, learn_merges, merge_pair, pre_tokenize
from .counting import (attention_parameters, chinchilla_optimal_tokens, decoder_parameter_counts,
                       embedding_parameters,
                       forward_flops_per_token, llama_parameter_counts, mlp_parameters,
                       norm_parameters, training_flops)
from .decoding import (apply_temperature, filter_logits, greedy, sample, top_k_filter,
                       top_p_filter)
from .grad import (apply_rope_backward, attention_backward, cross_entropy_backward,
                   embedding_backward, grouped_query_attention_backward, linear_backward,
                   lm_head_backward, repeat_kv_backward, residual_backward, rms_norm_backward,
                   silu_backward, softmax_backward, swiglu_backward)
from .mlp import gelu, gelu_mlp, linear, silu, swiglu, swiglu_mlp
from .norm import layer_norm, rms_norm
from .optim import adamw_step, clip_by_global_norm, global_norm, sgd_step, warmup_cosine_lr
from .position import (apply_partial_rope, apply_rope, apply_rope_interleaved,
                       interleaved_to_half_rows, learned_positions, rope_cos_sin,
                       rope_inverse_frequencies, rotate_half, sinusoidal_encoding)
from .probability import (bits_per_byte, cross_entropy, lm_head_log_probs, perplexity,
                          sequence_log_prob, token_log_probs)
from .recurrent import (gru_bptt, gru_cell, gru_forward, lstm_bptt, lstm_cell, lstm_forward,
                        rnn_bptt, rnn_cell, rnn_forward)
from .softmax import lm_head, log_softmax, softmax

__all__ = [
    # probability (lecture 000, 001)
    "token_log_probs", "lm_head_log_probs", "sequence_log_prob", "cross_entropy", "perplexity", "bits_per_byte",
    # softmax (lectures 000, 002, 003)
    "softmax", "log_softmax", "lm_head",
    # attention (lectures 002, 003, 004)
    "causal_mask", "attention_pattern", "scaled_dot_product_attention", "repeat_kv",
    "grouped_query_attention", "decode_attention", "split_heads", "merge_heads",
    # position (lecture 003)
    "rope_inverse_frequencies", "rope_cos_sin", "rotate_half", "apply_rope",
    "apply_rope_interleaved", "interleaved_to_half_rows", "sinusoidal_encoding",
    "apply_partial_rope", "learned_positions",
    # mlp (lecture 003)
    "silu", "gelu", "swiglu", "swiglu_mlp", "linear", "gelu_mlp",
    # norm (lecture 003)
    "rms_norm", "layer_norm",
    # decoding (lectures 002, 003)
    "greedy", "apply_temperature", "top_k_filter", "top_p_filter", "filter_logits", "sample",
    # counting (lectures 000, 001)
    "embedding_parameters", "attention_parameters", "mlp_parameters", "norm_parameters",
    "llama_parameter_counts", "decoder_parameter_counts", "chinchilla_optimal_tokens", "forward_flops_per_token",
    "training_flops",
    # bpe (lecture 001)
    "pre_tokenize", "count_pairs", "merge_pair", "learn_merges", "apply_merges", "bpe_encode",
    # recurrent (lectures 001, 004)
    "rnn_cell", "lstm_cell", "gru_cell", "rnn_forward", "rnn_bptt", "lstm_forward", "lstm_bptt",
    "gru_forward", "gru_bptt",
    # gradients (lectures 000, 004: every forward equation's backward)
    "cross_entropy_backward", "lm_head_backward", "linear_backward", "embedding_backward",
    "residual_backward", "rms_norm_backward", "apply_rope_backward", "silu_backward",
    "swiglu_backward", "softmax_backward", "attention_backward", "repeat_kv_backward",
    "grouped_query_attention_backward",
    # optimisation (lecture 004)
    "sgd_step", "adamw_step", "global_norm", "clip_by_global_norm", "warmup_cosine_lr",
]
