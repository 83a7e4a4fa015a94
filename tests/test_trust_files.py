"""Trust: nothing read from a file runs code, nothing the user owns is overwritten or deleted.

Crafted checkpoints carry payloads that write, truncate or copy files in every section of the stored
config; each entry point (the Python API, metaad-eval, metaad-score) must refuse them before anything
is built, naming the file, the key and the target. A failed start removes only what the run created;
metaad-score never writes onto its inputs; metaad-eval scores only tasks the model never saw.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import metaad
from metaad.apps.eval import evaluate
from metaad.apps.score import score, write_atomically
from metaad.apps.train import train
from metaad.checkpoint import STORED_SECTIONS, allowed_targets
from metaad.errors import CheckpointError, ConfigError
from tests.conftest import compose_in
from tests.test_bad_inputs import one_block, refused, run_app

HYDRA_ADVICE = "HYDRA_INSTANTIATE_ALLOWLIST_OVERRIDE"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quick digits run with train_tasks null (all but val/test), val digits 8-9, test digits 6-7."""
    overrides = [
        "dataset.train_tasks=null",
        "dataset.val_tasks=[8,9]",
        "dataset.test_tasks=[6,7]",
        "baselines=none",
        "logger=none",
    ]
    cfg = compose_in(tmp_path_factory.mktemp("train"), overrides)
    metrics = train(cfg).to_json()
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    return metrics, ckpt, torch.load(ckpt, weights_only=True)


