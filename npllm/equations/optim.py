r"""The update rules of training (lecture 004: "make update related to 2048 of them"): SGD, AdamW,
gradient clipping by global norm, and the learning-rate schedule (warm-up, then cosine decay).

Each function is one step for one weight array W with gradient G = dL/dW. They return new arrays
and change nothing in place; ``npllm.train`` applies them to every weight of a model. The
numbers follow torch's own implementations operation by operation (``torch.optim.SGD``,
``torch.optim.AdamW``, ``torch.nn.utils.clip_grad_norm_``) and transformers'
``get_cosine_with_min_lr_schedule_with_warmup``; ``tests/test_equations_optim.py`` compares
them step for step.
"""
import math

import numpy as np

from ._checks import as_array, require


def sgd_step(param, grad, lr):
    r"""One step of plain stochastic gradient descent (lecture 004; ``torch.optim.SGD``).

    .. math::
        W \leftarrow W - \eta\, G

    param, grad [...] -> the new param [...]. The gradient is the direction in which the loss
    rises fastest; a small step against it lowers the loss.
    """
    param = as_array(param, "param", "[...]")
    grad = as_array(grad, "grad", "[...]")
    require(param.shape == grad.shape, f"grad must have param's shape {param.shape}, got {grad.shape}")
    return param - np.float32(lr) * grad


def adamw_step(param, grad, m, v, step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    r"""One step of AdamW (Loshchilov and Hutter 2019; ``torch.optim.AdamW``).

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, G,\qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, G^2

        W \leftarrow W(1 - \eta\lambda) - \frac{\eta}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t}/\sqrt{1 - \beta_2^t} + \epsilon}

    param, grad, m, v [...], step t >= 1 (this step's number) -> (param, m, v), the new values.
    m and v (zeros before the first step) are running means of the gradient and of its square:
    each weight moves by about eta in the direction of its recent gradients, whatever their
    scale. The weight decay lambda shrinks the weights directly ("decoupled"), not through G.
    The operations are torch's, in its order, so float32 results agree to rounding.
    """
    param = as_array(param, "param", "[...]")
    grad = as_array(grad, "grad", "[...]")
    require(param.shape == grad.shape == np.shape(m) == np.shape(v),
            f"param, grad, m and v must have the same shape, got {param.shape}, {grad.shape}, "
            f"{np.shape(m)}, {np.shape(v)}")
    require(int(step) >= 1, f"step counts from 1 (the first update), got {step!r}")
    beta1, beta2 = betas
    m = m + (grad - m) * np.float32(1 - beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
    v = v * np.float32(beta2) + np.float32(1 - beta2) * grad * grad
    step_size = lr / (1 - beta1 ** step)
    denom = np.sqrt(v) / np.float32(math.sqrt(1 - beta2 ** step)) + np.float32(eps)
    param = param * np.float32(1 - lr * weight_decay) - np.float32(step_size) * m / denom
    return param, m, v


def global_norm(grads):
    r"""The Euclidean norm of all the gradients together, as one long vector.

    .. math::
        \lVert G \rVert = \sqrt{\textstyle\sum_{W} \sum_i G_{W,i}^2}

    grads: an iterable of arrays -> a float.
    """
    return float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads)))


def clip_by_global_norm(grads, max_norm):
    r"""Scale every gradient by one factor so their global norm is at most max_norm
    (``torch.nn.utils.clip_grad_norm_``).

    .. math::
        G \leftarrow G \cdot \min\!\left(1, \frac{c}{\lVert G \rVert + 10^{-6}}\right)

    grads: a list of arrays, max_norm c -> (the scaled list, the norm before clipping). The
    direction of the update is kept; only a rare huge gradient (a loss spike) is shortened.
    """
    require(max_norm > 0, f"max_norm must be positive, got {max_norm!r}")
    grads = [as_array(g, "grad", "[...]") for g in grads]
    norm = global_norm(grads)
    factor = min(1.0, max_norm / (norm + 1e-6))
    return [g if factor == 1.0 else g * np.float32(factor) for g in grads], norm


def warmup_cosine_lr(step, lr, warmup_steps, total_steps, min_lr_ratio=0.0):
    r"""The learning rate of step ``step`` (counting from 0): linear warm-up, then half a cosine
    down to ``min_lr_ratio * lr`` (transformers' ``get_cosine_with_min_lr_schedule_with_warmup``).

    .. math::
        \eta_s = \begin{cases}
            \eta\, s / s_w & s < s_w \\
            \eta\left(\rho + (1 - \rho)\,\tfrac12\bigl(1 + \cos(\pi\, p)\bigr)\right),\quad
            p = \frac{s - s_w}{s_{total} - s_w} & s \ge s_w
        \end{cases}

    -> a float. Warm-up keeps the first steps small while AdamW's moment estimates are still
    noisy; the cosine lets the last steps settle.
    """
    require(warmup_steps >= 0 and total_steps >= 1,
            f"warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    if step < warmup_steps:
        return lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * max(0.0, factor * (1 - min_lr_ratio) + min_lr_ratio)
