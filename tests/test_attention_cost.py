"""scripts/attention_cost.py (issue 17: the n^2 cost of attention, lecture 004).

Not a timing test: times are never asserted (they depend on the machine). What is checked: the
script runs end to end; its slope and crossover arithmetic on known power laws; and the memory
it measures, which is deterministic: attention's peak grows as T^2 (the [H, T, T] scores) and
the MLP's as T, on the default model's shapes.
"""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "attention_cost.py"
spec = importlib.util.spec_from_file_location("attention_cost", SCRIPT)
cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cost)


def test_slopes_and_crossover_of_known_power_laws():
    T = [64, 128, 256, 512, 1024]
    quadratic = [3e-9 * t ** 2 for t in T]
    linear = [1e-6 * t for t in T]
    assert cost.fit_slope(T, quadratic)[0] == pytest.approx(2.0)
    assert cost.fit_slope(T, linear, fit_from=256)[0] == pytest.approx(1.0)
    # 3e-9 T^2 = 1e-6 T at T = 333.3
    assert cost.crossover(T, quadratic, linear) == pytest.approx(1e-6 / 3e-9)
    assert cost.crossover(T, linear[:1] * 5, [1.0] * 5) is None
    with pytest.raises(ValueError, match="at least two lengths"):
        cost.fit_slope(T, linear, fit_from=1024)


@pytest.mark.real_model
def test_memory_grows_as_t_squared_for_attention_and_t_for_the_mlp(default_model):
    weights = cost.layer_weights(default_model)
    lengths = [256, 512, 1024]
    peaks = {p: [cost.peak_bytes(cost.make_parts(default_model.config, weights, T)[p])
                 for T in lengths] for p in ("attention", "MLP")}
    c = default_model.config
    # At least the scores [H, T, T] in float32 must be held at once.
    assert peaks["attention"][-1] >= c.num_attention_heads * 1024 ** 2 * 4
    # Fixed costs (Q, K, V-sized temporaries, O(T)) bend the small-T end a little below 2.
    assert 1.85 <= cost.fit_slope(lengths, peaks["attention"])[0] <= 2.05
    assert 0.95 <= cost.fit_slope(lengths, peaks["MLP"])[0] <= 1.05


@pytest.mark.real_model
def test_the_script_runs_end_to_end(tmp_path, capsys):
    out, js = tmp_path / "cost.png", tmp_path / "cost.json"
    assert cost.main(["--T", "32", "64", "128", "--repeats", "1", "--fit-from", "64",
                      "-o", str(out), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(js.read_text())
    assert report["T"] == [32, 64, 128] and set(report["slopes"]) == {"seconds", "bytes"}
    assert all(len(v) == 3 and min(v) > 0 for v in report["seconds"].values())
    assert f"memory attention {report['slopes']['bytes']['attention']:.2f}" in printed
    from PIL import Image
    with Image.open(out) as image:
        image.verify()
    with pytest.raises(SystemExit):
        cost.main(["--T", "64", "--fit-from", "512"])
