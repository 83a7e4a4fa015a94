"""Series sources: every layout (per-entity folders, telemanom, a long table in memory and through
the store) read from small series written to tmp_path; windows cut lazily; bad data named.

Each series' values encode (entity, step), so a window read back says where it was cut from.
Real-data checks (../shared/data/series) are skipped where that folder is absent.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metaad.data import DataError, EpisodeDataset, split_tasks
from metaad.data.series import SyntheticAnomalies, Windows, series_folders, series_table, telemanom
from metaad.data.tasks import AFTER, BEFORE, HISTORY, entity_folds

DATA = Path(os.environ.get("METAAD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SERIES = DATA / "series"
needs_series = pytest.mark.skipif(not SERIES.is_dir(), reason=f"real series data not found at {SERIES}")


def tagged_series(entity: int, steps: int, metrics: int = 3, offset: int = 0) -> np.ndarray:
    """Column 0 = entity, column 1 = step (``offset`` + position), the rest noise-free ramps."""
    out = np.zeros((steps, metrics))
    out[:, 0] = entity
    out[:, 1] = offset + np.arange(steps)
    for j in range(2, metrics):
        out[:, j] = np.sin(np.arange(steps) / (j + 1))
    return out


def write(path: Path, array: np.ndarray, header: list[str] | None = None) -> None:
    """``array`` as .npy / .txt (whitespace) / .csv (comma), gzip-compressed where the name ends .gz."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".npy"):
        import io

        buffer = io.BytesIO()
        np.save(buffer, array)
        raw = buffer.getvalue()
    else:
        sep = "," if name.endswith(".csv") else " "
        lines = [sep.join(header)] if header else []
        lines += [sep.join(f"{v:g}" for v in np.atleast_1d(row)) for row in array]
        raw = ("\n".join(lines) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)


def fleet(
    root: Path, n: int = 4, history: int = 120, test: int = 200, suffix: str = ".npy", metrics: int = 3
) -> dict[str, np.ndarray]:
    """``n`` entities in the per-entity folder layout; each test part has two incidents, one on each
    side of its middle. Returns the labels by entity."""
    labels = {}
    for e in range(n):
        name = f"m{e}"
        write(root / "train" / f"{name}{suffix}", tagged_series(e, history, metrics))
        write(root / "test" / f"{name}{suffix}", tagged_series(e, test, metrics, offset=history))
        y = np.zeros(test, np.int64)
        y[30 + e : 40 + e] = 1
        y[150:160] = 1
        label_suffix = suffix if not suffix.removesuffix(".gz").endswith(".npy") else ".txt"
        write(root / "test_label" / f"{name}{label_suffix}", y)
        labels[name] = y
    return labels


@pytest.mark.parametrize("suffix", [".npy", ".npy.gz", ".txt", ".csv.gz"])
def test_folder_layout_windows_are_cut_from_the_stored_series(tmp_path, suffix):
    labels = fleet(tmp_path, suffix=suffix)
    data = series_folders(str(tmp_path), window=16, stride=4, time_cut=0.5)
    assert isinstance(data.x, Windows) and data.x.shape[1:] == (16, 3)
    # memory: the raw series once (4 entities x 320 steps), never windows x length
    assert data.x.values.shape == (4 * 320, 3) and len(data.x) * 16 > len(data.x.values)
    rows = np.arange(len(data.x))
    windows = data.x[rows]
    entity = windows[:, 0, 0].astype(int)
    step = windows[:, :, 1].astype(int)
    assert (np.diff(step, axis=1) == 1).all()  # one contiguous piece of one series
    assert [data.task_names[c] for c in data.task_codes] == [f"m{e}" for e in entity]
    first = step[:, 0]
    assert (data.period[first < 120] == HISTORY).all() and (data.period[first >= 120] != HISTORY).all()
    # the cut at half of each test part: windows end before step 120 + 100 or start at it or later
    assert (step[data.period == BEFORE].max(axis=1) < 220).all()
    assert (step[data.period == AFTER].min(axis=1) >= 220).all()
    assert not ((step[:, 0] < 220) & (step[:, -1] >= 220)).any()  # none straddles the cut
    expected = [
        labels[f"m{e}"][s[0] - 120 : s[-1] - 119].any() if s[0] >= 120 else False
        for e, s in zip(entity, step, strict=True)
    ]
    np.testing.assert_array_equal(data.anomalous, expected)


