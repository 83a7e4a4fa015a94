"""Same seed and config, same numbers: quick runs must reproduce the metrics recorded before the
code moved into layer packages (tests/golden/metrics.json, written by the code at ce9ba6e)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from metaad.apps.train import train
from tests.conftest import compose_in

GOLDEN = json.loads((Path(__file__).parent / "golden" / "metrics.json").read_text())
# "default" is the default run of that time: ProtoNet on the MLP on 8x8 digits (now experiment=digits,
# which conftest's quick settings name too; the default run is MNIST's since)
OLD_DEFAULT = ["dataset=digits", "model=protonet", "backbone=mlp", "threshold=f1_optimal"]
OLD_DEFAULT += ["baselines=default"]
RUNS = {
    "default": OLD_DEFAULT,
    "maml": [*OLD_DEFAULT, "model=maml"],
    "covariance": [*OLD_DEFAULT, "model=covariance"],
}


def differences(expected, got, key: str = "") -> list[str]:
    if isinstance(expected, dict):
        missing = [f"{key}.{k}: missing" for k in expected if k not in got]
        return missing + [
            d for k in expected if k in got for d in differences(expected[k], got[k], f"{key}.{k}")
        ]
    if isinstance(expected, float) and math.isclose(expected, got, rel_tol=1e-6, abs_tol=1e-9):
        return []
    return [] if expected == got else [f"{key}: {expected!r} before, {got!r} now"]


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n != "default" else n for n in RUNS]
)
def test_a_quick_run_reproduces_its_golden_metrics(tmp_path, name):
    results = train(compose_in(tmp_path / "run", ["logger=none", *RUNS[name]]))
    golden = dict(GOLDEN[name])
    # recorded when the learner was the key "model"; it is now named by its name (protonet, ...)
    golden["val"] = {(results.learner if k == "model" else k): v for k, v in golden["val"].items()}
    assert not differences(golden, results.to_json())
