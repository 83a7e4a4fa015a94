"""``metaad-export``: a checkpoint adapted to your normal samples, written as one file that scores
raw samples without metaad (see :mod:`metaad.export`).

    metaad-export ckpt_path=outputs/train/.../checkpoints/best.ckpt support=normal.csv output=detector.pt

The support is read as ``metaad-score`` reads it (:func:`metaad.apps.score.read_samples`) and the
learner adapts to it as the Python API does: ``metaad.load(ckpt_path).fit(support).export(output)``.
Settings and paths are checked before the model is loaded; nothing is written onto an input.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from metaad.apps.cli import app
from metaad.data.tasks import DataError
from metaad.errors import ConfigError
from metaad.export import FORMATS


def export(cfg: DictConfig) -> Path:
    """Adapt ``cfg.ckpt_path`` to ``cfg.support`` and write ``cfg.output``; returns its path."""
    from hydra.utils import instantiate

    from metaad.api import load
    from metaad.apps.checks import check_settings_of, check_threshold
    from metaad.apps.score import check_images_fit, fit_support, read_for_model

    check_settings_of(cfg, "export")
    for key in ("ckpt_path", "support", "output"):
        if not isinstance(cfg.get(key), str) or not cfg.get(key):
            raise ConfigError(f"{key} must be the path of a file or folder, got {cfg.get(key)!r}")
    if cfg.get("format") not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {cfg.get('format')!r}")
    if not isinstance(cfg.get("overwrite"), bool):
        raise ConfigError(f"overwrite must be true or false, got {cfg.get('overwrite')!r}")
    output = Path(cfg.output)
    for role in ("ckpt_path", "support"):
        if output.exists() and Path(cfg[role]).exists() and os.path.samefile(output, cfg[role]):
            raise DataError(f"output={output} is the {role} ({cfg[role]}); give another path for the export")
    check_threshold(cfg.get("threshold"))
    threshold = instantiate(cfg.threshold) if cfg.get("threshold") is not None else None
    detector = load(cfg.ckpt_path, threshold=threshold)
    if detector.threshold_rule is None:
        raise ConfigError(
            f"ckpt_path: {cfg.ckpt_path} was trained without a threshold, and the export decides; choose "
            "one with threshold=support_quantile or threshold=fixed"
        )
    shape = tuple(detector.preprocessing.sample_shape)
    check_images_fit(cfg.support, "support", shape)
    _, support = read_for_model(cfg.support, "support", shape)
    fit_support(detector, support, f"support={cfg.support}")
    written = detector.export(output, format=cfg.format, overwrite=cfg.overwrite)
    rule = detector.threshold_rule
    print(
        f"{detector.name} adapted to {detector.n_support_} normal samples, threshold {rule.rule} = "
        f"{detector.threshold_:.4g} (normalise={rule.normalise}) -> {written} ({cfg.format})"
    )
    return written


@app("export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