def test_sub_groups_are_entities_named_by_group(tmp_path):
    fleet(tmp_path / "Dataset2", n=2, suffix=".csv")
    fleet(tmp_path / "Dataset3", n=3, suffix=".csv")
    assert series_folders(str(tmp_path), window=8).task_names == [
        "Dataset2/m0", "Dataset2/m1", "Dataset3/m0", "Dataset3/m1", "Dataset3/m2",
    ]  # fmt: skip
    assert series_folders(str(tmp_path), window=8, group="Dataset3").task_names == [
        "Dataset3/m0",
        "Dataset3/m1",
        "Dataset3/m2",
    ]


def test_features_by_index_and_by_header_name(tmp_path):
    for part, steps in (("train", 50), ("test", 60)):
        for e in range(3):
            frame = tagged_series(e, steps, 4)
            write(tmp_path / part / f"e{e}.csv", frame, header=["host", "step", "cpu", "mem"])
    for e in range(3):
        write(tmp_path / "test_label" / f"e{e}.csv", np.zeros(60, np.int64))
    by_name = series_folders(str(tmp_path), window=8, features=["mem", "step"])
    by_index = series_folders(str(tmp_path), window=8, features=[3, 1])
    assert by_name.x.shape[2] == 2
    np.testing.assert_array_equal(by_name.x[np.arange(5)], by_index.x[np.arange(5)])
    np.testing.assert_array_equal(by_name.x[np.arange(1)][0, :, 1], np.arange(8))
    with pytest.raises(DataError, match="names 'disk', not a column"):
        series_folders(str(tmp_path), window=8, features=["disk"])


def write_telemanom(root: Path, lengths=(300, 500), rows=None) -> None:
    for i, n in enumerate(lengths):
        write(root / "train" / f"C-{i}.npy.gz", tagged_series(i, 100))
        write(root / "test" / f"C-{i}.npy.gz", tagged_series(i, n, offset=100))
    rows = rows or [
        ("C-0", "SMAP", "[[10, 19]]", 300),
        ("C-1", "SMAP", "[[400, 409]]", 500),
        ("C-1", "SMAP", "[[20, 24]]", 500),  # listed twice: the union of its ranges
    ]
    lines = ["chan_id,spacecraft,anomaly_sequences,class,num_values"]
    lines += [f'{c},{s},"{r}",[point],{n}' for c, s, r, n in rows]
    (root / "labeled_anomalies.csv").write_text("\n".join(lines) + "\n")


def test_telemanom_ranges_are_inclusive_unions_cut_at_each_channels_middle(tmp_path):
    write_telemanom(tmp_path)
    write(tmp_path / "train" / "X-9.npy", tagged_series(9, 100))  # a channel without a CSV row
    data = telemanom(str(tmp_path), window=5, stride=1)
    assert data.task_names == ["C-0", "C-1"]
    steps = data.x[np.arange(len(data.x))][:, :, 1].astype(int) - 100
    chan = data.task_codes
    # C-0: steps 10..19 labelled (end inclusive); C-1: 20..24 and 400..409
    hits = {
        c: sorted(
            {int(s) for w, a in zip(steps[chan == c], data.anomalous[chan == c], strict=True) if a for s in w}
        )
        for c in (0, 1)
    }
    assert hits[0][0] == 6 and hits[0][-1] == 23  # windows of 5 touching 10..19
    assert min(s for s in hits[1] if s > 100) == 396 and max(hits[1]) == 413
    # the cut is relative: C-0 at step 150, C-1 at 250
    for c, middle in ((0, 150), (1, 250)):
        mine = (chan == c) & (data.period == AFTER)
        assert steps[mine].min() == middle
        assert steps[(chan == c) & (data.period == BEFORE)].max() < middle


def test_telemanom_bad_rows_are_named(tmp_path):
    write_telemanom(tmp_path, rows=[("C-0", "SMAP", "[[10, 19]]", 301), ("C-1", "SMAP", "[[1, 2]]", 500)])
    with pytest.raises(DataError, match=r"C-0.npy.gz \(entity C-0\): 300 steps, but .* num_values 301"):
        telemanom(str(tmp_path))
    write_telemanom(tmp_path, rows=[("C-0", "SMAP", "[[10, 300]]", 300), ("C-1", "SMAP", "[[1, 2]]", 500)])
    with pytest.raises(DataError, match=r"line 2 \(channel C-0\): range \[10, 300\] outside its 300 steps"):
        telemanom(str(tmp_path))


