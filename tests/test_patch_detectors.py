"""Patch detectors on patch features (C, h, w): brute-force equality, planted anomalies found where
planted, leave-one-out equal to adapting without one, and the patch adapter learning from masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.covariance import empirical_covariance, ledoit_wolf_shrinkage

import metaad
from metaad.data.episodes import Episode
from metaad.detectors.base import anomaly_scores, leave_one_out_scores
from metaad.detectors.patch import PaDiM, PatchKNN, aggregate, greedy_coreset
from metaad.detectors.patch_adapter import PatchAdapter
from metaad.evaluation.metrics import episode_auroc

DATA = Path(os.environ.get("METAAD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
PIPED = DATA / "images" / "piped"
needs_piped = pytest.mark.skipif(not PIPED.is_dir(), reason=f"real PIPED images not found at {PIPED}")


def features(b: int, n: int, c: int = 6, h: int = 5, w: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, c, h, w, generator=torch.Generator().manual_seed(seed))


def brute_knn(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Every query patch's Euclidean distance to every support patch, the nearest: (B, Q, h, w)."""
    b, q, c, h, w = query.shape
    out = torch.empty(b, q, h, w)
    for e in range(b):
        bank = support[e].permute(0, 2, 3, 1).reshape(-1, c).double()
        for i in range(q):
            for y in range(h):
                for x in range(w):
                    out[e, i, y, x] = (bank - query[e, i, :, y, x].double()).norm(dim=1).min()
    return out


