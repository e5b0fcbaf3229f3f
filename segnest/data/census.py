"""The label census: how many pixels of a split hold each raw mask value and each train id,
taken before training so that labels which cannot be right stop the run before any work.

Masks are read through the dataset's own reading path (``SegmentationDataset.read_mask``),
so raw ids become train ids exactly as training will see them (ADE20K's 0 -> ignore,
Cityscapes' label ids, a folder's ``label_map`` or colours). Decoding runs in a small
thread pool (Pillow releases the GIL while it inflates a PNG). The result is cached as JSON
in ``$SEGNEST_CACHE/census`` (default ``~/.cache/segnest/census``) under a key
(:func:`census_key`) made of the census format, the split, the label mapping (``label_map``,
colours) and every mask's absolute path and a hash of its bytes: any change to a mask's
content counts again, even one that keeps its size and modification time (``cp -p``,
``rsync -a``, ``touch -r``), while a second run over unchanged masks reads their bytes
once (hashing is many times faster than decoding) and decodes none. A cache folder that
cannot be written (read-only home, a file in its place) costs a warning and a recount on
the next run, never the run itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segnest.data.bad_samples import stop_message
from segnest.data.base import SegmentationDataset
from segnest.data.folder import FolderDataset, colour_codes
from segnest.data.transforms import IGNORE_INDEX
from segnest.errors import SegnestError
from segnest.runtime.console import progress_bar
from segnest.runtime.files import default_cache_dir, write_text_atomic

# Part of the cache key: a change to what a census holds makes old cache files unused.
CENSUS_VERSION = 2  # 2: masks keyed on their content hash (1: on size and mtime)
HASH_BLOCK_BYTES = 1 << 20
MAX_THREADS = 8
# Below this many masks a progress bar would only flicker.
PROGRESS_MIN_MASKS = 200
SHOWN = 5


@dataclass
class LabelCensus:
    """Pixel counts of one split's masks; dictionary keys are mask values."""

    split: str
    num_masks: int
    raw_counts: dict[int, int] = field(default_factory=dict)       # single-channel masks
    train_id_counts: dict[int, int] = field(default_factory=dict)  # after mapping, 255 = ignore
    examples: dict[int, str] = field(default_factory=dict)         # train id -> a mask holding it
    all_ignore: list[str] = field(default_factory=list)            # masks without a class pixel
    unknown_colours: dict[int, int] = field(default_factory=dict)  # 0xRRGGBB -> pixels
    unreadable: dict[str, str] = field(default_factory=dict)       # mask -> error message
    cached: bool = False
    seconds: float = 0.0

    def to_json(self) -> str:
        data = asdict(self)
        for name in ("cached", "seconds"):
            data.pop(name)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> LabelCensus:
        data = json.loads(text)
        for name in ("raw_counts", "train_id_counts", "examples", "unknown_colours"):
            data[name] = {int(key): value for key, value in data[name].items()}
        return cls(**data)


def census_cache_dir() -> Path:
    """``$SEGNEST_CACHE/census`` or ``~/.cache/segnest/census``."""
    return default_cache_dir() / "census"


