"""Stream-scoring speed on one CPU thread: steps scored per second by learners of the configured
(trained) size on a TCN backbone, beside a numpy z-score's, all measured in this one run.

Every contender adapts once to K support windows, then scores a whole series of T steps (D
metrics), a window of W steps ending at every step (``metaad.detectors.base.score_stream``). The
learners are built from their configs (``backbone=tcn``, ``model=<name>``) at the configured size;
their weights are as initialised, which does not change the arithmetic. Contenders alternate over
the repeats, so load on the machine hits them alike; the median is reported. The target of issue
22 is 10^5 steps/s for a trained learner.

    python scripts/bench_series_speed.py               # T = 100,000 steps, D = 38 (SMD's width)
    python scripts/bench_series_speed.py --quick       # checks that it runs
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.ndimage import maximum_filter1d  # noqa: E402

from metaad.apps.build import build_learner, compose_config  # noqa: E402
from metaad.detectors.base import score_stream, windowed_stream_scores  # noqa: E402
from metaad.detectors.series_baselines import RobustZScore  # noqa: E402

TARGET = 1e5


def numpy_zscore(support: np.ndarray, series: np.ndarray, window: int, per_step: bool = False) -> np.ndarray:
    """The field's robust z-score in plain numpy: per-metric median / MAD of the support steps, the max
    over metrics per step, then (unless ``per_step``) the max over each window ending at a step."""
    steps = support.reshape(-1, support.shape[-1])
    median = np.median(steps, 0)
    mad = 1.4826 * np.median(np.abs(steps - median), 0)
    scale = np.where(mad > 0, mad, np.where(steps.std(0) > 0, steps.std(0), 1.0))
    z = (np.abs(series - median) / scale).max(-1)
    if per_step:
        return z
    # a causal sliding max: the window ending at step t covers t - window + 1 .. t
    return maximum_filter1d(z, window, origin=(window - 1) // 2)[window - 1 :]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100_000, help="length T of the scored series")
    parser.add_argument("--metrics", type=int, default=38, help="D, metrics per step")
    parser.add_argument("--window", type=int, default=32, help="W, steps per window")
    parser.add_argument("--k-shot", type=int, default=20, help="K support windows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["protonet", "siamese", "maml", "residual", "combination", "channel_weighting"],
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short series and 2 repeats: checks that it runs"
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 5_000, 2
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    t, d, w = args.steps, args.metrics, args.window
    series = torch.randn(1, t, d, generator=g)
    support = torch.randn(1, args.k_shot, w, d, generator=g)
    series_np, support_np = series[0].numpy().astype(np.float64), support[0].numpy().astype(np.float64)

    contenders: dict[str, tuple[Callable[[], object], int]] = {
        "numpy z-score, per step (no window)": (
            lambda: numpy_zscore(support_np, series_np, w, per_step=True),
            t,
        ),
        "numpy z-score, max over the window": (lambda: numpy_zscore(support_np, series_np, w), t),
    }
    zscore = RobustZScore()
    z_state = zscore.adapt(support)
    contenders["metaad RobustZScore.score_stream"] = (lambda: score_stream(zscore, z_state, series, w), t)
    with tempfile.TemporaryDirectory() as run_dir:
        sizes, learners = {}, {}
        for name in args.models:
            cfg = compose_config(["backbone=tcn", f"model={name}", "logger=none"], Path(run_dir) / name)
            learner = build_learner(cfg, (w, d)).eval()
            sizes[name] = sum(p.numel() for p in learner.parameters())
            with torch.no_grad():
                state = learner.adapt(support)

            def run(learner=learner, state=state) -> object:
                with torch.inference_mode():
                    return score_stream(learner, state, series, w)

            contenders[f"{name} + tcn, one causal pass ({sizes[name]:,} parameters)"] = (run, t)
            learners[name] = (learner, state)
        if "protonet" in args.models:
            cfg = compose_config(["backbone=tcn", "model=protonet", "logger=none"], Path(run_dir) / "window")
            protonet = build_learner(cfg, (w, d)).eval()
            with torch.no_grad():
                p_state = protonet.adapt(support)
            short = series[:, : max(t // 10, w + 1)]

            def by_window() -> object:
                with torch.inference_mode():
                    return windowed_stream_scores(protonet, p_state, short, w, chunk=4096)

            contenders["protonet + tcn, a window per step (the fallback)"] = (by_window, short.shape[1])

    # agreement before timing: numpy and metaad's z-score, and the one pass and a window per step
    n = min(t - w + 1, 2000)
    np.testing.assert_allclose(
        numpy_zscore(support_np, series_np, w)[:n], score_stream(zscore, z_state, series, w)[0, :n], rtol=1e-4
    )
    if "protonet" in args.models:
        with torch.inference_mode():
            one_pass = score_stream(protonet, p_state, short, w)
        torch.testing.assert_close(one_pass, by_window(), rtol=1e-4, atol=1e-4)
    piece = series[:, : min(t, 2000)]
    for name, (learner, state) in learners.items():  # every learner's one pass, window by window
        with torch.inference_mode():
            one_pass = score_stream(learner, state, piece, w)
            windowed = windowed_stream_scores(learner, state, piece, w)
        torch.testing.assert_close(
            one_pass, windowed, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, (fn, _) in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["numpy z-score, max over the window"])
    cpu = platform.processor() or platform.machine()
    print(f"# Stream scoring, one CPU thread ({cpu}, torch {torch.__version__})")
    print(f"T = {t:,} steps, D = {d} metrics, W = {w}, K = {args.k_shot}; median of {args.repeats} repeats\n")
    print("| contender | steps/s | vs numpy z-score (windowed) | target 10^5 |")
    print("|---|---:|---:|---|")
    for name, (_, steps) in contenders.items():
        seconds = statistics.median(times[name])
        rate = steps / seconds
        ratio = (steps / seconds) / (t / reference)
        met = "met" if rate >= TARGET else "missed"
        print(f"| {name} | {rate:,.0f} | {ratio:.3f} | {met if 'numpy' not in name else ''} |")


if __name__ == "__main__":
    main()
