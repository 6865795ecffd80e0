"""Tiny seeded StableLM, Phi-3, Qwen2 and GPT-2 checkpoints, written by transformers, for tests.

``make_tiny_family(path, model_type, **settings)`` builds the transformers model of that family
from a small config (every parameter drawn from ``seed``: norm weights around 1, biases around
0.1, matrices of std 1/sqrt(fan_in), so a forgotten bias or norm weight changes the logits by
O(0.1)) and saves it with ``save_pretrained``.
"""
from pathlib import Path

FAMILY_CLASSES = {"stablelm": ("StableLmConfig", "StableLmForCausalLM"),
                  "phi3": ("Phi3Config", "Phi3ForCausalLM"),
                  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                  "gpt2": ("GPT2Config", "GPT2LMHeadModel")}


def family_settings(model_type, D=32, H=4, K=2, L=2, F=48, V=96, rotary=1.0, bias=False,
                    parallel=False, tied=False, positions=64):
    """transformers config kwargs for a tiny model of ``model_type``."""
    if model_type == "gpt2":
        return dict(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_inner=F,
                    n_positions=positions, tie_word_embeddings=True, bos_token_id=0,
                    eos_token_id=0)
    s = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
             num_attention_heads=H, num_key_value_heads=K, max_position_embeddings=positions,
             tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if model_type == "stablelm":
        s.update(partial_rotary_factor=rotary, use_qkv_bias=bias, use_parallel_residual=parallel)
    elif model_type == "phi3":
        s.update(partial_rotary_factor=rotary, sliding_window=positions - 1)
    return s


def build_model(model_type, settings, seed=0):
    """The transformers model (float32, eval, eager attention), parameters drawn from seed."""
    import torch
    import transformers

    config_name, model_name = FAMILY_CLASSES[model_type]
    config = getattr(transformers, config_name)(**settings)
    config._attn_implementation = "eager"
    generator = torch.Generator().manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif "embed" in name or "wte" in name or "wpe" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            else:  # Conv1D is [in, out]: the fan-in is the smaller-index axis for it
                fan_in = p.shape[0] if model_type == "gpt2" and ".h." in name else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=generator) / fan_in ** 0.5)
    return model.float().eval()


def make_tiny_family(path, model_type, seed=0, **kwargs):
    """Save a tiny model of ``model_type`` at ``path``; return (path, transformers model)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = Path(path)
    model = build_model(model_type, family_settings(model_type, **kwargs), seed)
    model.save_pretrained(path)
    return path, model


def write_gguf(path, model, model_type):
    """Write ``model`` (a tiny transformers model) as a float32 GGUF file the way llama.cpp's
    convert_hf_to_gguf.py does for its architecture: gguf-py's tensor names, the metadata keys
    its ``set_gguf_parameters`` writes, GPT-2's Conv1D matrices turned to [out, in] and its
    token embedding copied to ``output.weight``, a tied LM head left out for the others."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), model_type)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[model_type.upper()], c.num_hidden_layers)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    if model_type == "gpt2":
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
        head_dim = c.hidden_size // c.num_attention_heads
        rotary = c.rope_parameters.get("partial_rotary_factor", 1.0)
        if model_type == "stablelm":
            writer.add_rope_dimension_count(int(rotary * head_dim))
            writer.add_parallel_residual(c.use_parallel_residual)
            writer.add_layer_norm_eps(c.layer_norm_eps)
        else:
            writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        if model_type == "phi3":
            writer.add_rope_dimension_count(int(rotary * head_dim))
            writer.add_sliding_window(c.sliding_window)
    tied = model_type != "gpt2" and c.tie_word_embeddings
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and (tied or model_type == "gpt2"):
            continue
        w = p.detach().float().numpy()
        if model_type == "gpt2" and name.endswith((".attn.c_attn.weight", ".attn.c_proj.weight",
                                                   ".mlp.c_fc.weight", ".mlp.c_proj.weight")):
            w = w.T
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))  # with the suffix
        assert new is not None, name
        writer.add_tensor(new, w.copy())
        if model_type == "gpt2" and new == "token_embd.weight":
            writer.add_tensor("output.weight", w.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