# --- payloads: each would write, truncate or copy a file if it were ever built --------------------
def payloads(folder: Path) -> dict[str, dict]:
    marker, secret = folder / "pwned", folder / "secret.txt"
    secret.write_text("secret")
    return {
        "Path.write_text": {"_target_": "pathlib.Path.write_text", "_args_": [str(marker), "x"]},
        "shutil.copyfile": {"_target_": "shutil.copyfile", "src": str(secret), "dst": str(marker)},
        "open for writing": {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
        "numpy.save": {"_target_": "numpy.save", "file": str(marker), "arr": [1]},
        "torch.save": {"_target_": "torch.save", "obj": 1, "f": str(marker)},
        "partial": {"_target_": "pathlib.Path.write_text", "_partial_": True, "self": str(marker)},
        "os.system (Hydra blocks it)": {"_target_": "os.system", "command": f"touch {marker}"},
        # an allowed class in the wrong section: a logger is never a model
        "logger as a learner": {
            "_target_": "pytorch_lightning.loggers.TensorBoardLogger",
            "save_dir": str(marker),
        },
        "not a string": {"_target_": {"nested": "x"}},
    }


KINDS = [
    "Path.write_text",
    "shutil.copyfile",
    "open for writing",
    "numpy.save",
    "torch.save",
    "partial",
    "os.system (Hydra blocks it)",
    "logger as a learner",
    "not a string",
]


def plant(config: dict, where: str, payload: dict) -> str:
    """Put ``payload`` at ``where`` in a stored config; returns the key the message must name."""
    if where == "dataset.val_tasks[0]":
        config["dataset"]["val_tasks"][0] = payload
        return "dataset.val_tasks[0]"
    if where == "model._args_[0]":
        config["model"]["_args_"] = [payload]
        return "model._args_[0]"
    if where in ("backbone", "model", "threshold", "baseline_threshold"):
        config[where] = payload
        return where
    if where == "baselines.evil":
        config["baselines"] = {**(config.get("baselines") or {}), "evil": payload}
        return where
    section, key = where.split(".", 1)
    config[section][key] = payload
    return where


WHERE = [
    "dataset.seed",
    "dataset.source",
    "dataset.val_tasks[0]",
    "backbone",
    "backbone.embed_dim",
    "model",
    "model.optimizer",
    "model.temperature",
    "model._args_[0]",
    "baselines.evil",
    "threshold",
    "baseline_threshold",
    "names.model",
]


def crafted(trained, folder: Path, kind: str, where: str) -> tuple[Path, str, Path]:
    # metaad's part of a real checkpoint (the check comes before any weight is read)
    checkpoint = copy.deepcopy({k: v for k, v in trained[2].items() if k.startswith("metaad_")})
    payload = payloads(folder)[kind]
    key = plant(checkpoint["metaad_config"], where, payload)
    if where == "model" and kind == "logger as a learner":
        key = "model"
    path = folder / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path, key, folder / "pwned"


def assert_refused(error: pytest.ExceptionInfo, path: Path, key: str, marker: Path) -> None:
    text = refused(error, str(path), f"{key}._target_")
    assert HYDRA_ADVICE not in text, text
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("kind", KINDS)
def test_metaad_load_refuses_any_target_metaad_never_writes(trained, tmp_path, kind, where):
    path, key, marker = crafted(trained, tmp_path, kind, where)
    with pytest.raises(CheckpointError) as error:
        metaad.load(path)
    assert_refused(error, path, key, marker)


def eval_it(path: Path, run_dir: Path) -> None:
    evaluate(compose_in(run_dir, [f"ckpt_path={path}", "logger=none"], "eval", quick=False))


def score_it(path: Path, run_dir: Path) -> None:
    data = np.random.default_rng(0).uniform(0, 16, (4, 64))
    np.savez(run_dir.parent / "s.npz", X=data)
    args = [f"ckpt_path={path}", f"support={run_dir.parent / 's.npz'}", f"query={run_dir.parent / 's.npz'}"]
    score(compose_in(run_dir, args, "score", quick=False))


@pytest.mark.parametrize("entry", [eval_it, score_it], ids=["metaad-eval", "metaad-score"])
@pytest.mark.parametrize(
    "kind, where",
    [(kind, "model") for kind in KINDS if kind != "not a string"]
    + [("Path.write_text", where) for where in WHERE],
)
def test_the_apps_refuse_a_crafted_checkpoint_before_building_anything(trained, tmp_path, entry, kind, where):
    path, key, marker = crafted(trained, tmp_path, kind, where)
    with pytest.raises(CheckpointError) as error:
        entry(path, tmp_path / "run")
    assert_refused(error, path, key, marker)


@pytest.mark.parametrize(
    "value", ["${oc.env:HOME}", "${oc.decode:'{_target_: pathlib.Path.write_text}'}", "a ${now:%H} b"]
)
def test_a_stored_interpolation_is_refused(trained, tmp_path, value):
    checkpoint = copy.deepcopy(trained[2])
    checkpoint["metaad_config"]["dataset"]["seed"] = value
    torch.save(checkpoint, tmp_path / "interp.ckpt")
    with pytest.raises(CheckpointError) as error:
        metaad.load(tmp_path / "interp.ckpt")
    refused(error, "dataset.seed", "interpolation")


def test_a_genuine_checkpoint_names_only_allowed_targets_and_loads(trained):
    detector = metaad.load(trained[1])
    assert detector.detector is not None
    stored = trained[2]["metaad_config"]
    assert set(stored) <= set(STORED_SECTIONS)
    assert "trainer" not in stored and "callbacks" not in stored  # the evaluating run's own


@pytest.mark.parametrize(
    "override",
    [
        "model.optimizer._target_=pathlib.Path.write_text",
        "+model.evil._target_=shutil.copyfile",
        "threshold._target_=builtins.open",
        "+baselines.evil._target_=os.system",
    ],
)
def test_training_refuses_at_start_up_a_target_its_checkpoint_could_not_hold(tmp_path, override):
    cfg = compose_in(tmp_path / "run", [override, "logger=none"])
    with pytest.raises(ConfigError) as error:
        train(cfg)
    refused(error, "the config", override.split("=")[0].lstrip("+").rsplit("._target_", 1)[0])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_allow_list_is_metaads_own_configs():
    allowed = allowed_targets()
    assert "metaad.detectors.protonet.ProtoNet" in allowed and "torch.optim.Adam" in allowed
    assert not any(t.startswith(("os.", "shutil.", "builtins.", "pathlib.", "numpy.")) for t in allowed)


# --- metaad-eval: held-out tasks only, and nothing ignored ---------------------------------------
@pytest.mark.parametrize(
    "tasks, role", [("[3]", "meta-trained"), ("[0,6]", "meta-trained"), ("[9]", "validated")]
)
def test_eval_refuses_tasks_the_checkpoint_trained_or_was_selected_on(trained, tmp_path, tasks, role):
    cfg = compose_in(
        tmp_path / "run", [f"ckpt_path={trained[1]}", f"+dataset.test_tasks={tasks}"], "eval", False
    )
    with pytest.raises(ConfigError) as error:
        evaluate(cfg)
    refused(error, "dataset.test_tasks", role, str(trained[1]))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_train_and_eval_record_the_task_lists(trained, tmp_path):
    metrics = trained[0]
    assert metrics["tasks"]["val"] == ["8", "9"] and metrics["tasks"]["test"] == ["6", "7"]
    assert metrics["tasks"]["train"] == ["0", "1", "2", "3", "4", "5"]  # train_tasks null: all the others
    assert trained[2]["metaad_tasks"] == metrics["tasks"]
    cfg = compose_in(tmp_path / "run", [f"ckpt_path={trained[1]}", "logger=none"], "eval", quick=False)
    evaluated = evaluate(cfg).to_json()
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["tasks"]["trained_on"] == metrics["tasks"] and evaluated["tasks"]["test"] == ["6", "7"]


@pytest.mark.parametrize(
    "app, override, named",
    [
        ("eval", "+model=siamese", "model cannot be changed"),
        ("eval", "+backbone=conv4", "backbone cannot be changed"),
        ("eval", "+seed=3", "seed cannot be changed"),
        ("eval", "+epochs=3", "epochs is not a setting of metaad-eval"),
        ("score", "+model=siamese", "model is not a setting of metaad-score"),
        ("score", "+dataset.k_shot=3", "dataset is not a setting of metaad-score"),
    ],
)
def test_a_setting_the_app_would_ignore_is_refused(trained, tmp_path, app, override, named):
    args = [f"ckpt_path={trained[1]}", override]
    if app == "score":
        args += ["support=s.csv", "query=q.csv"]
    cfg = compose_in(tmp_path / "run", args, app, quick=False)
    with pytest.raises(ConfigError) as error:
        (evaluate if app == "eval" else score)(cfg)
    refused(error, named)


# --- metaad-score: never onto an input; only a previous table is replaced, atomically --------------
@pytest.fixture
def score_files(trained, tmp_path):
    rng = np.random.default_rng(0)
    header = ",".join(f"p{i}" for i in range(64))
    for name, n in (("support.csv", 5), ("query.csv", 6)):
        rows = "\n".join(",".join(str(v) for v in rng.integers(0, 17, 64)) for _ in range(n))
        (tmp_path / name).write_text(f"{header}\n{rows}\n")
    return tmp_path


def score_to(trained, folder: Path, output: Path | str, *extra: str):
    args = [
        f"ckpt_path={trained[1]}",
        f"support={folder / 'support.csv'}",
        f"query={folder / 'query.csv'}",
        f"output={output}",
        *extra,
    ]
    return score(compose_in(folder / "run", args, "score", quick=False))


@pytest.mark.parametrize("target", ["query.csv", "support.csv", "checkpoint", "link to query", "hard link"])
def test_score_never_writes_onto_an_input(trained, score_files, target):
    query = score_files / "query.csv"
    before = query.read_bytes()
    if target == "checkpoint":
        output = score_files / "model.csv"
        os.link(trained[1], output)
        before = output.read_bytes()
    elif target == "link to query":
        output = score_files / "link.csv"
        output.symlink_to(query)
    elif target == "hard link":
        output = score_files / "hard.csv"
        os.link(query, output)
    else:
        output = score_files / target
        before = output.read_bytes()
    with pytest.raises(metaad.data.DataError) as error:
        score_to(trained, score_files, output, "overwrite=true")
    refused(error, "is one of the inputs")
    assert output.read_bytes() == before and query.read_bytes() == (score_files / "query.csv").read_bytes()


def test_score_replaces_only_a_previous_scores_table(trained, score_files):
    mine = score_files / "notes.csv"
    mine.write_text("my,own\n1,2\n")
    with pytest.raises(metaad.data.DataError) as error:
        score_to(trained, score_files, mine)
    refused(error, "notes.csv", "overwrite=true")
    assert mine.read_text() == "my,own\n1,2\n"
    out = score_files / "scores.csv"
    score_to(trained, score_files, out)
    first = out.read_text()
    score_to(trained, score_files, out)  # a previous scores table: replaced
    assert out.read_text() == first
    score_to(trained, score_files, mine, "overwrite=true")  # the user said so
    assert mine.read_text() == first
    assert not list(score_files.glob(".*partial*"))


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    out = tmp_path / "scores.csv"
    out.write_text("old")

    def fails(path: Path) -> None:
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(metaad.data.DataError) as error:
        write_atomically(out, fails)
    refused(error, "scores.csv", "No space left", "nothing was replaced")
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["scores.csv"]


# --- a failed start removes only what it created ------------------------------------------------
@pytest.mark.slow
def test_a_failed_start_keeps_a_folder_the_user_had(tmp_path):
    mine = tmp_path / "logs"
    mine.mkdir()
    (mine / "a.log").write_text("mine")
    (mine / "train.log").write_text("mine too")
    done = run_app("metaad-train", ["dataset.k_shot=0", f"hydra.run.dir={mine}"], tmp_path)
    one_block(done, "metaad-train")
    assert (mine / "a.log").read_text() == "mine"
    assert (mine / "train.log").read_text().startswith("mine too")
    fresh = tmp_path / "fresh"
    one_block(
        run_app("metaad-train", ["dataset.k_shot=0", f"hydra.run.dir={fresh}"], tmp_path), "metaad-train"
    )
    assert not fresh.exists()


@pytest.mark.slow
def test_a_failed_sweep_job_keeps_a_job_folder_the_user_had(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "mine.log").write_text("mine")
    done = run_app("metaad-train", ["-m", "dataset.k_shot=0,-1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 1, done.stderr
    assert (sweep / "0" / "mine.log").read_text() == "mine"
    assert not (sweep / "1").exists()  # created by the failed job: removed


@pytest.mark.parametrize("key", ["inference_mode", "use_distributed_sampler"])
def test_trainer_invariants_are_not_settings(tmp_path, key):
    cfg = compose_in(tmp_path / "run", [f"+trainer.{key}=true", "logger=none"])
    with pytest.raises(ConfigError) as error:
        train(cfg)
    refused(error, f"trainer.{key} is fixed by metaad")


@pytest.mark.slow
def test_a_stored_config_read_with_config_dir_builds_only_metaads_targets(tmp_path):
    stored = tmp_path / "run" / ".hydra"
    stored.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (stored / "config.yaml").write_text(
        "defaults:\n  - train\n  - _self_\ncallbacks:\n  evil:\n"
        f"    _target_: pathlib.Path.write_text\n    _args_: [{marker}, x]\n"
    )
    args = ["--config-dir", str(stored), "--config-name", "config", f"hydra.run.dir={tmp_path / 'again'}"]
    line = one_block(run_app("metaad-train", [*args, "debug=quick", "logger=none"], tmp_path), "metaad-train")
    assert "callbacks.evil._target_" in line and "pathlib.Path.write_text" in line and str(stored) in line
    assert not marker.exists() and HYDRA_ADVICE not in line


def test_the_stored_config_resolves_interpolations_into_other_sections(tmp_path):
    """dataset.source.root is ${paths.data_dir}: the checkpoint keeps the resolved path, not the key."""
    from metaad.checkpoint import stored_config

    cfg = compose_in(tmp_path / "run", ["dataset=mnist", "paths.data_dir=/somewhere/data"])
    stored = stored_config(cfg)
    assert "paths" not in stored and stored["dataset"]["source"]["root"].startswith("/somewhere/data")


CONF = Path(__file__).parents[1] / "conf"
OPTIONS = [
    (group, p.stem)
    for group in ("dataset", "backbone", "model", "baselines", "threshold", "experiment")
    for p in sorted((CONF / group).glob("*.yaml"))
    if not p.stem.startswith("_")
]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_config_can_be_stored_in_a_checkpoint(tmp_path, group, option):
    """The allow-list is metaad's own configs, each target in its own section: every option of every
    group must pass it (a new learner, baseline or source is allowed by its config alone)."""
    from metaad.checkpoint import check_targets, stored_config

    needs = {"series_subset": ["experiment=smap", "baseline_columns=[0]"]}.get(option, [])
    cfg = compose_in(tmp_path / "run", [*needs, f"{group}={option}"])
    check_targets(stored_config(cfg), f"{group}={option}")
