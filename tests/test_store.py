"""The store on disk (dataset.source.cache) and chunked table reading: same data as in memory,
reused while the source is unchanged, rebuilt when it changes or is damaged, never half-written."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest

from metaad.data import DataError, EpisodeDataModule, sources, store
from metaad.data.sources import table, task_files

LABELLED = dict(task_column="machine", anomaly_column="faulty")


def frame(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data = pd.DataFrame(rng.normal(size=(n, 3)).astype(np.float32), columns=["f1", "f2", "f3"])
    data["machine"] = [f"m{i % 6}" for i in range(n)]
    data["faulty"] = (np.arange(n) // 6) % 4 == 3
    return data.astype({"faulty": int})


def same(a, b) -> None:
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    assert a.task_names == b.task_names
    np.testing.assert_array_equal(a.task_codes, b.task_codes)
    np.testing.assert_array_equal(a.anomalous, b.anomalous)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_cached_table_is_the_table_read_into_memory_but_memory_mapped(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    path = tmp_path / f"t{suffix}"
    getattr(frame(), "to_csv" if suffix == ".csv" else "to_parquet")(path, index=False)
    in_memory = table(str(path), **LABELLED)
    cached = table(str(path), **LABELLED, cache=str(tmp_path / "cache"))
    assert isinstance(cached.x, store.RowFile) and isinstance(in_memory.x, np.ndarray)
    same(in_memory, cached)
    (folder,) = (tmp_path / "cache").iterdir()
    assert folder.name.startswith(f"t{suffix}-")
    np.testing.assert_array_equal(np.load(folder / "x.npy"), in_memory.x)  # a plain .npy for users


def test_episodes_from_the_store_equal_those_from_memory(tmp_path):
    path = tmp_path / "t.csv"
    frame(120).to_csv(path, index=False)
    batches = []
    for cache in (None, str(tmp_path / "cache")):
        module = EpisodeDataModule(
            lambda cache=cache: table(str(path), **LABELLED, cache=cache),
            ["m4"],
            ["m5"],
            k_shot=3,
            n_query=4,
            meta_batch_size=2,
            train_episodes=4,
            val_episodes=2,
            test_episodes=3,
        )
        module.setup()
        assert isinstance(module.pools["train"].x, store.RowFile) == (cache is not None)
        batches.append([next(iter(module.train_dataloader())), next(iter(module.evaluation_loader("test")))])
    for a, b in zip(*batches):
        np.testing.assert_array_equal(a.support.numpy(), b.support.numpy())
        np.testing.assert_array_equal(a.query.numpy(), b.query.numpy())
        np.testing.assert_array_equal(a.label.numpy(), b.label.numpy())


def test_a_store_is_reused_while_the_file_is_unchanged_and_replaced_when_it_changes(tmp_path, caplog):
    path, cache = tmp_path / "t.csv", tmp_path / "cache"
    frame().to_csv(path, index=False)
    table(str(path), **LABELLED, cache=str(cache))
    (folder,) = cache.iterdir()
    written = (folder / "x.npy").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="metaad.data"):
        table(str(path), **LABELLED, cache=str(cache))
    assert "read from its store" in caplog.text and (folder / "x.npy").stat().st_mtime_ns == written

    table(str(path), **LABELLED, features=["f2"], cache=str(cache))  # other settings: another store
    assert len(list(cache.iterdir())) == 2

    frame(48, seed=1).to_csv(path, index=False)
    os.utime(path, ns=(written + 10**9, written + 10**9))  # a rewrite within the same clock tick
    changed = table(str(path), **LABELLED, cache=str(cache))
    same(changed, table(str(path), **LABELLED))
    assert len(changed.x) == 48
    assert not folder.exists() and len(list(cache.iterdir())) == 2  # the stale one is gone, f2's kept


def test_a_damaged_store_is_built_again(tmp_path, caplog):
    path, cache = tmp_path / "t.csv", tmp_path / "cache"
    frame().to_csv(path, index=False)
    table(str(path), **LABELLED, cache=str(cache))
    (folder,) = cache.iterdir()
    with open(folder / "x.npy", "r+b") as f:
        f.truncate(300)
    with caplog.at_level(logging.WARNING, logger="metaad.data"):
        again = table(str(path), **LABELLED, cache=str(cache))
    assert "building it again" in caplog.text
    same(again, table(str(path), **LABELLED))


def test_a_refused_table_leaves_no_store_behind(tmp_path):
    path, cache = tmp_path / "t.csv", tmp_path / "cache"
    frame().assign(f2=lambda f: np.where(np.arange(len(f)) == 40, np.nan, f.f2)).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"0-based: \[40\]"):
        table(str(path), **LABELLED, cache=str(cache))
    assert list(cache.iterdir()) == []


def test_a_cache_that_cannot_be_written_is_named(tmp_path):
    path = tmp_path / "t.csv"
    frame().to_csv(path, index=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="dataset.source.cache: cannot write in"):
        table(str(path), **LABELLED, cache=str(tmp_path / "file"))
    with pytest.raises(DataError, match="dataset.source.cache must be a folder or null"):
        table(str(path), **LABELLED, cache=5)


def test_a_store_built_meanwhile_by_another_process_is_the_one_used(tmp_path):
    """Two DDP ranks may build the same store at once: the second to finish keeps the first's."""
    ident = store.identity("table", tmp_path / "t.csv", [], {"n": 1})
    folder = store.store_folder(tmp_path, "t", ident)
    second = store.StoreWriter(folder, ident, (2,), False)
    second.partial = second.partial.rename(folder.with_name(folder.name + ".partial-other"))  # another pid's
    first = store.StoreWriter(folder, ident, (2,), False)
    first.append(np.ones((3, 2)), np.zeros(3))
    second.append(np.zeros((3, 2)), np.zeros(3))
    first.finish(["a"])
    arrays = second.finish(["a"])
    np.testing.assert_array_equal(arrays.x, np.ones((3, 2)))
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


