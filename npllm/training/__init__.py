"""Training in NumPy (lectures 000 and 004): the model's gradients, the optimizers, the loop."""
from npllm.training.backprop import loss_and_grads

__all__ = ["loss_and_grads"]
