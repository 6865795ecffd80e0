"""Training in NumPy (lectures 000 and 004): the model's gradients (:mod:`.backprop`), the
optimizers (:mod:`.optim`) and the loop, ``train`` (:mod:`.loop`). ``backprop_engine`` and
``trainable_weights`` are the training engine's (:mod:`npllm.engine.training`): the same
gradients, fast, chosen once."""
from npllm.training.backprop import loss_and_grads
from npllm.training.loop import TrainResult, loss_curve, scratch_config, shipped_text, train
from npllm.training.optim import SGD, AdamW

__all__ = ["loss_and_grads", "backprop_engine", "trainable_weights", "train", "TrainResult",
           "loss_curve", "scratch_config", "shipped_text", "SGD", "AdamW"]


def __getattr__(name):
    # The training engine's seam, imported at first use: ``import npllm`` stays free of Numba.
    if name in ("backprop_engine", "trainable_weights"):
        from npllm.engine import training
        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
