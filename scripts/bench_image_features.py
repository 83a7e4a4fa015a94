"""How long photographs take to become cached patch features: reading (decode + resize), the first
feature pass (every image through the frozen extractor, written to the cache) and a second pass
(every image read back from the cache), on one CPU thread, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_image_features.py \
        --root ../shared/data/images/mtd ../shared/data/images/piped --backbone efficientnet_lite0

``--backbone``: a config of conf/backbone (a frozen extractor) or a path to such a YAML file. The
cache goes to a fresh temporary folder (removed afterwards) unless ``--cache`` names one.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from metaad.data.features import FeatureCache
from metaad.data.image_folder import image_folder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", nargs="+", required=True, help="image folders (MVTec AD or plain layout)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    config = (
        Path(args.backbone)
        if args.backbone.endswith(".yaml")
        else ROOT / "conf/backbone" / f"{args.backbone}.yaml"
    )
    extractor = instantiate(OmegaConf.load(config))
    size = int(extractor.identity().get("size", 224))
    start = time.perf_counter()
    data = image_folder(args.root, size=size)
    read = time.perf_counter() - start
    folder = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="metaad-features-"))
    try:
        times = []
        for _ in range(2):
            cache = FeatureCache(folder, extractor, batch=args.batch)
            start = time.perf_counter()
            features = cache.features(data.x, data.name)
            times.append((time.perf_counter() - start, cache.computed))
        size_on_disk = sum(p.stat().st_size for p in folder.rglob("*.feat"))
    finally:
        if not args.cache:
            shutil.rmtree(folder, ignore_errors=True)
    n = len(data.x)
    print(
        f"{n} images ({len(data.task_names)} categories) at {size}x{size}, "
        f"features {tuple(features.shape[1:])}"
    )
    print(f"read (decode + resize):  {read:7.1f} s  {n / read:7.1f} images/s")
    for label, (seconds, computed) in zip(
        ("first pass (extract)", "second pass (cache)"), times, strict=True
    ):
        print(
            f"{label:24s} {seconds:7.1f} s  {n / seconds:7.1f} images/s  "
            f"({computed} run through the extractor)"
        )
    print(f"cache on disk: {size_on_disk / 2**20:.1f} MiB (float16)")


if __name__ == "__main__":
    main()
