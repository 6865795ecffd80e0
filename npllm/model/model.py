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
        from npllm.inspect import model_tree, module_tree
        tree = module_tree(self.config, self.weights) if self.config.model_type in (
            "llama", "mistral") else model_tree(self.config)
        return "\n".join([tree, f"engine: {self.engine}"])
