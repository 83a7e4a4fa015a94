"""MODEL_CARD.md (issue 20, item 7): written by every run from its results; its numbers are
metrics.json's, its verdicts verdict()'s, its limits read off the results, its commands run."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import metaad
from metaad.apps import model_card
from metaad.apps.build import build_datamodule
from metaad.apps.eval import evaluate
from metaad.apps.train import train
from metaad.evaluation.results import RunResults, Summary, verdict
from tests.conftest import compose_in, run_app


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A quick real digits run beside the default baselines: (cfg, its results, its card's text)."""
    cfg = compose_in(tmp_path_factory.mktemp("card") / "run dir", [])
    results = train(cfg)
    card = (Path(cfg.paths.output_dir) / "MODEL_CARD.md").read_text()
    return cfg, results, card


def blocks(card: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", card, re.S)


def test_the_card_holds_the_runs_numbers_verdicts_and_threshold(run):
    cfg, results, card = run
    on_disk = RunResults.read(Path(cfg.paths.output_dir) / "metrics.json")
    assert on_disk == results
    learner = on_disk.test["auroc"]
    row = f"| protonet | {learner.mean:.3f} ± {learner.ci95:.3f} | {on_disk.test['aupr'].mean:.3f} ± "
    assert row in card
    assert on_disk.baselines, "the default run scores baselines"
    for name, metrics in on_disk.baselines.items():
        auroc = metrics["auroc"]
        word = model_card.WORDS[verdict(learner, auroc)]
        gap = learner.mean - auroc.mean
        line = f"| baseline {name} | {auroc.mean:.3f} ± {auroc.ci95:.3f} |"
        assert line in card and f"protonet {word} it ({gap:+.3f}) |" in card, name
    verdicts = [verdict(learner, m["auroc"]) for m in on_disk.baselines.values()]
    counts = ", ".join(
        f"{model_card.WORDS[w]} {verdicts.count(w)}" for w in model_card.WORDS if w in verdicts
    )
    assert f"**Verdict**: protonet {counts} of the {len(verdicts)} baselines" in card
    below = [b for b, m in on_disk.baselines.items() if verdict(learner, m["auroc"]) == "below"]
    assert ("Below the baselines on this data" in card) == bool(below)
    assert f"threshold {on_disk.threshold['value']:.4g}" in card and "fitted on the validation" in card
    split = on_disk.tasks
    assert f"- test tasks (held out, reported below): {', '.join(map(str, split['test']))}" in card
    assert f"K = {on_disk.k_shot} normal support samples" in card
    assert f"{learner.n_episodes} test" in card


@pytest.mark.slow
def test_the_cards_commands_run_against_its_checkpoint(run, tmp_path):
    cfg, results, card = run
    best = Path(results.checkpoint).absolute()
    python = blocks(card, "python")[0]
    shell = [line for block in blocks(card, "bash") for line in block.splitlines()]
    commands = {words[0]: words for words in map(shlex.split, shell)}
    assert set(commands) == {"metaad-score", "metaad-export", "metaad-eval"}
    for words in commands.values():
        assert f"ckpt_path={best}" in words, words  # one line, quoted: the path survives as one word
    # the card's data: digits of a test task, as a user has them (0-16)
    episode = build_datamodule(cfg).datasets["test"][0]
    columns = [f"pixel_{i}" for i in range(64)]
    support, query = tmp_path / "normal.csv", tmp_path / "new.csv"
    pd.DataFrame(episode.support.reshape(len(episode.support), -1).numpy() * 16, columns=columns).to_csv(
        support, index=False
    )
    pd.DataFrame(episode.query.reshape(len(episode.query), -1).numpy() * 16, columns=columns).to_csv(
        query, index=False
    )
    done = run_app(commands["metaad-score"][0], commands["metaad-score"][1:], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == len(episode.query)
    # the Python lines load the same checkpoint and give the same scores
    path = ast.literal_eval(re.search(r"metaad\.load\((.*?)\)", python).group(1))
    assert Path(path) == best
    det = metaad.load(path).fit(pd.read_csv(support))
    assert np.allclose(det.decision_function(pd.read_csv(query)), scores["score"], atol=1e-5)
    done = run_app(commands["metaad-export"][0], commands["metaad-export"][1:], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "detector.pt").is_file()


def test_metaad_eval_writes_a_card_of_its_own_numbers(run, tmp_path):
    _, results, _ = run
    cfg = compose_in(tmp_path / "eval", [f"ckpt_path={results.checkpoint}"], config_name="eval", quick=False)
    evaluated = evaluate(cfg)
    card = (Path(cfg.paths.output_dir) / "MODEL_CARD.md").read_text()
    auroc = evaluated.test["auroc"]
    assert f"| protonet | {auroc.mean:.3f} ± {auroc.ci95:.3f} |" in card
    assert f"ckpt_path={Path(results.checkpoint).absolute()}" in card


def card_results(k_shot: int, learner: float, baseline: float, **fields) -> RunResults:
    def metrics(mean: float) -> dict[str, Summary]:
        return {"auroc": Summary(mean, 0.01, 100), "aupr": Summary(mean, 0.01, 100)}

    return RunResults(
        names={"model": "maml", "dataset": "mvtec"},
        k_shot=k_shot,
        seed=0,
        data="mvtec",
        checkpoint="/runs/x/checkpoints/best.ckpt",
        tasks={"train": ["a", "b"], "val": ["c"], "test": ["d"]},
        test=metrics(learner),
        baselines={"mean_euclidean": metrics(baseline)},
        **fields,
    )


def test_known_limits_are_read_off_the_results():
    below = model_card.limits(card_results(5, 0.60, 0.80), {})
    assert any("Below the baselines on this data" in limit and "mean_euclidean" in limit for limit in below)
    beats = model_card.limits(card_results(5, 0.90, 0.80), {})
    assert not any("Below the baselines" in limit or "Not distinguishable" in limit for limit in beats)
    within = model_card.limits(card_results(5, 0.80, 0.805), {})
    assert any("Not distinguishable from mean_euclidean" in limit for limit in within)
    one_shot = model_card.limits(card_results(1, 0.90, 0.80), {})
    assert any(limit.startswith("K=1: ") for limit in one_shot)
    assert not any(limit.startswith("K=1: ") for limit in beats)
    assert any("Tested on 1 held-out task(s) only" in limit for limit in beats)
    reasons = {"val_auroc_best": "validation never ran"}
    unvalidated = model_card.limits(card_results(5, 0.9, 0.8, null_reasons=reasons), {})
    assert "`val_auroc_best` is null: validation never ran." in unvalidated


def test_a_series_model_gets_the_series_commands_and_no_export():
    commands = model_card.commands(Path("/runs/it's/best.ckpt"), "series")
    assert "export" not in commands
    words = shlex.split(commands["score"])
    assert words[:2] == ["metaad-score", "ckpt_path='/runs/it\\'s/best.ckpt'"]
    assert "history=normal_steps.csv" in words and "series=new_steps.csv" in words
