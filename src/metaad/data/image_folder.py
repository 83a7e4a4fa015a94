"""Photographs as tasks: folders of images in the MVTec AD layout or a plain one, and ELPV.

Each category is a task. Every image is decoded by the one decoder (:mod:`metaad.data.images`:
EXIF orientation, 8/16-bit, L/RGB/RGBA/CMYK ...), read as RGB, and resized to ``size`` x ``size``
by :meth:`Preprocessing.resize_plane` (Lanczos on 8-bit planes), so the checkpoint's
preprocessing (resize, then ``x / 255``) gives a new photo exactly the pixels a training image
had. Images are held as 8-bit pixels (a pool hands them out as float32 in [0, 1]). Defect masks
are resized with nearest-neighbour and thresholded at 128.

Layouts (a ``root`` is one category or a folder of categories, at any depth; a list of roots is
read as one; hidden files and folders are ignored, files that are not images at the top levels
too, an image file where none belongs is an error):

- MVTec AD: ``<category>/train/good/*`` (normal), ``<category>/test/good/*`` (normal) and
  ``<category>/test/<defect>/*`` (anomalous), masks ``<category>/ground_truth/<defect>/<stem>_mask.*``.
- plain: ``<category>/good/*`` (normal) and one or more ``<category>/<defect>/*`` (anomalous),
  masks as above in ``<category>/ground_truth/<defect>/``. The normal images are split at random
  (``split_seed``, the share ``test_share``) into ``train`` and ``test`` by the rule the shared
  images' README gives (names sorted, ``random.Random(seed).shuffle``, ``round((1 - share) * n)``
  train).

Rows of ``train/good`` are the partition ``train`` (where a held-out category's support comes
from), everything under ``test/`` the partition ``test`` (its queries). A defect folder either has
a mask for each of its images or no ``ground_truth`` folder at all; the data carry masks only when
every defect image has one (otherwise none, named in a warning).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaad.data.errors import DataError
from metaad.data.preprocessing import Preprocessing
from metaad.data.tasks import LabelledData

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
GOOD, MASKS = "good", "ground_truth"
UNCERTAIN = ("exclude", "anomalous", "normal")
_MAX_DEPTH = 4  # folders of folders of categories ...


@dataclass(frozen=True)
class _Image:
    path: Path
    category: str
    anomalous: bool
    partition: str
    mask: Path | None = None


def image_folder(
    root: str | Sequence[str],
    size: int = 224,
    test_share: float = 0.2,
    split_seed: int = 0,
    duplicates: str = "drop",
) -> LabelledData:
    """Every category under ``root`` (one path or a list) as a task; see the module's docstring.

    ``duplicates``: a ``test/`` image whose decoded pixels equal a ``train/good`` image of its
    category would be a query its support may hold (PIPED has such copies): ``drop`` leaves it out
    of the data, ``keep`` keeps it; either way they are named in a warning."""
    size = _check_size(size)
    if duplicates not in ("drop", "keep"):
        raise DataError(f"dataset.source.duplicates must be 'drop' or 'keep', got {duplicates!r}")
    roots = [root] if isinstance(root, str | Path) else list(root or [])
    if not roots:
        raise DataError("dataset.source.root: give a folder (or a list of folders) of images")
    categories: dict[str, Path] = {}
    for entry in roots:
        path = Path(str(entry)).expanduser()
        if not path.is_dir():
            raise DataError(f"dataset.source.root: {path} is not a folder")
        for category in _categories(path, 0):
            name = category.name
            if name in categories:
                raise DataError(
                    f"{categories[name]} and {category}: two categories named {name!r}; rename one"
                )
            categories[name] = category
    images: list[_Image] = []
    for name in sorted(categories):
        images += _category_images(categories[name], name, test_share, split_seed)
    label = ", ".join(str(r) for r in roots)
    return _load(images, size, f"image_folder ({label})", drop_duplicates=duplicates == "drop")


def elpv(
    size: int = 224, uncertain: str = "exclude", test_share: float = 0.2, split_seed: int = 0
) -> LabelledData:
    """The ELPV solar cells (the ``elpv-dataset`` package): the module types ``mono`` and ``poly``
    as two tasks; defect probability 0 normal, 1 anomalous. The cells rated 1/3 and 2/3
    (``uncertain``): ``exclude`` (left out, counted in the log), ``anomalous`` or ``normal``.
    The normal cells of each type are split into ``train`` / ``test`` as a plain folder's are
    (in the package's order); no masks."""
    size = _check_size(size)
    if uncertain not in UNCERTAIN:
        raise DataError(f"dataset.source.uncertain must be one of {list(UNCERTAIN)}, got {uncertain!r}")
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError as error:
        raise DataError(
            "dataset=elpv reads the ELPV cells from the elpv-dataset package, which is not installed: "
            "pip install 'metaad[images]' (or pip install elpv-dataset)"
        ) from error
    pixels, probability, types = load_dataset()
    sure = np.isclose(probability, 0.0) | np.isclose(probability, 1.0)
    if uncertain == "exclude":
        log.info(
            "elpv: %d cells rated 1/3 or 2/3 left out (dataset.source.uncertain=exclude); %d kept",
            int((~sure).sum()),
            int(sure.sum()),
        )
        keep = np.flatnonzero(sure)
    else:
        keep = np.arange(len(probability))
    rated = probability[keep]
    anomalous = ~np.isclose(rated, 0.0) if uncertain == "anomalous" else np.isclose(rated, 1.0)
    task = np.asarray(types)[keep].astype(str)
    partition = np.full(len(keep), "test", dtype=object)
    for t in np.unique(task):
        normal = np.flatnonzero((task == t) & ~anomalous)
        train, _ = _split_normals(len(normal), test_share, split_seed)
        partition[normal[train]] = "train"
    preprocessing = _preprocessing(size)
    x = np.empty((len(keep), 3, size, size), np.uint8)
    for i, row in enumerate(keep):
        x[i] = preprocessing.resize_plane(np.ascontiguousarray(pixels[row]))[None]
    return LabelledData(
        x=x,
        task=task,
        anomalous=anomalous,
        partition=partition.astype(str),
        name=f"elpv (uncertain={uncertain})",
        preprocessing=preprocessing,
        finite_checked=True,
        support_partition="train",
    )


# --- layouts ------------------------------------------------------------------------------------


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 4096:
        raise DataError(f"dataset.source.size must be an integer in [8, 4096] (pixels), got {size!r}")
    return size


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _layout(folder: Path) -> str | None:
    names = {p.name for p in _visible(folder) if p.is_dir()}
    mvtec, plain = bool(names & {"train", "test"}), GOOD in names
    if mvtec and plain:
        raise DataError(
            f"{folder}: holds both train/ or test/ (the MVTec AD layout) and good/ (the plain layout); "
            "use one"
        )
    return "mvtec" if mvtec else "plain" if plain else None


def _categories(folder: Path, depth: int) -> list[Path]:
    """``folder`` if it is a category, else the categories below it (every subfolder must hold some)."""
    if _layout(folder):
        return [folder]
    entries = _visible(folder)
    strays = [p for p in entries if _is_image(p)]
    if strays:
        raise DataError(
            f"{strays[0]}: an image outside the layout ({len(strays)} in {folder}); images belong in "
            "<category>/train/good, <category>/test/<defect> (MVTec AD) or <category>/good, "
            "<category>/<defect> (plain)"
        )
    subfolders = [p for p in entries if p.is_dir()]
    if not subfolders or depth >= _MAX_DEPTH:
        raise DataError(
            f"{folder}: neither a category (train/good and test/<defect>, or good/ and <defect>/) nor a "
            "folder of categories"
        )
    return [c for sub in subfolders for c in _categories(sub, depth + 1)]


def _images_in(folder: Path) -> list[Path]:
    """The images of one leaf folder; anything else in it (a subfolder, a text file) is an error."""
    found = []
    for entry in _visible(folder):
        if not _is_image(entry):
            kind = "a folder" if entry.is_dir() else "not an image (by its extension)"
            raise DataError(
                f"{entry}: {kind} in an image folder; an image folder holds only images "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        found.append(entry)
    return found


def _category_images(folder: Path, name: str, test_share: float, seed: int) -> list[_Image]:
    """The images of one category with their labels, partitions and masks, every file accounted for."""
    layout = _layout(folder)
    subfolders = {p.name: p for p in _visible(folder) if p.is_dir()}
    strays = [p for p in _visible(folder) if p.is_file() and _is_image(p)]
    if strays:
        raise DataError(f"{strays[0]}: an image directly in the category folder {folder}")
    images: list[_Image] = []
    if layout == "mvtec":
        train = subfolders.get("train")
        good = train / GOOD if train is not None else None
        if good is None or not good.is_dir():
            raise DataError(f"{folder}: category {name!r} has no train/good folder of normal images")
        others = [p for p in _visible(train) if p.name != GOOD]
        if others:
            raise DataError(
                f"{others[0]}: train/ holds only good/ (normal images); defects go in test/<defect>"
            )
        extra = sorted(set(subfolders) - {"train", "test", MASKS})
        if extra:
            raise DataError(
                f"{folder / extra[0]}: not part of the MVTec AD layout (train, test, ground_truth)"
            )
        images += [_Image(p, name, False, "train") for p in _images_in(good)]
        test = subfolders.get("test")
        defects: dict[str, Path] = {}
        if test is not None:
            files = [p for p in _visible(test) if not p.is_dir()]
            if files:
                raise DataError(f"{files[0]}: test/ holds folders (good/ and one a defect), not files")
            defects = {p.name: p for p in _visible(test) if p.name != GOOD}
            if (test / GOOD).is_dir():
                images += [_Image(p, name, False, "test") for p in _images_in(test / GOOD)]
    else:
        normals = _images_in(subfolders[GOOD])
        train_rows, _ = _split_normals(len(normals), test_share, seed)
        in_train = set(train_rows.tolist())
        images += [
            _Image(p, name, False, "train" if i in in_train else "test") for i, p in enumerate(normals)
        ]
        defects = {k: v for k, v in subfolders.items() if k not in (GOOD, MASKS)}
    masks = subfolders.get(MASKS)
    mask_folders = {p.name: p for p in _visible(masks)} if masks is not None else {}
    unknown = sorted(set(mask_folders) - set(defects))
    if unknown:
        raise DataError(
            f"{mask_folders[unknown[0]]}: masks for a defect {unknown[0]!r} that has no folder of images"
        )
    for defect, path in sorted(defects.items()):
        files = _images_in(path)
        found = _masks_of(mask_folders[defect], files) if defect in mask_folders else {}
        images += [_Image(p, name, True, "test", found.get(p)) for p in files]
    if not images:
        raise DataError(f"{folder}: category {name!r} holds no images")
    if not any(i.partition == "train" and not i.anomalous for i in images):
        raise DataError(f"{folder}: category {name!r} has no normal training images (train/good is empty)")
    return images


def _masks_of(folder: Path, images: list[Path]) -> dict[Path, Path]:
    """Each image's mask ``<stem>_mask.<ext>`` in ``folder``: one for every image, none left over."""
    by_stem: dict[str, Path] = {}
    for mask in _images_in(folder):
        stem = mask.stem
        if not stem.endswith("_mask"):
            raise DataError(f"{mask}: a mask is named <image stem>_mask.png")
        if stem[: -len("_mask")] in by_stem:
            raise DataError(f"{mask} and {by_stem[stem[: -len('_mask')]]}: two masks for one image")
        by_stem[stem[: -len("_mask")]] = mask
    found = {}
    for image in images:
        mask = by_stem.pop(image.stem, None)
        if mask is None:
            raise DataError(
                f"{image}: no mask {folder / (image.stem + '_mask.png')} although {folder} holds the masks "
                "of this defect"
            )
        found[image] = mask
    if by_stem:
        stem, mask = next(iter(sorted(by_stem.items())))
        raise DataError(
            f"{mask}: a mask without an image {stem}.* in {images[0].parent if images else folder}"
        )
    return found


def _split_normals(n: int, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions of ``n`` sorted normal images: shuffled with ``random.Random(seed)``,
    the first ``round((1 - test_share) * n)`` for training (the shared images' README rule)."""
    if isinstance(test_share, bool) or not isinstance(test_share, int | float) or not 0 <= test_share < 1:
        raise DataError(f"dataset.source.test_share must be in [0, 1), got {test_share!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_train = round((1 - test_share) * n)
    return np.array(sorted(order[:n_train]), np.int64), np.array(sorted(order[n_train:]), np.int64)


# --- pixels -------------------------------------------------------------------------------------


def _copies_of_training_images(images: list[_Image], content: list[bytes]) -> list[tuple[int, int]]:
    """(test row, train row) pairs whose decoded pixels are equal, within one category."""
    training = {(i.category, content[r]): r for r, i in enumerate(images) if i.partition == "train"}
    return [
        (r, training[(i.category, content[r])])
        for r, i in enumerate(images)
        if i.partition == "test" and (i.category, content[r]) in training
    ]


def _preprocessing(size: int) -> Preprocessing:
    return Preprocessing((3, size, size), scale=1 / 255, image_size=size)


def _load(images: list[_Image], size: int, name: str, drop_duplicates: bool = True) -> LabelledData:
    """Decode, resize and label every image; masks when every defect image has one; test images
    that copy a training image of their category named (and left out with ``drop_duplicates``)."""
    import hashlib

    from PIL import Image

    from metaad.data.images import open_image

    preprocessing = _preprocessing(size)
    anomalous = np.array([i.anomalous for i in images], bool)
    with_mask = np.array([i.mask is not None for i in images], bool)
    keep_masks = bool(anomalous.any() and with_mask[anomalous].all())
    if anomalous.any() and with_mask.any() and not keep_masks:
        missing = sorted(
            {f"{i.category}/{i.path.parent.name}" for i in images if i.anomalous and i.mask is None}
        )
        log.warning(
            "%s: defects without masks (%s); pixel metrics need every defect image's mask, so none are used",
            name,
            ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""),
        )
    x = np.empty((len(images), 3, size, size), np.uint8)
    masks = np.zeros((len(images), size, size), bool) if keep_masks else None
    step = max(1, len(images) // 10)
    content = []
    for row, item in enumerate(images):
        picture = open_image(item.path, 3)
        content.append(hashlib.sha256(f"{picture.size}".encode() + picture.tobytes()).digest())
        for c, plane in enumerate(picture.split()):
            x[row, c] = preprocessing.resize_plane(plane)
        if masks is not None and item.mask is not None:
            mask = open_image(item.mask, 1)
            if mask.size != picture.size:
                raise DataError(
                    f"{item.mask}: a mask of {mask.size[0]}x{mask.size[1]} pixels for the image {item.path} "
                    f"of {picture.size[0]}x{picture.size[1]}; a mask has its image's size"
                )
            masks[row] = np.asarray(mask.resize((size, size), Image.Resampling.NEAREST)) >= 128
        if (row + 1) % step == 0 or row + 1 == len(images):
            log.info("%s: %d of %d images read", name, row + 1, len(images))
    copies = _copies_of_training_images(images, content)
    if copies:
        log.warning(
            "%s: %d test image(s) have the pixels of a train/good image of their category (%s), %s",
            name,
            len(copies),
            "; ".join(f"{images[c].path} = {images[t].path.name}" for c, t in copies[:4])
            + (" ..." if len(copies) > 4 else ""),
            "left out (dataset.source.duplicates=drop)" if drop_duplicates else "kept (duplicates=keep)",
        )
    keep = np.ones(len(images), bool)
    if drop_duplicates and copies:
        keep[[c for c, _ in copies]] = False
        images = [i for i, k in zip(images, keep, strict=True) if k]
        x, anomalous = x[keep], anomalous[keep]
        masks = None if masks is None else masks[keep]
    return LabelledData(
        x=x,
        task=np.array([i.category for i in images]),
        anomalous=anomalous,
        partition=np.array([i.partition for i in images]),
        name=name,
        preprocessing=preprocessing,
        finite_checked=True,
        masks=masks,
        support_partition="train",
    )
