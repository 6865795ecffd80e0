"""Running the model over prepared rows: padded batches (:func:`batch_plan`), several at a time
when the model's engine runs them so (:func:`run_rows`)."""
import numpy as np

DEFAULT_BATCH_SIZE = 16
MAX_BATCH_TOKENS = 2048  # rows x padded length per forward pass (bounds the [B, T, V] logits)
# Padding a row to the batch's longest costs (longest - its length) positions of work; a forward
# pass of its own costs about this many positions' worth (reading every weight, one BLAS call per
# matrix on few rows, Python): on SmolLM2 that is the cost of a pass of about 48 tokens
# (docs/performance.md).
PASS_COST_TOKENS = 48


def batch_plan(lengths, batch_size):
    """Rows of these lengths into padded batches, ``[[row, ...], ...]``.

    Rows go longest first (ties in their order); a row joins the batch unless that would pad it
    by more than ``PASS_COST_TOKENS`` positions (a forward pass of its own is cheaper then), the
    batch has ``batch_size`` rows, or it would exceed ``MAX_BATCH_TOKENS``.
    """
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    batches, i = [], 0
    while i < len(order):
        longest, size = lengths[order[i]], 1
        while (size < batch_size and i + size < len(order)
               and (size + 1) * longest <= MAX_BATCH_TOKENS
               and longest - lengths[order[i + size]] <= PASS_COST_TOKENS):
            size += 1
        batches.append(order[i:i + size])
        i += size
    return batches


def run_rows(model, rows, batch_size, with_rank, with_entropy, with_greedy, on_rows=None):
    """Forward passes over ``rows`` in the padded batches of :func:`batch_plan`; results per
    row, in order. When only log-probabilities are asked for, the forward pass returns them
    directly (``targets=``) and the [B, T, V] logits are never formed.

    The engine may run several batches at once (``model.engine.map``: the Numba engine runs one
    per core). With logits, only as many as fit in ``MAX_BATCH_TOKENS`` positions together, the
    most that one batch may hold: the peak memory stays within that bound. ``on_rows`` (if
    given) is called with each batch's rows when it is done (from any thread).
    """
    from npllm.equations import greedy, log_softmax, token_log_probs

    need_logits = with_rank or with_entropy or with_greedy

    def run(which):  # one padded batch -> a result per row, reported to on_rows
        out = run_batch(which)
        if on_rows is not None:
            on_rows([rows[r] for r in which])
        return out

    def run_batch(which):
        batch = [rows[r] for r in which]
        longest = len(batch[0].ids)
        ids = np.zeros((len(batch), longest), dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        targets = np.zeros((len(batch), longest), dtype=np.int64)
        for k, row in enumerate(batch):  # right padding: real tokens keep positions 0, 1, ...
            ids[k, :len(row.ids)] = row.ids
            mask[k, :len(row.ids)] = 1
            targets[k, row.logit_rows] = row.targets
        mask = mask if len(batch) > 1 else None
        if not need_logits:  # log P(target) at every position [B, T]; the padding's are never read
            log_probs = model(ids, attention_mask=mask, targets=targets)
            return [{"log_probs": log_probs[k, row.logit_rows].astype(np.float64)}
                    for k, row in enumerate(batch)]
        logits = model(ids, attention_mask=mask)  # [B, T, V]
        out = []
        for k, row in enumerate(batch):
            x = logits[k, row.logit_rows]  # [n, V]: the predictions we keep
            res = {"log_probs": token_log_probs(x, row.targets).astype(np.float64)}
            target_logit = np.take_along_axis(x, row.targets[:, None], axis=-1)
            if with_rank:  # 1 + how many tokens the model found strictly more likely
                res["ranks"] = (x > target_logit).sum(-1) + 1
            if with_entropy:
                lp = log_softmax(x).astype(np.float64)
                res["entropies"] = -(np.exp(lp) * lp).sum(-1)
            if with_greedy:
                res["is_greedy"] = greedy(x) == row.targets
            out.append(res)
        return out

    plan = batch_plan([len(row.ids) for row in rows], batch_size)
    largest = max((len(b) * len(rows[b[0]].ids) for b in plan), default=1)
    done = model.engine.map(run, plan, MAX_BATCH_TOKENS // largest if need_logits else None)
    out = [None] * len(rows)
    for which, results in zip(plan, done):
        for r, res in zip(which, results):
            out[r] = res
    return out
