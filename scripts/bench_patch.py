"""Speed of the patch detectors: scoring one new image against K support images, one CPU thread.

For each detector (patch kNN with every support patch in its memory bank, PaDiM, the patch adapter
untrained: its cost does not depend on its weights) the time to adapt to K support images and to
score one query image with its anomaly map, on patch features of the shape EfficientNet-Lite0's
default stages give at 224 x 224 (432 channels on a 14 x 14 grid; ``--channels``/``--grid`` to
change). With ``--extractor`` (the `images` extra installed) the extraction of the query image by
the frozen backbone is timed too, so the figure is image in, score and map out. The contenders
alternate, repeat by repeat, so load on the machine hits them alike; the median is printed.

    OMP_NUM_THREADS=1 python scripts/bench_patch.py               # K = 1, 2, 4, 8
    OMP_NUM_THREADS=1 python scripts/bench_patch.py --extractor   # plus the backbone's own time
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metaad.detectors.patch import PaDiM, PatchKNN
from metaad.detectors.patch_adapter import PatchAdapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--channels", type=int, default=432)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--extractor", action="store_true", help="time EfficientNet-Lite0 on the query image too"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c, g = args.channels, args.grid
    extractor = None
    if args.extractor:
        from metaad.detectors.extractors import EfficientNetLite0

        extractor = EfficientNetLite0()
        image = torch.rand(1, 3, extractor.size, extractor.size)
        with torch.no_grad():
            c, g = extractor(image).shape[1], extractor(image).shape[-1]
    detectors = {"patch_knn": PatchKNN(), "padim": PaDiM(), "patch_adapter": PatchAdapter((c, g, g))}
    print(
        f"one query image scored against K support images: features ({c}, {g}, {g}), 1 thread, "
        f"median of {args.repeats}"
    )
    print(
        "| detector | K | bank patches | adapt + score + map (ms) |"
        + (" + extraction (ms) |" if extractor else "")
    )
    print("| --- | --- | --- | --- |" + (" --- |" if extractor else ""))
    for k in args.shots:
        support, query = torch.randn(1, k, c, g, g), torch.randn(1, 1, c, g, g)
        times: dict[str, list[float]] = {name: [] for name in detectors}
        extraction: list[float] = []
        with torch.no_grad():
            for _ in range(args.repeats):
                if extractor is not None:
                    start = time.perf_counter()
                    extractor(image)
                    extraction.append(time.perf_counter() - start)
                for name, detector in detectors.items():
                    start = time.perf_counter()
                    state = detector.adapt(support)
                    detector.score(state, query)
                    detector.score_maps(state, query)
                    times[name].append(time.perf_counter() - start)
        for name in detectors:
            row = f"| {name} | {k} | {k * g * g} | {1000 * statistics.median(times[name]):.1f} |"
            if extractor is not None:
                total = statistics.median(times[name]) + statistics.median(extraction)
                row += f" {1000 * total:.1f} |"
            print(row)


if __name__ == "__main__":
    main()
