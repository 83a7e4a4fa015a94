"""`pip install .` (not editable) into a fresh virtual environment gives working apps from any
folder, configs included, and one version number (pyproject.toml's)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def checkout_copy(target: Path) -> Path:
    """The files a fresh clone has (tracked, plus new files git does not ignore), nothing built."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@pytest.mark.slow
def test_a_non_editable_install_runs_the_apps_from_any_folder(tmp_path):
    source = checkout_copy(tmp_path / "clone")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # the dependencies come from this environment (no downloads), after the new site-packages, so the
    # metaad installed there is the one imported; a path in a .pth file does not run the .pth files
    # beside it, so this environment's editable metaad stays out
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("PYTHONPATH", "HYDRA_FULL_ERROR", "VIRTUAL_ENV"):
        env.pop(name, None)
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    install += ["--no-deps", "--no-build-isolation", "--no-index", str(source)]
    done = subprocess.run(install, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import json, metaad, metaad.conf, importlib.metadata as m; "
        "print(json.dumps([metaad.__file__, list(metaad.conf.__path__), metaad.__version__, "
        "m.version('metaad')]))"
    )
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    module, conf, version, dist_version = json.loads(done.stdout)
    assert Path(module).is_relative_to(site) and Path(conf[0]).is_relative_to(site)  # not the checkout
    assert sorted(p.relative_to(Path(conf[0])) for p in Path(conf[0]).rglob("*.yaml")) == sorted(
        p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")
    )
    expected = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert version == dist_version == expected

    app = env_dir / "bin" / "metaad-train"
    done = subprocess.run([app, "--help"], capture_output=True, text=True, env=env, cwd=elsewhere)
    assert done.returncode == 0 and "== Config ==" in done.stdout, done.stderr
    run = ["debug=quick", "dataset=digits", "model=protonet", "logger=none", "baselines=none"]
    run.append("hydra.run.dir=outputs/tiny")
    done = subprocess.run([app, *run], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = json.loads((elsewhere / "outputs" / "tiny" / "metrics.json").read_text())
    assert metrics["model"] == "protonet" and metrics["dataset"] == "digits"
    assert 0.0 <= metrics["test"]["auroc"]["mean"] <= 1.0
