"""A source read once into arrays on disk, read back row by row, so that tables larger than memory train.

A store is a folder ``<cache>/<file or folder name>-<key>/`` holding

- ``x.npy``: float32 samples ``(N, *sample_shape)``, row-major, read a row at a time (:class:`RowFile`);
- ``task.npy``: int32 task codes into the names of ``tasks.json``;
- ``anomalous.npy``: bool labels (only for tasks that carry their own anomalies);
- ``x.crc32.npy``: the CRC-32 of each row of ``x.npy``, written while building and checked each
  time a row is read, so a damaged or edited ``x.npy`` is an error naming the row, never data,
  at the cost of a checksum a row read (no whole-file read when a store is reused);
- ``manifest.json``: what it was built from (the source, its files' paths, sizes, inodes and
  modification and change times, the source settings, the format version) and the CRC-32 of each
  small file, written last: a folder without it is unfinished.

``key`` hashes the manifest's identity, so a changed source file or other settings give another
store; a store of the same source and settings whose files have since changed is deleted when its
successor is built. Building streams: the writer appends each chunk to ``x.npy`` with plain
writes (a writable memory map would keep every written page resident), the finished folder
appears by one rename, and only the task codes and labels (a few bytes a row) stay in memory.
A build killed before its rename leaves ``<store>.partial-<host>-<pid>``; the next look into the
cache removes those of this host whose process is gone.

A source file's change time (``st_ctime_ns``) is part of the identity: ``cp -p``, ``rsync -t`` and
tar restore a file's size and modification time but cannot set its change time, so an edit that
keeps them still gives another store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metaad.data.errors import DataError
from metaad.files import process_alive

log = logging.getLogger(__name__)

VERSION = 2
_HEADER = 256  # bytes of the .npy header (format 1.0), fixed so the placeholder and the final one match


@dataclass(frozen=True)
class Arrays:
    """What a sink returns: samples, task codes into ``names`` (first-appearance order), labels."""

    x: np.ndarray | RowFile
    codes: np.ndarray
    names: tuple[str, ...]
    anomalous: np.ndarray | None


def identity(kind: str, source: Path, files: list[Path], settings: dict[str, Any]) -> dict[str, Any]:
    """What a store is built from: the source (a table, a folder), its files (path, size, inode,
    modification and change times) and the settings that shape it."""
    stats = []
    for path in files:
        stat = path.stat()
        stats.append(
            {
                "path": str(path.resolve()),
                "size": stat.st_size,
                "inode": stat.st_ino,
                "mtime_ns": stat.st_mtime_ns,
                "ctime_ns": stat.st_ctime_ns,
            }
        )
    source = str(source.resolve())
    return {"version": VERSION, "kind": kind, "source": source, "files": stats, "settings": settings}


def _key(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _same_source(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same source and settings, whatever its files now and whatever format version b was written in
    (b is an outdated version of a)."""
    return all(a.get(k) == b.get(k) for k in ("kind", "source", "settings"))


_SMALL_FILES = ("task.npy", "anomalous.npy", "tasks.json")
_WRITTEN = {"x.npy", "x.crc32.npy", "manifest.json", *_SMALL_FILES}  # every file a build writes


def _crc(data: bytes | np.ndarray) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _partial_name(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}")


def remove_dead_partials(cache: Path) -> None:
    """Delete the ``*.partial-<host>-<pid>`` folders of builds on this host whose process is gone.

    A live builder's (another DDP rank, another run) is kept, and so is one of another host (a shared
    cache: its process cannot be seen from here). ``*.partial-<pid>`` is a partial of format 1.
    """
    host = socket.gethostname()
    try:
        partials = [p for p in cache.iterdir() if ".partial-" in p.name and p.is_dir()]
    except OSError:
        return
    for partial in partials:
        owner = partial.name.rsplit(".partial-", 1)[1]
        where, _, pid = owner.rpartition("-")
        if not pid.isdigit() or where not in ("", host) or int(pid) == os.getpid() or process_alive(int(pid)):
            continue
        try:
            if not {f.name for f in partial.iterdir()} <= _WRITTEN:
                continue  # holds something a build does not write: not ours to delete
        except OSError:
            continue
        log.info("removing %s: left by a build (process %s) that did not finish", partial, pid)
        shutil.rmtree(partial, ignore_errors=True)


