"""Speed of the image feature step on ONE CPU thread, and of scoring a new image against K support images.

For each input size: images per second of patch-feature extraction (EfficientNet-Lite0 at its
configured stages), the FLOPs of one image (torch.utils.flop_counter.FlopCounterMode: the features
path, and the whole network to its last conv layer for reference) and the FLOP rate they imply; then
the time to score one new image against a memory bank of all the patches of K support images
(features of the new image + torch.cdist to the bank + min over the bank + max over the image's
patches), end to end and the nearest-neighbour step alone. Medians of repeated runs, measured in one
process.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_extractors.py [--sizes 224 320] [--k 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from metaad.detectors.extractors import EfficientNetLite0


def flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds of ``fn`` (one thread: CPU time is what the work took
    when other processes share the cores; wall-clock is what a user waits)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def patch_knn_score(extractor: EfficientNetLite0, bank: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Image score of one new image: the largest distance of its patches to their nearest support patch."""
    patches = extractor(image).flatten(2).transpose(1, 2)[0]  # (hw, C)
    return torch.cdist(patches, bank).min(1).values.max()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--k", type=int, default=8, help="support images in the memory bank")
    parser.add_argument("--batch", type=int, default=4, help="images per forward pass when extracting")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)

    rows = []
    for size in args.sizes:
        extractor = EfficientNetLite0(size=size)
        batch = torch.rand(args.batch, 3, size, size, generator=generator)
        one = batch[:1]
        per_image = flops(lambda e=extractor, x=one: e(x))
        whole = flops(lambda e=extractor, x=one: e.extract_features(x))
        wall, cpu = median_seconds(lambda e=extractor, x=batch: e(x), args.repeats)
        support = torch.rand(args.k, 3, size, size, generator=generator)
        bank = extractor(support).flatten(2).transpose(1, 2).reshape(-1, extractor.out_channels)
        features = extractor(one).flatten(2).transpose(1, 2)[0]
        end_to_end = median_seconds(lambda e=extractor, b=bank, x=one: patch_knn_score(e, b, x), args.repeats)
        knn = median_seconds(lambda b=bank, f=features: torch.cdist(f, b).min(1).values.max(), args.repeats)
        rates = (args.batch / wall, args.batch / cpu)
        rows.append((size, extractor.out_shape, per_image, whole, rates, bank.shape[0], end_to_end, knn))
        print(f"  size {size}: done", flush=True)

    settings = ", ".join(
        f"{k}={v}" for k, v in extractor.identity().items() if k in ("stages", "grid", "pool")
    )
    print(
        f"\nEfficientNet-Lite0 patch features ({settings}), 1 CPU thread "
        f"(torch {torch.__version__}), batches of {args.batch}; scoring against K={args.k} support images"
    )
    print("(each time: wall-clock / process CPU time; the CPU time excludes waiting for a shared core)")
    header = (
        f"{'size':>4} {'features (C,h,w)':>17} {'GFLOP/img':>9} {'(whole net)':>11} {'img/s':>11} "
        f"{'GFLOP/s':>11} {'bank':>6} {'score 1 img [ms]':>16} {'kNN alone [ms]':>14}"
    )
    print(header)
    print("-" * len(header))
    for size, shape, per_image, whole, rates, bank, end_to_end, knn in rows:
        flop_rates = "/".join(f"{per_image * r / 1e9:.2f}" for r in rates)
        score, alone = ("/".join(f"{t * 1e3:.1f}" for t in pair) for pair in (end_to_end, knn))
        print(
            f"{size:>4} {str(shape):>17} {per_image / 1e9:>9.3f} {whole / 1e9:>11.3f} "
            f"{'/'.join(f'{r:.1f}' for r in rates):>11} {flop_rates:>11} {bank:>6} {score:>16} {alone:>14}"
        )


if __name__ == "__main__":
    main()