def test_patch_knn_maps_and_scores_equal_a_brute_force_search() -> None:
    support, query = features(2, 3), features(2, 4, seed=1)
    knn = PatchKNN(reduce="max")
    state = knn.adapt(support)
    expected = brute_knn(support, query)
    torch.testing.assert_close(knn.score_maps(state, query), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(knn.score(state, query), expected.flatten(2).amax(-1), rtol=1e-5, atol=1e-5)
    # top 10% of 20 patches: the mean of the 2 largest
    top = PatchKNN(reduce="top", top=0.1).score(state, query)
    torch.testing.assert_close(
        top, expected.flatten(2).sort(-1).values[..., -2:].mean(-1), rtol=1e-5, atol=1e-5
    )


def test_cosine_patch_knn_is_one_minus_the_largest_cosine_similarity() -> None:
    support, query = features(1, 2), features(1, 3, seed=1)
    knn = PatchKNN(reduce="max", distance="cosine")
    maps = knn.score_maps(knn.adapt(support), query)
    s = torch.nn.functional.normalize(support[0].permute(0, 2, 3, 1).reshape(-1, 6), dim=1)
    q = torch.nn.functional.normalize(query[0].permute(0, 2, 3, 1).reshape(-1, 6), dim=1)
    expected = (1 - (q @ s.T).amax(1)).view(3, 5, 4)
    torch.testing.assert_close(maps[0], expected, rtol=1e-5, atol=1e-5)


def test_a_duplicate_patch_scores_zero_not_rounding_noise() -> None:
    support = features(1, 2) * 1000 + 5000  # large norms: the product form alone cancels badly
    knn = PatchKNN(reduce="max")
    assert knn.score_maps(knn.adapt(support), support).max().item() < 1e-3


def test_top_aggregation_takes_the_ceiling_of_the_fraction_and_at_least_one_patch() -> None:
    scores = torch.arange(200.0).view(1, 1, 200)
    assert aggregate(scores, "top", 0.01).item() == pytest.approx((199 + 198) / 2)  # 1% of 200 = 2
    assert aggregate(scores, "top", 0.006).item() == pytest.approx((199 + 198) / 2)  # ceil(1.2) = 2
    assert aggregate(scores[..., :50], "top", 0.01).item() == 49.0  # ceil(0.5) = 1
    assert aggregate(scores, "max").item() == 199.0


def test_padim_equals_a_per_position_ledoit_wolf_gaussian() -> None:
    support, query = features(1, 5, c=4, h=2, w=3), features(1, 2, c=4, h=2, w=3, seed=1)
    padim = PaDiM(reduce="max", ridge=1e-6)
    maps = padim.score_maps(padim.adapt(support), query)
    for y in range(2):
        for x in range(3):
            rows = support[0, :, :, y, x].double().numpy()
            s = empirical_covariance(rows)
            mu = np.trace(s) / 4
            shrink = ledoit_wolf_shrinkage(rows)
            cov = (1 - shrink) * s + (shrink + 1e-6) * mu * np.eye(4)
            r = query[0, :, :, y, x].double().numpy() - rows.mean(0)
            d = np.sqrt(np.einsum("qi,ij,qj->q", r, np.linalg.inv(cov), r))
            np.testing.assert_allclose(maps[0, :, y, x].numpy(), d, rtol=1e-4)


@pytest.mark.parametrize(
    "detector",
    [PatchKNN(), PatchKNN(reduce="max", distance="cosine"), PatchKNN(coreset=0.5), PaDiM()],
    ids=["knn", "knn_cosine", "knn_coreset", "padim"],
)
def test_leave_one_out_equals_adapting_without_each_support_image(detector) -> None:
    support = features(2, 5)
    expected = torch.stack(
        [
            anomaly_scores(detector, support[:, [j for j in range(5) if j != i]], support[:, i : i + 1])[:, 0]
            for i in range(5)
        ],
        1,
    )
    torch.testing.assert_close(
        leave_one_out_scores(detector, support).float(), expected, rtol=1e-4, atol=1e-4
    )


def test_the_adapter_leave_one_out_equals_adapting_without_each_support_image() -> None:
    torch.manual_seed(0)
    adapter = PatchAdapter((6, 5, 4), hidden=8)
    torch.nn.init.normal_(adapter.residual[-1].weight)  # not the identity start
    support = features(2, 4)
    with torch.no_grad():
        expected = torch.stack(
            [
                adapter.anomaly_scores(support[:, [j for j in range(4) if j != i]], support[:, i : i + 1])[
                    :, 0
                ]
                for i in range(4)
            ],
            1,
        )
        torch.testing.assert_close(leave_one_out_scores(adapter, support), expected, rtol=1e-5, atol=1e-5)


def test_coreset_keeps_the_farthest_points_first() -> None:
    bank = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 5.0], [10.1, 0.0]]])
    chosen = greedy_coreset(bank, 3, dim=128, seed=0)[0].tolist()
    # from whichever start, three points from the three clusters
    groups = {0: "a", 1: "a", 2: "b", 4: "b", 3: "c"}
    assert sorted(groups[i] for i in chosen) == ["a", "b", "c"]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_untrained_adapter_is_patch_knn(distance) -> None:
    support, query = features(2, 3), features(2, 4, seed=1)
    adapter, knn = PatchAdapter((6, 5, 4), distance=distance), PatchKNN(distance=distance)
    with torch.no_grad():
        torch.testing.assert_close(
            adapter.anomaly_scores(support, query), anomaly_scores(knn, support, query)
        )
        torch.testing.assert_close(leave_one_out_scores(adapter, support), leave_one_out_scores(knn, support))


@pytest.mark.parametrize(
    "detector", [PatchKNN(), PaDiM(), PatchAdapter((8, 6, 6))], ids=["knn", "padim", "adapter"]
)
def test_planted_anomalous_patches_rank_top_and_light_up_where_planted(detector) -> None:
    """Normal patch features are noise around one pattern per position; an anomalous query has a 2x2
    block replaced by a far-off feature vector: it must score above every normal query, and the
    block must hold its map's largest values."""
    g = torch.Generator().manual_seed(3)
    pattern = torch.randn(8, 6, 6, generator=g)
    normal = pattern + 0.3 * torch.randn(1, 14, 8, 6, 6, generator=g)
    support, query = normal[:, :8], normal[:, 8:].clone()
    query[0, 3:, :, 1:3, 2:4] += 4.0  # queries 3, 4, 5: the block at rows 1-2, columns 2-3
    with torch.no_grad():
        state = detector.adapt(support)
        scores = detector.score(state, query)[0]
        maps = detector.score_maps(state, query)[0]
    assert scores[3:].min() > scores[:3].max()
    for i in (3, 4, 5):
        top4 = {divmod(int(j), 6) for j in maps[i].flatten().topk(4).indices}
        assert top4 == {(1, 2), (1, 3), (2, 2), (2, 3)}


