"""scripts/bench.py's training-step section runs and both sides compute the same loss (issue 16).

Not a timing test: the speed is read from the bench's table, never asserted. 16 tokens, one
round: this checks that the section has not rotted and that npllm and torch train the same
model on the same tokens.
"""
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def test_train_step_bench_runs_and_both_sides_agree():
    sys.path.insert(0, str(SCRIPTS))
    import bench

    rows, checks = bench.train_step_rows(threads=1, tokens=16, rounds=1, repeats=1,
                                         log=lambda message: None)
    speed, memory = rows
    assert speed["npllm"] > 0 and speed["transformers"] > 0 and speed["ratio"] > 0
    # Training holds the weights, their gradients and AdamW's two moments: at least 4x the
    # float32 weights, in both processes.
    assert memory["fraction_of_4x_weights"] > 0.9
    # The same weights and tokens: the first loss agrees to float32 rounding over 16 tokens.
    assert checks["train_step_same_loss"], checks["train_step_first_loss"]
