"""Training in NumPy (lectures 000 and 004): the model's gradients (:mod:`.backprop`), the
optimizers (:mod:`.optim`) and the loop, ``train`` (:mod:`.loop`)."""
from npllm.training.backprop import loss_and_grads
from npllm.engine.training import backprop_engine, trainable_weights
from npllm.training.loop import TrainResult, loss_curve, scratch_config, shipped_text, train
from npllm.training.optim import SGD, AdamW

__all__ = ["loss_and_grads", "backprop_engine", "trainable_weights", "train", "TrainResult", "loss_curve", "scratch_config",
           "shipped_text", "SGD", "AdamW"]