def test_patch_baselines_are_found_by_name_through_the_api() -> None:
    x = features(1, 6)[0].numpy()
    det = metaad.baseline("patch_knn").fit(x[:4])
    scores = det.decision_function(x[4:])
    expected = PatchKNN().score(
        PatchKNN().adapt(torch.from_numpy(x[None, :4])), torch.from_numpy(x[None, 4:])
    )
    np.testing.assert_allclose(scores, expected[0].numpy(), rtol=1e-5)
    assert metaad.baseline("padim").detector.reduce == "top"


def test_bad_settings_name_the_setting() -> None:
    with pytest.raises(ValueError, match="patch_knn.reduce"):
        PatchKNN(reduce="median")
    with pytest.raises(ValueError, match="padim.top"):
        PaDiM(top=0.0)
    with pytest.raises(ValueError, match="patch_knn.coreset"):
        PatchKNN(coreset=2)
    with pytest.raises(ValueError, match="model.mask_fraction"):
        PatchAdapter((6, 5, 4), mask_fraction=0)


# --- real images: features of a fixed random convolution ---------------------------------------
SIZE = 64


def random_features(images: torch.Tensor) -> torch.Tensor:
    """A fixed random two-layer convolution: (N, 3, 64, 64) in [0, 1] -> (N, 24, 8, 8) patch features."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(24, 3, 4, 4, generator=g) / 7, torch.randn(24, 24, 2, 2, generator=g) / 10
    x = torch.nn.functional.conv2d(images - 0.5, w1, stride=4).relu()
    return torch.nn.functional.conv2d(x, w2, stride=2)


def piped(category: str, part: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of a PIPED folder at 64 x 64 and their masks (all False for good ones)."""
    folder = PIPED / category / part
    images, masks = [], []
    for path in sorted(folder.glob("*.jpg"))[:n]:
        images.append(
            np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)) / 255.0
        )
        mask = PIPED / category / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        masks.append(
            np.asarray(Image.open(mask).resize((SIZE, SIZE), Image.NEAREST)) >= 128
            if mask.exists()
            else np.zeros((SIZE, SIZE), bool)
        )
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return random_features(x), torch.from_numpy(np.stack(masks))


def piped_episodes(categories: list[str], k: int = 8, n: int = 8) -> Episode:
    """One episode per category: K train/good support, n test/good and n test/impurity queries."""
    parts = []
    for category in categories:
        support, _ = piped(category, "train/good", k)
        good, good_masks = piped(category, "test/good", n)
        bad, bad_masks = piped(category, "test/impurity", n)
        parts.append((support, torch.cat([good, bad]), torch.cat([good_masks, bad_masks])))
    b = len(parts)
    label = torch.cat([torch.zeros(n), torch.ones(n)]).long().expand(b, -1)
    return Episode(
        torch.stack([p[0] for p in parts]),
        torch.stack([p[1] for p in parts]),
        label,
        torch.arange(b),
        torch.arange(b)[:, None].expand(-1, 2 * n),
        torch.arange(b),
        torch.stack([p[2] for p in parts]),
    )


TRAIN = ["PA_BDP01_TL", "PA_BFT01_TL", "PA_BRG03_TL", "PA_FLR01_TL", "PA_BRG01_RL", "PA_BTN01_RL"]


@needs_piped
def test_patch_knn_on_real_images_finds_impurities_and_their_place() -> None:
    """Random-convolution features of real PIPED paper: the detectors rank impurities above
    normal paper, and the maps are higher on the impurity pixels than off them."""
    from metaad.evaluation.pixel_metrics import pixel_auroc, upsample_maps

    batch = piped_episodes(TRAIN[:3])
    for detector in (PatchKNN(), PaDiM()):
        state = detector.adapt(batch.support)
        auroc = episode_auroc(detector.score(state, batch.query), batch.label).mean().item()
        maps = upsample_maps(detector.score_maps(state, batch.query), SIZE)
        pixels = pixel_auroc(maps, batch.query_masks)
        assert auroc > 0.7 and pixels > 0.8, (type(detector).__name__, auroc, pixels)