class ArraySink:
    """Collects chunks in memory (no cache folder given).

    With ``capacity`` (the row count, where the file's metadata tells it) the chunks go straight
    into one array of that size; otherwise they are kept and joined at the end (twice the memory).
    """

    def __init__(
        self, sample_shape: tuple[int, ...], own_anomalies: bool, capacity: int | None = None
    ) -> None:
        self.sample_shape, self.own_anomalies = tuple(sample_shape), own_anomalies
        self.xs: list[np.ndarray] = []
        self.buffer = None if capacity is None else np.empty((capacity, *self.sample_shape), np.float32)
        self.codes: list[np.ndarray] = []
        self.anomalous: list[np.ndarray] = []
        self.rows = 0

    def append(self, x: np.ndarray, codes: np.ndarray, anomalous: np.ndarray | None = None) -> None:
        if self.buffer is not None and self.rows + len(x) <= len(self.buffer):
            self.buffer[self.rows : self.rows + len(x)] = x
        else:
            if self.buffer is not None:  # more rows than the metadata said: keep what is there as a chunk
                self.xs, self.buffer = [self.buffer[: self.rows]], None
            self.xs.append(np.ascontiguousarray(x, np.float32))
        self._labels(codes, anomalous)

    def _labels(self, codes: np.ndarray, anomalous: np.ndarray | None) -> None:
        self.codes.append(np.asarray(codes, np.int32))
        if self.own_anomalies:
            self.anomalous.append(np.asarray(anomalous, bool))
        self.rows += len(codes)

    def _label_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        codes = np.concatenate(self.codes) if self.codes else np.zeros(0, np.int32)
        anomalous = np.concatenate(self.anomalous) if self.own_anomalies and self.anomalous else None
        return codes, anomalous

    def finish(self, names: list[str]) -> Arrays:
        codes, anomalous = self._label_arrays()
        if self.buffer is not None:
            x = self.buffer[: self.rows]  # fewer rows than allotted (drop_missing): a view
        else:
            x = np.concatenate(self.xs) if self.xs else np.zeros((0, *self.sample_shape), np.float32)
        self.xs.clear()
        self.buffer = None
        return Arrays(x, codes, tuple(names), anomalous)

    def abort(self) -> None:
        self.xs.clear()
        self.buffer = None


class StoreWriter(ArraySink):
    """Streams chunks into a store folder; :meth:`finish` makes it appear and opens it read-only."""

    def __init__(
        self, folder: Path, ident: dict[str, Any], sample_shape: tuple[int, ...], own_anomalies: bool
    ) -> None:
        super().__init__(sample_shape, own_anomalies)
        self.folder, self.ident = folder, ident
        self.partial = _partial_name(folder)
        self.crcs: list[np.ndarray] = []
        try:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            self.file = open(self.partial / "x.npy", "wb")
            self.file.write(_npy_header(np.float32, (0, *self.sample_shape)))
        except OSError as error:
            raise DataError(f"dataset.source.cache: cannot write in {folder.parent} ({error})") from None

    def append(self, x: np.ndarray, codes: np.ndarray, anomalous: np.ndarray | None = None) -> None:
        x = np.ascontiguousarray(x, np.float32)
        rows = x.reshape(len(x), -1)
        self.crcs.append(np.fromiter((_crc(row) for row in rows), np.uint32, len(rows)))
        try:
            self.file.write(x.reshape(-1).view(np.uint8))
        except OSError as error:
            self.abort()
            raise DataError(f"dataset.source.cache: writing {self.partial} failed ({error})") from error
        self._labels(codes, anomalous)

    def finish(self, names: list[str]) -> Arrays:
        codes, anomalous = self._label_arrays()
        try:
            self.file.seek(0)
            self.file.write(_npy_header(np.float32, (self.rows, *self.sample_shape)))
            self.file.close()
            np.save(self.partial / "task.npy", codes)
            if anomalous is not None:
                np.save(self.partial / "anomalous.npy", anomalous)
            (self.partial / "tasks.json").write_text(json.dumps(list(names)))
            crcs = np.concatenate(self.crcs) if self.crcs else np.zeros(0, np.uint32)
            with open(self.partial / "x.crc32.npy", "wb") as file:
                file.write(_npy_header(np.uint32, crcs.shape))
                file.write(crcs.astype("<u4").tobytes())
            self.crcs.clear()
            sums = {
                name: _crc((self.partial / name).read_bytes())
                for name in _SMALL_FILES
                if (self.partial / name).exists()
            }
            record = dict(self.ident, rows=self.rows, sample_shape=list(self.sample_shape), checksums=sums)
            (self.partial / "manifest.json").write_text(json.dumps(record, indent=1))
            try:
                os.replace(self.partial, self.folder)
            except OSError:
                if not self.folder.is_dir():
                    raise
                shutil.rmtree(self.partial)  # another process (a DDP rank) built it meanwhile: use that
        except OSError as error:
            self.abort()
            raise DataError(f"dataset.source.cache: writing {self.partial} failed ({error})") from error
        opened = open_store(self.folder, self.ident)
        if opened is None:
            raise DataError(f"dataset.source.cache: the store written in {self.folder} does not read back")
        return opened

    def abort(self) -> None:
        self.file.close()
        self.crcs.clear()
        shutil.rmtree(self.partial, ignore_errors=True)


