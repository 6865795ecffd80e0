"""A loaded model: config, weights, tokenizer, and the engine that runs the forward pass."""
from npllm.model.cache import KVCache
from npllm.model.inputs import check_inputs
from npllm.trace import no_trace


class Model:
    """Weights, config and tokenizer together, as ``npllm.load`` returns them.

    ``model(ids)`` runs the forward pass (:func:`npllm.model.llama.forward`) on the model's
    ``engine``, chosen once at load (:mod:`npllm.engine`): ``"numba"`` by default, or
    ``"reference"``, which runs that function as written. Both give the same numbers.
    ``print(model)`` shows the module tree with shapes and parameter counts, the way lecture
    000 prints a model first.
    """

    def __init__(self, config, weights, tokenizer=None, source="", folder=None, engine=None):
        from npllm.engine import make_engine

        self.config, self.weights, self.tokenizer = config, weights, tokenizer
        self.source, self.folder = source, folder
        self.engine = engine if engine is not None and not isinstance(engine, str) else \
            make_engine(engine, config, weights)

    def __call__(self, input_ids, cache=None, attention_mask=None, trace=None,
                 logits_to_keep=None, targets=None):
        r"""Logits [T, V] or [B, T, V] for token ids [T] or [B, T].

        ``logits[t]`` scores the token that follows ``input_ids[: t + 1]``. With a ``cache``
        (:meth:`new_cache`), ``input_ids`` are the *new* tokens; the cache's length advances.
        ``attention_mask`` [B, cached + new] marks padding with 0. ``trace``
        (:class:`npllm.trace.Trace`) keeps intermediates by their lecture names.

        Two ways to ask for less than every logit (the LM head is a [D, V] product per
        position, a fifth of the model's work):

        - ``logits_to_keep=n``: the logits of the last n positions only (transformers' argument
          of the same name; generation needs only the last position's).
        - ``targets`` (ints shaped like the kept positions): instead of the logits,
          :math:`\log P(\text{targets}[t] \mid \text{input\_ids}[:t+1])`, [T] or [B, T], as
          ``token_log_probs(logits, targets)`` computes them (lecture 000's chain rule). With an
          ``attention_mask``, padded positions get 0.
        """
        inputs = check_inputs(self.config, input_ids, cache, attention_mask, logits_to_keep,
                              targets)
        listener = no_trace if trace is None else trace.listener(self.weights)
        out = self.engine(inputs, cache, attention_mask, listener)
        return out[0] if inputs.single else out

    forward = __call__

    def new_cache(self, batch_size=1, capacity=256):
        """An empty :class:`~npllm.model.cache.KVCache` for ``batch_size`` sequences."""
        return KVCache.empty(self.config, batch_size, capacity)

    def num_parameters(self):
        """Parameters counted once each (tied embeddings share one matrix, as in transformers)."""
        unique = {id(w): w.size for w in self.weights.values()}
        return sum(unique.values())

    def __repr__(self):
        if self.config.model_type in ("llama", "mistral"):
            tree = module_tree(self.config, self.weights)
        else:
            from npllm.inspect import model_tree
            tree = model_tree(self.config)
        return "\n".join([tree, f"engine: {self.engine}"])


def module_tree(config, weights):
    """The model as transformers prints it, with shapes, parameter counts and shares."""
    c, total = config, sum({id(w): w.size for w in weights.values()}.values())
    tied = weights["lm_head.weight"] is weights["model.embed_tokens.weight"]

    def n(names):
        return sum(weights[name].size for name in names)

    layer = [k for k in weights if k.startswith("model.layers.0.")]
    attn = n(k for k in layer if ".self_attn." in k) * c.num_hidden_layers
    mlp = n(k for k in layer if ".mlp." in k) * c.num_hidden_layers
    norms = n(k for k in layer if "layernorm" in k) * c.num_hidden_layers + c.hidden_size
    embed = weights["model.embed_tokens.weight"].size
    head = 0 if tied else weights["lm_head.weight"].size

    def share(count):
        return f"{count:>13,}  {100 * count / total:5.1f}%"

    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    Hd, Kd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    lines = [
        f"LlamaForCausalLM  ({total:,} parameters, float32, "
        f"{c.num_attention_heads} query / {c.num_key_value_heads} key-value heads of width {c.head_dim})",
        "  (model): LlamaModel",
        f"    (embed_tokens): Embedding({V}, {D})".ljust(64) + share(embed),
        f"    (layers): {c.num_hidden_layers} x LlamaDecoderLayer",
        "      (self_attn): LlamaAttention".ljust(64) + share(attn),
        f"        (q_proj): Linear({D} -> {Hd})",
        f"        (k_proj): Linear({D} -> {Kd})",
        f"        (v_proj): Linear({D} -> {Kd})",
        f"        (o_proj): Linear({Hd} -> {D})",
        f"        RoPE(head_dim={c.head_dim}, theta={c.rope_theta:g})",
        "      (mlp): LlamaMLP".ljust(64) + share(mlp),
        f"        (gate_proj): Linear({D} -> {F})",
        f"        (up_proj): Linear({D} -> {F})",
        f"        (down_proj): Linear({F} -> {D})",
        "        (act_fn): SiLU",
        f"      (input_layernorm): RMSNorm({D}, eps={c.rms_norm_eps:g})",
        f"      (post_attention_layernorm): RMSNorm({D}, eps={c.rms_norm_eps:g})",
        f"    (norm): RMSNorm({D}, eps={c.rms_norm_eps:g})".ljust(64) + share(norms) + "  (all norms)",
        f"  (lm_head): Linear({D} -> {V})".ljust(64)
        + (" tied to embed_tokens (shares its matrix)" if tied else share(head)),
    ]
    return "\n".join(lines)