@needs_piped
def test_the_adapter_loss_decreases_on_real_features_with_masks() -> None:
    """A few steps of Adam on real random-convolution features of PIPED episodes (masks present):
    the image + patch ranking loss falls, and both parts of it move the weights."""
    torch.manual_seed(0)
    batch = piped_episodes(TRAIN, k=4, n=6)
    adapter = PatchAdapter(tuple(batch.support.shape[2:]), hidden=32)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = adapter.loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    anomalous, normal = adapter.patch_labels(batch.query_masks, batch.label, (8, 8))
    assert anomalous[:, :6].sum() == 0 and normal[:, :6].all()  # normal queries: every patch normal
    assert anomalous[:, 6:].any() and not (anomalous & normal).any()


@needs_piped
def test_the_evaluator_reports_pixel_metrics_beside_image_auroc_for_detectors_with_maps() -> None:
    from metaad.detectors.baselines import NearestNeighbourDistance
    from metaad.evaluation.evaluator import Evaluator
    from metaad.evaluation.pixel_metrics import pixel_auroc, pro_score, upsample_maps

    batch = piped_episodes(TRAIN[:2], k=4, n=4)
    evaluator = Evaluator({"knn": PatchKNN(), "flat": NearestNeighbourDistance()})
    with torch.no_grad():
        evaluator.add("test", evaluator.detectors(PatchAdapter((24, 8, 8)), with_baselines=True), batch)
    test = evaluator.finish().metrics["test"]
    assert "pixel_auroc" not in test["flat"] and "pro" not in test["flat"]  # no maps: image metrics only
    knn = PatchKNN()
    maps = upsample_maps(knn.score_maps(knn.adapt(batch.support), batch.query), SIZE)
    for metric, f in (("pixel_auroc", pixel_auroc), ("pro", pro_score)):
        per_episode = [f(maps[b], batch.query_masks[b]) for b in range(2)]
        assert test["knn"][metric].mean == pytest.approx(np.mean(per_episode))
        assert test["knn"][metric].n_episodes == 2 and test["knn"][metric].ci95 > 0
        # the untrained adapter is patch kNN: the same maps
        assert test[evaluator.learner][metric].mean == pytest.approx(test["knn"][metric].mean, abs=1e-6)
    # an episode whose masks hold no defect pixel has no pixel metrics; the others still count
    empty = batch._replace(query_masks=batch.query_masks.clone())
    empty.query_masks[0] = False
    evaluator.reset()
    with torch.no_grad():
        evaluator.add("test", {"knn": knn}, empty)
    summary = evaluator.finish().metrics["test"]["knn"]
    assert summary["pro"].n_episodes == 1 and summary["auroc"].n_episodes == 2


# --- heat maps: metaad-score's pictures, never over the user's files ------------------------------
def planted_images(n: int = 4, size: int = 24) -> np.ndarray:
    """Grey images with mild noise; image 1 has a bright square at rows 4-7, columns 14-17."""
    rng = np.random.default_rng(0)
    images = 100 + 5 * rng.normal(size=(n, 3, size, size))
    images[1, :, 4:8, 14:18] = 250
    return images.astype(np.float32)


def test_heat_maps_are_written_one_per_image_hot_where_the_defect_is(tmp_path) -> None:
    from metaad.apps.score import check_maps_folder, heat_map_name, write_heat_maps

    support, query = planted_images(6)[2:], planted_images(2)
    det = metaad.baseline("patch_knn").fit(support)  # each pixel a patch of 3 values
    maps = tmp_path / "maps"
    check_maps_folder(maps)
    write_heat_maps(det, ["a.jpg", "b.png"], query, maps, sigma=0.0)
    assert sorted(p.name for p in maps.iterdir()) == [".metaad-score-maps", "a.jpg.map.png", "b.png.map.png"]
    picture = np.asarray(Image.open(maps / heat_map_name("b.png")))
    assert picture.shape == (24, 24, 3) and picture.dtype == np.uint8
    heat = picture.astype(float).sum(-1)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 4 <= y < 8 and 14 <= x < 18
    amap = det.anomaly_maps(query, size=(48, 48))
    assert amap.shape == (2, 48, 48) and amap[1].max() > amap[0].max()
    check_maps_folder(maps)  # a folder metaad-score made: its maps may be replaced
    write_heat_maps(det, ["a.jpg", "b.png"], query, maps, sigma=1.0)