def census_key(dataset: SegmentationDataset) -> str:
    """A hash of everything the census of ``dataset`` depends on: :data:`CENSUS_VERSION`,
    the label mapping, the split, and each mask's absolute path and content hash."""
    mask_paths = [mask_path for _, mask_path in dataset.samples if mask_path is not None]
    threads = max(1, min(MAX_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(_content_hash, mask_paths))
    files = sorted(zip((os.path.abspath(path) for path in mask_paths), digests, strict=True))
    identity = [CENSUS_VERSION, dataset.label_mapping_id(), dataset.split, files]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def _content_hash(path: str | os.PathLike) -> str:
    """BLAKE2b of the file's bytes (hashlib releases the GIL, so threads overlap); a file
    that cannot be read keys on its error, and counting then names it."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
                digest.update(block)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    return digest.hexdigest()


def take_census(dataset: SegmentationDataset, progress: bool = False,
                cache_dir: Path | None = None) -> LabelCensus:
    """The census of ``dataset``'s masks, from the cache when nothing changed."""
    start = time.perf_counter()
    cache_file = (cache_dir or census_cache_dir()) / f"{census_key(dataset)}.json"
    try:
        census = LabelCensus.from_json(cache_file.read_text(encoding="utf-8"))
        census.cached = True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # Missing, corrupt or from another version: count again and replace it.
        census = count_labels(dataset, progress)
        try:
            write_text_atomic(cache_file, census.to_json())
        except (OSError, SegnestError) as err:
            # A read-only or obstructed cache only costs the next run the same count.
            cause = err.__cause__ if isinstance(err.__cause__, OSError) else err
            reason = getattr(cause, "strerror", None) or str(cause)
            print(f"warning: labels: cannot cache the census in {cache_file.parent} "
                  f"({reason}), so the next run counts the masks again; set SEGNEST_CACHE "
                  "to a writable folder to keep it", file=sys.stderr)
    census.seconds = time.perf_counter() - start
    return census


def count_labels(dataset: SegmentationDataset, progress: bool = False) -> LabelCensus:
    """Read every mask of ``dataset`` once and count its values (no cache)."""
    mask_paths = [mask for _, mask in dataset.samples if mask is not None]
    census = LabelCensus(split=dataset.split, num_masks=len(mask_paths))
    raw_counts: Counter = Counter()
    train_id_counts: Counter = Counter()
    unknown_colours: Counter = Counter()
    threads = max(1, min(MAX_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool, progress_bar(
            total=len(mask_paths), desc=f"labels: counting {dataset.split} masks",
            unit="mask", leave=False,
            enabled=progress and len(mask_paths) >= PROGRESS_MIN_MASKS) as bar:
        for mask_path, counts in zip(
                mask_paths, pool.map(lambda path: _count_mask(dataset, path), mask_paths),
                strict=True):
            bar.update()
            name = str(mask_path)
            if "error" in counts:
                census.unreadable[name] = counts["error"]
                continue
            raw_counts.update(counts["raw"])
            train_id_counts.update(counts["train_ids"])
            unknown_colours.update(counts["unknown_colours"])
            for train_id in counts["train_ids"]:
                census.examples.setdefault(train_id, name)
            if set(counts["train_ids"]) <= {IGNORE_INDEX}:
                census.all_ignore.append(name)
    census.raw_counts = dict(sorted(raw_counts.items()))
    census.train_id_counts = dict(sorted(train_id_counts.items()))
    census.unknown_colours = dict(unknown_colours.most_common())
    return census


def _count_mask(dataset: SegmentationDataset, mask_path: Path) -> dict[str, Any]:
    try:
        raw, train_ids = dataset.read_mask(mask_path)
    except SegnestError as err:
        return {"error": str(err)}
    counts: dict[str, Any] = {"raw": {}, "train_ids": value_counts(train_ids),
                              "unknown_colours": {}}
    if raw.ndim == 2:
        counts["raw"] = value_counts(raw)
    else:
        # A colour mask: its ignore pixels are exactly the colours no class has.
        unknown = train_ids == IGNORE_INDEX
        if unknown.any():
            counts["unknown_colours"] = value_counts(colour_codes(raw[unknown]))
    return counts


def value_counts(values: np.ndarray) -> dict[int, int]:
    """{value: how often it occurs}; bincount when the values are small, else unique."""
    flat = np.asarray(values).ravel()
    if flat.size == 0:
        return {}
    if flat.min() >= 0 and flat.max() <= 65535:
        counts = np.bincount(flat)
        present = np.flatnonzero(counts)
        return dict(zip(present.tolist(), counts[present].tolist(), strict=True))
    present, counts = np.unique(flat, return_counts=True)
    return dict(zip(present.tolist(), counts.tolist(), strict=True))


def _listed(items: list[str], shown: int = SHOWN) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown
                                       else "")


def unknown_colours_warning(census: LabelCensus) -> str:
    """How many pixels of colour masks have a colour no class has (they become ignore)."""
    pixels = sum(census.unknown_colours.values())
    top = [f"({code >> 16}, {(code >> 8) & 255}, {code & 255}) x{count}"
           for code, count in list(census.unknown_colours.items())[:SHOWN]]
    return (f"{pixels} pixels of colours not in classes.txt are ignored in the "
            f"{census.split} masks; most common: {', '.join(top)}")


def judge_labels(census: LabelCensus, dataset: SegmentationDataset,
                 skip_bad_samples: bool = False) -> tuple[list[str], str]:
    """Raise a SegnestError for labels training cannot use; return the warnings and the
    one-line summary for labels it can."""
    classes, num_classes, split = dataset.classes, dataset.num_classes, census.split
    is_folder = isinstance(dataset, FolderDataset)
    warnings: list[str] = []
    if census.unreadable:
        first = next(iter(census.unreadable.values()))
        if not skip_bad_samples:
            raise SegnestError(stop_message(first))
        warnings.append(f"{len(census.unreadable)} {split} mask(s) cannot be read and will "
                        f"be skipped: {_listed(list(census.unreadable))}")
    counts = census.train_id_counts
    if (num_classes == 2 and set(census.raw_counts) == {0, IGNORE_INDEX}
            and set(counts) == {0, IGNORE_INDEX}):
        where = f" ({dataset.classes_path})" if is_folder else ""
        raise SegnestError(
            f"the {split} masks hold only the values 0 and 255 and the class list{where} has "
            f"2 classes, but 255 means ignore in segnest, so '{classes[1]}' would never be "
            f"trained; map 255 to class 1 with --label-map 255:1 (label_map: '255:1' in a "
            "recipe), or rewrite the masks as 0/1")
    outside = sorted(value for value in counts
                     if value != IGNORE_INDEX and not 0 <= value < num_classes)
    if outside:
        shown = ", ".join(str(value) for value in outside[:10]) + (
            " ..." if len(outside) > 10 else "")
        fix = ("fix the masks, list the missing classes in classes.txt, or map the values "
               "with --label-map (e.g. --label-map 7:255 to ignore 7)" if is_folder
               else "fix or replace those masks")
        raise SegnestError(
            f"the {split} masks hold values outside the {num_classes} classes after label "
            f"mapping: {shown} (e.g. {census.examples[outside[0]]} holds {outside[0]}); "
            f"valid train ids are 0..{num_classes - 1} and {IGNORE_INDEX} (ignore): {fix}")
    labelled = sum(count for value, count in counts.items() if value != IGNORE_INDEX)
    readable = census.num_masks - len(census.unreadable)
    if readable and not labelled:
        hint = (" or --label-map" if is_folder else "")
        raise SegnestError(
            f"every pixel of the {readable} {split} masks is ignore (255 after label "
            f"mapping), so there is nothing to learn; check the mask folder{hint} against "
            f"the class list (train ids 0..{num_classes - 1}, 255 = ignore)")
    missing = [classes[index] for index in range(num_classes) if not counts.get(index)]
    if missing:
        warnings.append(f"{len(missing)} of {num_classes} classes never occur in the {split} "
                        f"masks and cannot be learned: {_listed(missing, 10)}")
    if census.all_ignore:
        names = [Path(path).name for path in census.all_ignore]
        warnings.append(f"{len(names)} {split} mask(s) are entirely ignore (255) and teach "
                        f"nothing: {_listed(names)}")
    if census.unknown_colours:
        warnings.append(unknown_colours_warning(census))
    total = sum(counts.values())
    ignored = 100.0 * counts.get(IGNORE_INDEX, 0) / total if total else 0.0
    how = "census cached" if census.cached else f"census took {census.seconds:.1f} s"
    summary = (f"labels: {census.num_masks} {split} masks, {num_classes - len(missing)}/"
               f"{num_classes} classes present, {len(census.all_ignore)} all-ignore masks, "
               f"{ignored:.1f}% of pixels ignored ({how})")
    return warnings, summary


def check_train_labels(dataset: SegmentationDataset, skip_bad_samples: bool = False,
                       verbose: bool = True) -> LabelCensus:
    """The census of the training split, judged: raises for unusable labels, prints the
    warnings and the summary line when ``verbose``. Every rank of a distributed run may
    call it: it needs no communication, so one rank's error cannot leave another waiting."""
    census = take_census(dataset, progress=verbose)
    warnings, summary = judge_labels(census, dataset, skip_bad_samples)
    if verbose:
        for warning in warnings:
            print(f"warning: labels: {warning}", file=sys.stderr)
        print(summary)
    return census