@pytest.mark.parametrize("chunk", [7, 50_000])
def test_chunked_reading_gives_the_whole_file_and_names_rows_across_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_TABLE_CHUNK", chunk)
    data = frame()
    data.loc[[3, 15, 16], "f1"] = np.nan
    data.to_csv(tmp_path / "t.csv", index=False)
    read = table(str(tmp_path / "t.csv"), **LABELLED, drop_missing=True)
    kept = data.drop(index=[3, 15, 16])
    np.testing.assert_array_equal(read.x, kept[["f1", "f2", "f3"]].to_numpy(np.float32))
    assert list(read.tasks_of(np.arange(len(kept)))) == list(kept.machine)
    np.testing.assert_array_equal(read.anomalous, kept.faulty.to_numpy() == 1)
    with pytest.raises(DataError, match=r"3 row\(s\) have a missing.*0-based: \[3, 15, 16\]"):
        table(str(tmp_path / "t.csv"), **LABELLED)
    data.loc[[3, 15, 16], "f1"] = 0.0
    data.loc[12, "faulty"] = 2
    data.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="row 12 holds"):
        table(str(tmp_path / "t.csv"), **LABELLED)


def test_task_names_are_read_as_written(tmp_path):
    """Chunks must agree on task names: read as text, 007 stays 007 (a number column would make it 7)."""
    data = frame().assign(machine=[f"{i % 3:03d}" for i in range(60)])
    data.to_csv(tmp_path / "t.csv", index=False)
    assert table(str(tmp_path / "t.csv"), **LABELLED).task_names == ["000", "001", "002"]


def test_cached_task_files_equal_the_files_read_into_memory(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "files").mkdir()
    for name in ("a", "b", "c"):
        np.savez(tmp_path / "files" / f"{name}.npz", X=rng.normal(size=(20, 4)), y=np.arange(20) % 5 == 0)
    in_memory = task_files(str(tmp_path / "files"))
    cached = task_files(str(tmp_path / "files"), cache=str(tmp_path / "cache"))
    assert isinstance(cached.x, store.RowFile) and cached.task_names == ["a", "b", "c"]
    same(in_memory, cached)
    np.savez(tmp_path / "files" / "d.npz", X=rng.normal(size=(20, 4)), y=np.arange(20) % 5 == 0)
    assert task_files(str(tmp_path / "files"), cache=str(tmp_path / "cache")).task_names[-1] == "d"
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the store of the three files is gone


def test_a_row_file_reads_the_rows_asked_for_and_pickles_as_its_path(tmp_path):
    import pickle

    x = np.random.default_rng(0).normal(size=(50, 2, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rows = store.RowFile(tmp_path / "x.npy")
    assert rows.shape == (50, 2, 3) and len(rows) == 50 and rows.ndim == 3
    pick = np.array([7, 0, 49, 7, -1])
    np.testing.assert_array_equal(rows[pick], x[pick])
    np.testing.assert_array_equal(rows[10:13], x[10:13])
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(rows))), x)
    with pytest.raises(IndexError, match="outside the 50 rows"):
        rows[np.array([50])]
    with open(tmp_path / "x.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="does not hold"):
        store.RowFile(tmp_path / "x.npy")


@pytest.mark.parametrize("capacity", [None, 4, 10, 12])
def test_an_array_sink_gives_the_rows_appended_whatever_its_capacity(capacity):
    """capacity is the metadata's row count: rows dropped on the way (4 < 10) or more than it said."""
    sink = store.ArraySink((2,), own_anomalies=True, capacity=capacity)
    chunks = [np.arange(8.0).reshape(4, 2), np.arange(8.0, 20.0).reshape(6, 2)]
    for i, chunk in enumerate(chunks):
        sink.append(chunk, np.full(len(chunk), i), np.arange(len(chunk)) % 2 == 0)
    arrays = sink.finish(["a", "b"])
    np.testing.assert_array_equal(arrays.x, np.arange(20.0).reshape(10, 2))
    np.testing.assert_array_equal(arrays.codes, [0] * 4 + [1] * 6)
    assert arrays.x.dtype == np.float32 and arrays.anomalous.sum() == 5


def test_labelled_data_with_names_takes_integer_codes_into_them():
    from metaad.data import LabelledData

    x = np.zeros((3, 2), np.float32)
    data = LabelledData(x=x, task=np.array([1, 0, 1]), names=("b", "a"))
    assert data.task_names == ["a", "b"] and list(data.tasks_of(np.arange(3))) == ["a", "b", "a"]
    with pytest.raises(DataError, match="task codes outside the 2 task names"):
        LabelledData(x=x, task=np.array([0, 2, 1]), names=("b", "a"))
    with pytest.raises(DataError, match="integer codes"):
        LabelledData(x=x, task=np.array(["a", "b", "a"]), names=("b", "a"))