def test_heat_maps_never_go_among_the_users_files(tmp_path) -> None:
    from metaad.apps.score import check_maps_folder
    from metaad.data.tasks import DataError

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "keep.jpg").write_bytes(b"not ours")
    with pytest.raises(DataError, match="holds files metaad-score did not write"):
        check_maps_folder(mine)
    with pytest.raises(DataError, match="is a file"):
        check_maps_folder(mine / "keep.jpg")
    assert (mine / "keep.jpg").read_bytes() == b"not ours"


def test_a_detector_without_maps_says_which_have_them() -> None:
    det = metaad.baseline("nn_euclidean").fit(np.random.default_rng(0).normal(size=(4, 5)))
    with pytest.raises(TypeError, match="patch_knn"):
        det.anomaly_maps(np.zeros((2, 5)))


def test_the_benchmark_judges_an_images_suite_against_its_named_baseline_and_lists_pixel_metrics() -> None:
    from metaad.apps.benchmark import pixel_table, table_rows
    from metaad.evaluation.results import Summary

    def summary(mean):
        return Summary(mean, 0.01, 10)

    pooled = {
        ("images", 4, "patch_adapter"): {
            "auroc": summary(0.80),
            "pixel_auroc": summary(0.9),
            "pro": summary(0.7),
        },
        ("images", 4, "baseline:patch_knn"): {"auroc": summary(0.75), "pixel_auroc": summary(0.88)},
        ("images", 4, "baseline:padim"): {"auroc": summary(0.85)},
    }
    best = {r["detector"]: r for r in table_rows(pooled, {})}["patch_adapter"]
    assert best["best_baseline"] == "padim" and best["verdict"] == "below"
    judged = {r["detector"]: r for r in table_rows(pooled, {}, against={"images": "patch_knn"})}[
        "patch_adapter"
    ]
    assert judged["best_baseline"] == "patch_knn" and judged["verdict"] == "beats"
    lines = pixel_table(pooled)
    assert "| images | 4 | patch_adapter | 0.900 ± 0.010 | 0.700 ± 0.010 | 10 |" in lines
    assert "| images | 4 | baseline:patch_knn | 0.880 ± 0.010 |  | 10 |" in lines
    assert pixel_table({("images", 4, "baseline:padim"): {"auroc": summary(0.85)}}) == []


@needs_piped
def test_tensorboard_gets_maps_of_anomalous_test_queries_beside_their_masks() -> None:
    from metaad.evaluation.pictures import episode_maps

    batch = piped_episodes(TRAIN[:1], k=4, n=3)
    figure = episode_maps(PatchKNN(), batch, n_examples=2)
    assert len(figure.axes) == 4  # two anomalous queries: map and mask each
    shown = figure.axes[1].images[0].get_array()
    assert np.array_equal(
        np.asarray(shown) > 0.5, batch.query_masks[0, 3].numpy()
    )  # the first anomaly's mask
    assert episode_maps(PatchKNN(), batch._replace(query_masks=None)) is None


def test_every_job_of_the_images_preset_composes_and_passes_the_start_up_checks(tmp_path) -> None:
    """preset=images as metaad-benchmark checks it before the first training: every suite, fold
    and learner config composes (the patch learner on the extractor's features, patch baselines)."""
    from omegaconf import OmegaConf

    from metaad.apps.benchmark import check_jobs, check_preset, jobs_of

    preset = OmegaConf.load(Path(__file__).parents[1] / "conf" / "preset" / "images.yaml")
    check_preset(preset, "images", None)
    jobs = jobs_of(preset, tmp_path, None)
    assert {job.suite_name for job in jobs} == {"mtd", "piped", "elpv"} and len(jobs) == 14
    configs = check_jobs(jobs, [])
    assert all(c["model"]["_target_"].endswith("PatchAdapter") for c in configs)
    assert all(c["backbone"]["_target_"].endswith("EfficientNetLite0") for c in configs)
    assert {s.verdict_against for s in preset.suites.values()} == {"patch_knn"}