def _npy_header(dtype: Any, shape: tuple[int, ...]) -> bytes:
    """A .npy 1.0 header of exactly ``_HEADER`` bytes (numpy reads padded headers; the spec allows it)."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = repr({"descr": descr, "fortran_order": False, "shape": shape})
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER - 10) + text.ljust(_HEADER - 11).encode() + b"\n"


def store_folder(cache: str | Path, stem: str, ident: dict[str, Any]) -> Path:
    return Path(cache).expanduser() / f"{stem}-{_key(ident)}"


def find(cache: str | Path | None, name: str, ident: dict[str, Any]) -> Arrays | None:
    """The usable store of ``ident`` in ``cache`` (None: no cache, or none built yet / usable)."""
    if cache is None:
        return None
    if not isinstance(cache, str | Path):
        raise DataError(f"dataset.source.cache must be a folder or null, got {cache!r}")
    remove_dead_partials(Path(cache).expanduser())
    found = open_store(store_folder(cache, name, ident), ident)
    if found is not None:
        log.info("%s: read from its store in %s", name, cache)
    return found


def open_store(folder: Path, ident: dict[str, Any]) -> Arrays | None:
    """The store in ``folder`` if it is complete and built from ``ident``; None otherwise."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if {k: manifest.get(k) for k in ident} != ident:
        return None
    try:
        sums = manifest["checksums"]
        small = {}
        for name in _SMALL_FILES:
            if name in sums or (folder / name).exists():
                small[name] = (folder / name).read_bytes()
                if _crc(small[name]) != sums.get(name):
                    raise ValueError(f"{name} differs from what was written")
        x = RowFile(folder / "x.npy", checksums=folder / "x.crc32.npy", store=folder)
        codes = np.load(io.BytesIO(small["task.npy"]), allow_pickle=False)
        names = tuple(json.loads(small["tasks.json"]))
        labels = small.get("anomalous.npy")
        anomalous = np.load(io.BytesIO(labels), allow_pickle=False) if labels is not None else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("store %s is damaged (%s); building it again", folder, error)
        return None
    rows, shape = manifest.get("rows"), tuple(manifest.get("sample_shape", ()))
    whole = x.shape == (rows, *shape) and len(codes) == rows and (anomalous is None or len(anomalous) == rows)
    if not whole or (len(codes) and int(codes.max()) >= len(names)):
        log.warning("store %s does not match its manifest; building it again", folder)
        return None
    return Arrays(x, codes, names, anomalous)


