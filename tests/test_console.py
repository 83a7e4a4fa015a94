"""A normal run's console fits a screen (issue 20, item 2): 25 rows at 80 columns, the model
summary and the settings in the log file, tables that fit the terminal, commands on one line."""

from __future__ import annotations

import io
import math
import re
import shlex
from pathlib import Path

import pytest
from rich.console import Console

from metaad.apps.summarize import show
from metaad.evaluation.report import print_summary
from metaad.evaluation.results import RunResults, Summary
from tests.conftest import run_app

WIDTH, ROWS = 80, 25
# lines that are one path or command each: never wrapped by the app, however long the path
ONE_LINE = ("run folder: ", "tensorboard --logdir ", "compare the runs: ", "sweep: ")


def rows_at(text: str, width: int) -> int:
    """Rows the text takes on a terminal ``width`` columns wide (a long line wraps)."""
    return sum(max(1, math.ceil(len(line) / width)) for line in text.splitlines())


def check_screen(text: str, run_dir: Path) -> None:
    lines = text.splitlines()
    assert rows_at(text, WIDTH) <= ROWS, f"{rows_at(text, WIDTH)} rows at {WIDTH} columns:\n{text}"
    wide = [line for line in lines if len(line) > WIDTH and not line.startswith(ONE_LINE)]
    assert not wide, wide
    for noise in ("Trainable params", "_target_", "| Name ", "v_num"):
        assert noise not in text, f"{noise!r} belongs in the log file, not the console"
    hint = next(line for line in lines if line.startswith("tensorboard --logdir "))
    assert shlex.split(hint) == ["tensorboard", "--logdir", str(run_dir / "tensorboard")]
    log = (run_dir / "train.log").read_text()
    assert " steps; {" in log and '"_target_"' in log, "the run's settings are in its log file"


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["debug=quick"]], ids=["default", "debug-quick"])
def test_the_console_of_a_default_run_fits_25_rows_at_80_columns(tmp_path, args):
    run_dir = tmp_path / "run"
    done = run_app("metaad-train", [*args, f"hydra.run.dir={run_dir}"], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check_screen(done.stdout + done.stderr, run_dir)
    if not args:  # the default trainer shows Lightning's model summary: in the log file
        assert "Trainable params" in (run_dir / "train.log").read_text()


def results(names: list[str]) -> RunResults:
    def metrics(mean: float, decisions: bool) -> dict[str, Summary]:
        out = {"auroc": Summary(mean, 0.004, 1000), "aupr": Summary(mean - 0.01, 0.005, 1000)}
        return out | (
            {"f1": Summary(0.7, 0.01, 1000), "balanced_accuracy": Summary(0.72, 0.01, 1000)}
            if decisions
            else {}
        )

    return RunResults(
        names={"model": "protonet", "dataset": "digits"},
        k_shot=5,
        seed=0,
        data="digits",
        checkpoint="",
        tasks={},
        test=metrics(0.8, True),
        baselines={name: metrics(0.9 - i / 100, False) for i, name in enumerate(names)},
    )


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_results_table_fits_the_width_and_names_what_it_leaves_out(tmp_path, width):
    names = ["mahalanobis", "mean_euclidean", "pyod:IsolationForest_with_a_long_name"]
    out = io.StringIO()
    print_summary(results(names), tmp_path, Console(file=out, width=width))
    text = out.getvalue()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines if not line.startswith(ONE_LINE)), text
    for name in ["protonet", *names]:  # one row per detector: its name and its AUROC on one line
        row = [line for line in lines if re.match(rf"{re.escape(name)} +0\.\d{{3}} ± 0\.004", line)]
        assert len(row) == 1, text
    header = next(line for line in lines if line.startswith("detector"))
    shown = [c for c in ("AUROC ± 95% CI", "AUPR", "F1", "bal. acc.") if c in header]
    left_out = [c for c in ("AUROC ± 95% CI", "AUPR", "F1", "bal. acc.") if c not in header]
    assert shown[0] == "AUROC ± 95% CI"
    if left_out:
        note = " ".join(text.split()).split("(not shown at this width: ", 1)[1].split(")")[0]
        assert all(column in note for column in left_out) and "metrics.json" in note
    if width >= 120:
        assert not left_out
    assert sum("is below baseline" in line or "beats baseline" in line for line in lines) == len(names)


@pytest.mark.parametrize("width", [60, 80, 200])
def test_the_sweep_summary_fits_the_terminal(tmp_path, width):
    overrides = "model.optimizer.lr=0.0012520653814999472 backbone.embed_dim=32 model.distance=cosine"
    rows = [
        {
            "job": str(job),
            "overrides": overrides,
            "val/auroc": 0.9 - job / 10,
            "test/auroc": 0.8,
            "test ci95": 0.0347,
            "steps": 400,
            "status": "done",
        }
        for job in range(3)
    ]
    out = io.StringIO()
    show(rows, tmp_path / "sweep", Console(file=out, width=width))
    text = out.getvalue()
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines if not line.startswith(ONE_LINE)), text
    table_rows = [line for line in lines if re.match(r" *\d+ ", line) and "0.8000 ± 0.0347" in line]
    assert len(table_rows) == 3, "numbers never wrap"
    if width >= 200:
        assert "not shown" not in text and "model.distance=cosine" in text
    if width == 60:
        assert "(not shown at this width: status, steps; see sweep_summary.csv)" in " ".join(text.split())
    command = next(line for line in lines if line.startswith("compare the runs: "))
    assert shlex.split(command.split(": ", 1)[1]) == ["tensorboard", "--logdir", str(tmp_path / "sweep")]