def long_table(n: int = 4, steps: int = 300, shuffle: bool = False, metrics: int = 3) -> pd.DataFrame:
    frames = []
    for e in range(n):
        values = tagged_series(e, steps, metrics)
        frame = pd.DataFrame(values, columns=[f"x{j}" for j in range(metrics)])
        frame.insert(0, "host", f"h{e}")
        frame.insert(1, "ts", 1000.0 + np.arange(steps) * 60 + e * 120)  # clocks offset by 2 steps
        y = np.zeros(steps, int)
        y[200 + e : 205 + e] = 1
        y[260:265] = 1
        frame["incident"] = y
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    return table.sample(frac=1.0, random_state=0) if shuffle else table


TABLE = dict(entity_column="host", time_column="ts", label_column="incident", window=10, stride=5)


def test_long_table_cuts_at_one_instant_of_its_time_column(tmp_path):
    path = tmp_path / "fleet.csv"
    long_table(shuffle=True).to_csv(path, index=False)
    data = series_table(str(path), **TABLE)
    assert data.task_names == ["h0", "h1", "h2", "h3"] and data.x.shape[1:] == (10, 3)
    t = 1000.0 + data.x[np.arange(len(data.x))][:, :, 1] * 60 + data.x[np.arange(len(data.x))][:, :, 0] * 120
    np.testing.assert_allclose(data.span, t[:, [0, -1]])  # spans are the time column's values
    first, last = 1000.0, 1000.0 + 299 * 60 + 3 * 120
    test_start = first + 0.5 * (last - first)
    cut = test_start + 0.5 * (last - test_start)  # one instant for every host
    assert (data.span[data.period == AFTER, 0] >= cut).all()
    assert (data.span[data.period != AFTER, 1] < cut).all()
    assert (data.span[data.period == HISTORY, 1] < test_start).all()


def test_long_table_store_gives_the_in_memory_windows_and_refuses_unsorted_rows(tmp_path):
    path = tmp_path / "fleet.parquet"
    long_table().to_parquet(path, index=False)
    memory = series_table(str(path), **TABLE)
    cached = series_table(str(path), cache=str(tmp_path / "cache"), **TABLE)
    again = series_table(str(path), cache=str(tmp_path / "cache"), **TABLE)  # reused from the store
    for data in (cached, again):
        assert not isinstance(data.x.values, np.ndarray)  # read from disk a window at a time
        rows = np.arange(len(data.x))
        np.testing.assert_array_equal(data.x[rows], memory.x[rows])
        np.testing.assert_array_equal(data.period, memory.period)
        np.testing.assert_array_equal(data.anomalous, memory.anomalous)
    shuffled = tmp_path / "shuffled.csv"
    long_table(shuffle=True).to_csv(shuffled, index=False)
    with pytest.raises(DataError, match="grouped by entity with time ascending"):
        series_table(str(shuffled), cache=str(tmp_path / "cache"), **TABLE)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("width", r"m2.npy \(entity m2\): 4 columns, but .*m0.npy has 3"),
        (
            "label_value",
            r"test_label/m1.txt \(entity m1\): labels must be 0 \(normal\) or 1 \(anomalous\); row 7 holds 2",
        ),
        ("label_length", r"test_label/m1.txt \(entity m1\): 199 labels but the test series has 200 steps"),
        ("nan", r"test/m3.npy \(entity m3\): 1 step\(s\) hold NaN.*first rows, 0-based: \[42\]"),
    ],
)
def test_bad_series_are_named_by_file_entity_and_row(tmp_path, damage, message):
    fleet(tmp_path)
    if damage == "width":
        write(tmp_path / "test" / "m2.npy", tagged_series(2, 200, 4))
    elif damage == "label_value":
        y = np.zeros(200, np.int64)
        y[7] = 2
        write(tmp_path / "test_label" / "m1.txt", y)
    elif damage == "label_length":
        write(tmp_path / "test_label" / "m1.txt", np.zeros(199, np.int64))
    else:
        series = tagged_series(3, 200, offset=120)
        series[42, 2] = np.nan
        write(tmp_path / "test" / "m3.npy", series)
    with pytest.raises(DataError, match=message):
        series_folders(str(tmp_path), window=8)


def test_table_bad_rows_are_named(tmp_path):
    table = long_table()
    table.loc[5, "incident"] = 3
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(
        DataError, match=r"\(entity h0\): column 'incident' must be 0 or 1; data row 5 holds 3"
    ):
        series_table(str(tmp_path / "t.csv"), **TABLE)
    table = long_table()
    table.loc[310, "ts"] = table.loc[309, "ts"]
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"\(entity h1\): data row 310 has time .* not after the previous"):
        series_table(str(tmp_path / "t.csv"), **TABLE)


