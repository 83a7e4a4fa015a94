"""The README is literally true: its commands run as written and print what it says they print.

Every ``bash`` and ``python`` block carries a marker on the line before it: ``<!-- run: fast -->``
(the slow test below runs it, in README order, in a fresh copy of the checkout with ``.venv/bin`` on
the PATH, as the README tells a reader to set it) or ``<!-- run: skip (why) -->`` (minutes long, data
beside the checkout, a GPU or cluster, a placeholder for your own file, or an illustration). A block
without a marker fails the default suite, so nothing is skipped silently. In a python block, comment
lines right after a ``print(...)`` are what it prints, and must be.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from metaad.apps.train import train
from tests.conftest import compose_in
from tests.test_install import checkout_copy

README = Path(__file__).parents[1] / "README.md"
RUN = ("bash", "sh", "shell", "console", "python")  # blocks that are commands: they need a marker
MARKER = re.compile(r"<!-- run: (fast|skip \((?P<why>[^)]+(?:\([^)]*\)[^)]*)*)\)) -->")


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str | None  # "fast", "skip" or None

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'untagged'} block)"


def blocks(text: str) -> list[Block]:
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marked = MARKER.fullmatch(before.strip())
        marker = None if marked is None else marked.group(1).split(" ", 1)[0]
        found.append(Block(i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", marker))
        i = end + 1
    return found


def expected_output(code: str) -> list[str] | None:
    """The lines a python block says it prints: the comment lines right after each ``print(...)``
    (None where a print has none: its output is not stated)."""
    lines, out, i = code.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("print("):
            said = []
            while i + 1 < len(lines) and lines[i + 1].startswith("#"):
                i += 1
                said.append(lines[i][2:] if lines[i].startswith("# ") else lines[i][1:])
            if not said:
                return None
            out += said
        i += 1
    return out


def test_every_command_block_says_whether_the_readme_test_runs_it():
    """A new ``bash``/``python`` block without ``<!-- run: fast -->`` or ``<!-- run: skip (why) -->``
    fails here, as does a command hidden in an untagged block (a ``$ `` prompt line)."""
    found = blocks(README.read_text())
    unmarked = [b.where for b in found if b.lang in RUN and b.marker is None]
    assert not unmarked, f"blocks without a run marker: {unmarked}"
    prompts = [b.where for b in found if b.lang not in RUN and re.search(r"^\$ ", b.code, re.M)]
    assert not prompts, f"commands in blocks that are not bash: {prompts}"
    assert sum(b.marker == "fast" for b in found) >= 4  # what the slow test runs


def test_the_parser_sees_markers_and_printed_output():
    text = (
        "<!-- run: skip (needs a GPU (CUDA)) -->\n```bash\nmake gpu\n```\n\n```python\nprint(1)\n# 1\n```\n"
        "<!-- run: fast -->\n\n```python\nx = 2  # two\nprint(x)\n# 2\nprint(x, x)\n# 2 2\n```\n"
    )
    found = blocks(text)
    assert [(b.lang, b.marker) for b in found] == [("bash", "skip"), ("python", None), ("python", "fast")]
    assert expected_output(found[2].code) == ["2", "2 2"] and expected_output("print(3)\n") is None


def test_the_python_api_example_runs(tmp_path):
    """The API example against a quick checkpoint of the same run (the slow test runs it as written)."""
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = re.search(r'metaad\.load\("([^"]+)"\)', code).group(1)
    cfg = compose_in(tmp_path / "run", ["logger=none"])
    train(cfg)
    code = code.replace(path, str(Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert len(printed) >= 3 and printed[-1].count("1") == 10  # the baseline flags the ten other digits


@pytest.mark.slow
def test_the_fast_blocks_run_as_written_and_print_what_the_readme_says(tmp_path):
    """From a fresh copy of the checkout with this environment as its .venv (after `make install`)."""
    clone = checkout_copy(tmp_path / "clone")
    venv = Path(sys.prefix)
    (clone / ".venv").symlink_to(venv)
    stamp = venv / ".install.stamp"  # make's targets see an installed checkout, never reinstall
    if stamp.exists():
        os.utime(clone / "pyproject.toml", (stamp.stat().st_mtime - 1,) * 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{clone / '.venv' / 'bin'}:{os.environ['PATH']}"}
    for name in ("HYDRA_FULL_ERROR", "VIRTUAL_ENV", "PYTHONPATH", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    ran = []
    for block in (b for b in blocks(README.read_text()) if b.marker == "fast"):
        if block.lang == "python":
            command = [str(clone / ".venv" / "bin" / "python"), "-"]
        else:
            command = ["bash", "-euo", "pipefail", "-s"]
        done = subprocess.run(
            command, input=block.code, capture_output=True, text=True, cwd=clone, env=env, timeout=600
        )
        failed = f"{block.where} failed:\n{block.code}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        assert done.returncode == 0, failed
        said = expected_output(block.code) if block.lang == "python" else None
        if said is not None:
            assert done.stdout.splitlines() == said, f"{block.where} printed:\n{done.stdout}"
        ran.append(block.line)
    assert len(ran) >= 4
