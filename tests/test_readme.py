"""The README's Python API example runs as written (against a quick checkpoint of the same run)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from metaad.apps.train import train
from tests.conftest import compose_in

README = Path(__file__).parents[1] / "README.md"


def test_the_python_api_example_runs(tmp_path):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cfg = compose_in(tmp_path / "run", ["logger=none"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    code = code.replace("outputs/train/readme_example_protonet_digits/checkpoints/best.ckpt", str(ckpt))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert len(printed) >= 3 and printed[-1].count("1") == 10  # the baseline flags the ten other digits