def test_too_little_history_for_k_windows_names_the_entity(tmp_path):
    fleet(tmp_path, history=40)
    data = series_folders(str(tmp_path), window=16, stride=8)
    pools = split_tasks(data, None, ["m1"], ["m2"])
    with pytest.raises(
        DataError,
        match=r"test entity 'm2' has 4 normal history windows but an episode needs 5 \(dataset.k_shot=5",
    ):
        EpisodeDataset(pools["test"], "test", k_shot=5, n_query=4, anomaly_ratio=0.5, n_episodes=2, seed=0)


def test_entity_folds_test_every_entity_once():
    names = [f"e{i}" for i in range(11)]
    tested = []
    for fold in range(4):
        val, test = entity_folds(names, 4, fold)
        assert not set(val) & set(test) and val and test
        tested += test
    assert sorted(tested) == sorted(names)
    with pytest.raises(DataError, match="dataset.fold must be in"):
        entity_folds(names, 4, 4)


# --- the real data (../shared/data/series) --------------------------------------------------------


@needs_series
@pytest.mark.parametrize(
    ("loader", "root", "entities", "metrics"),
    [
        (telemanom, "smap", 54, 25),
        (telemanom, "msl", 27, 55),
        (series_folders, "jumpstarter", 30, 19),
    ],
)
def test_real_series_load_with_their_documented_shapes(loader, root, entities, metrics):
    from metaad.data.tasks import check_time_leaks

    data = loader(str(SERIES / root))
    assert len(data.task_names) == entities and data.x.shape[2] == metrics
    assert data.anomalous[data.period == AFTER].any() and not data.anomalous[data.period == HISTORY].any()
    for fold in range(5):  # every fold supplies episodes at the largest K of the protocol
        val, test = entity_folds(data.task_names, 5, fold)
        pools = split_tasks(data, None, val, test, synthetic=SyntheticAnomalies())
        for split in ("val", "test"):
            EpisodeDataset(
                pools[split], split, k_shot=20, n_query=20, anomaly_ratio=0.5, n_episodes=5, seed=0
            )
    with pytest.raises(DataError, match="a leak through time"):  # entity folds alone leak here too
        check_time_leaks(data, split_tasks(data, None, val, test, time_cut=False))


@needs_series
def test_real_smap_telemetry_column_alone(tmp_path):
    data = telemanom(str(SERIES / "smap"), features=[0])
    assert data.x.shape[2] == 1
    stats = {
        line.split("\t")[1]: line.split("\t") for line in (SERIES / "STATS.tsv").read_text().splitlines()[1:]
    }
    assert json.dumps(sorted(data.task_names)) == json.dumps(
        sorted(k for k, v in stats.items() if v[0] == "smap")
    )


@needs_series
@pytest.mark.slow
def test_real_smd_episodes_through_the_experiment_config(compose_cfg):
    from metaad.apps.build import build_datamodule

    datamodule = build_datamodule(compose_cfg(["experiment=smd", f"paths.data_dir={DATA}"]))
    assert len(datamodule.pools["test"].tasks) >= 3
    batch = next(iter(datamodule.evaluation_loader("test")))
    assert batch.support.shape[1:] == (5, 32, 38) and batch.query.shape[1:] == (20, 32, 38)


def test_a_fleet_as_a_long_table_gives_the_folder_layouts_windows(tmp_path):
    """The same fleet in two layouts: a split column and a step clock cut where the folders' relative
    clock cuts (test parts of one length), so windows, labels and periods agree."""
    labels = fleet(tmp_path / "folders", n=3)
    frames = []
    for e in range(3):
        history, test = tagged_series(e, 120), tagged_series(e, 200, offset=120)
        frame = pd.DataFrame(np.concatenate([history, test]), columns=["a", "b", "c"])
        frame.insert(0, "host", f"m{e}")
        frame.insert(1, "step", np.arange(320))
        frame["y"] = np.concatenate([np.zeros(120, int), labels[f"m{e}"]])
        frame["part"] = ["train"] * 120 + ["test"] * 200
        frames.append(frame)
    pd.concat(frames).to_csv(tmp_path / "fleet.csv", index=False)
    folders = series_folders(str(tmp_path / "folders"), window=8, stride=3)
    table = series_table(
        str(tmp_path / "fleet.csv"), "host", "step", label_column="y", split_column="part", window=8, stride=3
    )
    assert table.task_names == folders.task_names
    rows = np.arange(len(folders.x))
    np.testing.assert_array_equal(table.x[rows], folders.x[rows])
    np.testing.assert_array_equal(table.anomalous, folders.anomalous)
    np.testing.assert_array_equal(table.period, folders.period)