class RowFile:
    """The rows of a row-major .npy file, read on demand with ``pread``: ``rows[index]`` -> ndarray.

    Episodes read scattered rows. A memory map of the file would do it too, but the kernel maps
    the cached pages around every touched one into the process (about 40 kB a row measured here,
    even advised for random access), so a long run's resident memory grows towards the file's
    size; reading each row into the episode's own array costs a system call a row and keeps the
    process's memory to what it uses. It pickles as its path (DataLoader workers, DDP ranks).

    ``checksums``: a .npy of the CRC-32 of each row (a store's ``x.crc32.npy``); each row read is
    checked against it, and one that differs is a :class:`DataError` naming the ``store`` and the row.
    """

    def __init__(
        self, path: str | Path, checksums: str | Path | None = None, store: str | Path | None = None
    ) -> None:
        self.path = Path(path)
        self.checksums = None if checksums is None else Path(checksums)
        self.store = Path(store) if store is not None else self.path.parent
        self.fd = None
        with open(self.path, "rb") as file:
            version = np.lib.format.read_magic(file)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read(file)
            self.offset = file.tell()
        if fortran_order or dtype.hasobject or not shape:
            raise ValueError(f"{self.path} is not a row-major numeric array")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if self.path.stat().st_size != self.offset + self.row_bytes * shape[0]:
            raise ValueError(f"{self.path} does not hold the {shape} array its header names")
        self.crcs = None
        if self.checksums is not None:
            # a read-only map: only the pages of the rows read come in (4 bytes a row, 1% of x.npy)
            self.crcs = np.load(self.checksums, mmap_mode="r", allow_pickle=False)
            if self.crcs.shape != tuple(shape[:1]) or self.crcs.dtype != np.dtype("<u4"):
                raise ValueError(f"{self.checksums} does not hold one checksum for each row of {self.path}")
        self.fd = os.open(self.path, os.O_RDONLY)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
            raise IndexError("a RowFile takes a slice or a 1-D array of row numbers")
        rows = np.where(rows < 0, rows + len(self), rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row numbers outside the {len(self)} rows of {self.path}")
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        flat = out.reshape(len(rows), -1)
        for i, row in enumerate(rows.tolist()):
            os.preadv(self.fd, [flat[i]], self.offset + row * self.row_bytes)
        if self.crcs is not None:
            self._check(rows, flat)
        return out

    def _check(self, rows: np.ndarray, flat: np.ndarray) -> None:
        """Each row read against the checksum written when it was built."""
        stored = self.crcs[rows].tolist()
        for i, row in enumerate(rows.tolist()):
            if _crc(flat[i]) != stored[i]:
                raise DataError(
                    f"the store {self.store} is damaged: row {row} of {self.path.name} differs from what "
                    f"was written when it was built (checksum in {self.checksums.name}); delete "
                    f"{self.store} and run again to build it afresh"
                )

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` in one read (a window of a series)."""
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        os.preadv(self.fd, [out.reshape(-1)], self.offset + start * self.row_bytes)
        if self.crcs is not None:
            self._check(np.arange(start, stop), out.reshape(stop - start, -1))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "checksums": self.checksums, "store": self.store}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None


def remove_stale(folder: Path, ident: dict[str, Any]) -> None:
    """Delete stores of the same source and settings built from an older version of its files."""
    for manifest in folder.parent.glob("*/manifest.json"):
        other = manifest.parent
        if other == folder or ".partial-" in other.name:
            continue
        try:
            record = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if _same_source(ident, record):
            log.info("removing the store %s: its source has changed since it was built", other)
            shutil.rmtree(other, ignore_errors=True)


def writer(
    cache: str | Path | None,
    stem: str,
    ident: dict[str, Any],
    sample_shape,
    own_anomalies: bool,
    capacity: int | None = None,
):
    """An :class:`ArraySink` (no cache) or a :class:`StoreWriter` for a new store in ``cache``."""
    if cache is None:
        return ArraySink(sample_shape, own_anomalies, capacity)
    folder = store_folder(cache, stem, ident)
    remove_dead_partials(folder.parent)
    shutil.rmtree(folder, ignore_errors=True)  # incomplete or damaged: open_store refused it
    remove_stale(folder, ident)
    return StoreWriter(folder, ident, sample_shape, own_anomalies)
