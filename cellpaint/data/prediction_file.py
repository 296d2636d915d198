"""The prediction file: what `main.py --mode predict` writes and `make_submission.py` reads.

Format (SPEC): a pickle of `{'test': {id_code: [site1_logits, site2_logits, ...]}, 'val': {...}}`,
one float32 numpy vector of all classes per site. The 'val' part may be missing or empty. On the
official RxRx1-WILDS split a third part, 'id_test', holds the in-distribution test sites (site 2
of the train experiments, one per well); the submission reads 'val' and 'test' only.

An *embeddings file* (`main.py --mode predict --save-embeddings`, named `<ckpt>.embeddings<suffix>`)
has the same structure with per-site embedding vectors instead of logits, and may carry a third
part, 'train': the labelled treatment wells of the training subset, the kNN recipe's reference
set (`knn.py`). A file of logits may still hold only 'test' and 'val'.

Outputs the network was never trained on (the control classes under `--loss-classes treatment`,
the 41st place's recipe) hold MASKED_LOGIT at every site, so that no arg-max or softmax of the
file picks them; a finite value, so that sums, ensembles and the NaN/inf check still work.

A pickle can run arbitrary code when loaded, and prediction files get passed around, so they
are read with an unpickler that only rebuilds containers, numbers, strings and numpy arrays;
anything else is refused before it is called. The structure is checked on load, with errors
naming the file.
"""
from __future__ import annotations

import gc
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cellpaint.core.atomic import atomic_write
from cellpaint.data.wells import sum_site_lists
from cellpaint.core.errors import InputError

PARTS = ("test", "val")                          # a prediction file of logits
MASKED_LOGIT = -1e4  # an untrained class's logit: softmax exp(-1e4) is 0 in float32, sums of many stay finite
OPTIONAL_PARTS = ("id_test",)                    # ... and, on the official RxRx1-WILDS split, its ID test
EMBEDDING_PARTS = ("train", "val", "test")       # an embeddings file: the reference wells too
KINDS = ("logits", "embeddings")


class PredictionFileError(InputError, ValueError):
    """A prediction file that is missing, unreadable, unsafe or malformed; the message names it."""


# --------------------------------------------------------------------------- safe unpickling


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables array pickles reference, under every module spelling numpy has used.

    They are taken from the reductions numpy itself produces, so the table follows the installed
    numpy (`numpy.core` became `numpy._core` in numpy 2; old files still say `numpy.core`).
    """
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.float32(0).__reduce__()[0]
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{package}.multiarray", "scalar")] = scalar
        table[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return table


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import _codecs
    from collections import OrderedDict

    table = _numpy_globals()
    # protocol 2 spells bytes as _codecs.encode(latin-1 text): needed for old array pickles; the
    # codec registry only looks inside the `encodings` package, so it cannot reach other code
    table[("_codecs", "encode")] = _codecs.encode
    table[("collections", "OrderedDict")] = OrderedDict
    table[("builtins", "bytearray")] = bytearray
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """The C unpickler with `find_class` limited to a fixed table: nothing else is imported or called."""

    def __init__(self, file: io.BufferedIOBase, name: str):
        super().__init__(file)
        self._name = name
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise PredictionFileError(
                f"refusing to load {self._name}: it contains {module}.{name}, which could run code "
                "(a prediction file holds only dicts, lists, numbers, strings and numpy arrays)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise PredictionFileError(f"refusing to load {self._name}: it references an external object")


def _unpickle(path: Path) -> Any:
    if not path.is_file():
        raise PredictionFileError(f"prediction file {path} does not exist")
    gc_was_enabled = gc.isenabled()
    # tens of thousands of small containers: collection passes during the load only cost time
    gc.disable()
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, str(path)).load()
    except PredictionFileError:
        raise
    except OSError as e:
        raise PredictionFileError(f"cannot read prediction file {path}: {e.strerror or e}") from None
    except Exception as e:  # any other failure of a corrupt or foreign file
        raise PredictionFileError(f"{path} is not a readable prediction file "
                                  f"({type(e).__name__}: {e})") from None
    finally:
        if gc_was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- structure checks


def _check_top(obj: Any, name: str, parts: Sequence[str] = PARTS) -> dict:
    expected = ", ".join(map(repr, parts))
    if not isinstance(obj, dict):
        raise PredictionFileError(f"{name}: expected a dict with parts {expected}, found {type(obj).__name__}")
    unknown = [k for k in obj if k not in parts]
    if unknown:
        # the likely mix-up: an embeddings file given where logits are read
        hint = ("; a 'train' part belongs to an embeddings file (main.py --save-embeddings), which "
                "make_submission.py reads with --knn" if "train" in unknown and "train" not in parts else "")
        raise PredictionFileError(f"{name}: unexpected part(s) {', '.join(map(repr, unknown))} "
                                  f"(expected {expected}){hint}")
    for part, wells in obj.items():
        if not isinstance(wells, dict):
            raise PredictionFileError(f"{name}: part {part!r} must map id_code -> list of site logits, "
                                      f"found {type(wells).__name__}")
    seen: set = set()
    for part in obj:
        both = seen.intersection(obj[part])
        if both:
            raise PredictionFileError(f"{name}: well {next(iter(both))!r} is in more than one part")
        seen.update(obj[part])
    return obj


def _check_well(name: str, part: str, key: Any, sites: Any, n_classes: int | None) -> int:
    """Check one well's entry; return its vector length."""
    if not isinstance(key, str):
        raise PredictionFileError(f"{name}: part {part!r} has a non-string id {key!r}")
    if not isinstance(sites, (list, tuple)) or not sites:
        raise PredictionFileError(f"{name}: {part}[{key!r}] must be a non-empty list of per-site "
                                  f"logit vectors, found {type(sites).__name__}")
    for s in sites:
        if not isinstance(s, np.ndarray) or s.ndim != 1 or s.dtype.kind not in "fiu":
            what = (f"an array of shape {s.shape} and dtype {s.dtype}" if isinstance(s, np.ndarray)
                    else type(s).__name__)
            raise PredictionFileError(f"{name}: {part}[{key!r}] holds {what}; "
                                      "expected 1-D numeric logit vectors")
        if n_classes is not None and s.shape[0] != n_classes:
            raise PredictionFileError(f"{name}: {part}[{key!r}] has {s.shape[0]} classes, "
                                      f"other wells have {n_classes}")
        n_classes = s.shape[0]
    return n_classes


def check_predictions(obj: Any, name: str = "predictions", parts: Sequence[str] = PARTS) -> int:
    """Check the structure of a prediction dict; return the vector length (0 if no wells).

    `parts`: the parts allowed (PARTS for logits, EMBEDDING_PARTS for an embeddings file).
    """
    _check_top(obj, name, parts)
    n_classes = None
    for part, wells in obj.items():
        for key, sites in wells.items():
            n_classes = _check_well(name, part, key, sites, n_classes)
    return n_classes or 0


# ---------------------------------------------------------------------------------- public API


def _parts_of(kind: str | None, path: str | os.PathLike) -> tuple[str, ...]:
    """The parts a file may hold. With no `kind`, the name decides: main.py names embeddings
    files `<ckpt>.embeddings<suffix>` and prediction files `<ckpt>.output<suffix>`."""
    if kind is None:
        kind = "embeddings" if ".embeddings" in Path(path).name else "logits"
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    return EMBEDDING_PARTS if kind == "embeddings" else PARTS + OPTIONAL_PARTS


def save_predictions(path: str | os.PathLike, output: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
                     kind: str | None = None) -> None:
    """Write a prediction (or embeddings) file atomically, as float32 vectors.

    Checked first, so no bad file is left. `kind` 'logits' allows the parts 'test' and 'val',
    'embeddings' also 'train'; None decides by the file name (see `_parts_of`).
    """
    data = {part: {str(k): [np.ascontiguousarray(s, dtype=np.float32) for s in sites]
                   for k, sites in wells.items()}
            for part, wells in output.items()}
    check_predictions(data, str(path), _parts_of(kind, path))
    with atomic_write(path, "wb") as f:  # a failed write: an OutputError naming `path`
        pickle.dump(data, f, protocol=4)


def save_embeddings(path: str | os.PathLike, output: Mapping[str, Mapping[str, Sequence[np.ndarray]]]) -> None:
    """Write an embeddings file ('train', 'val' and 'test' parts allowed), whatever its name."""
    save_predictions(path, output, kind="embeddings")


def load_predictions(path: str | os.PathLike, kind: str = "logits") -> dict[str, dict[str, list[np.ndarray]]]:
    """Read a prediction file (or with kind='embeddings' an embeddings file) through the
    restricted unpickler and check its structure.

    Parts missing from the file come back as empty dicts ('id_test' only when the file has it).
    """
    path = Path(path)
    parts = _parts_of(kind, path)
    obj = _unpickle(path)
    check_predictions(obj, str(path), parts)
    return {part: dict(obj.get(part, {})) for part in parts if part not in OPTIONAL_PARTS or part in obj}


@dataclass
class WellSums:
    """A prediction file reduced to one score vector per well: the sum of its sites.

    All rows live in one matrix, the parts one after the other in the order they were read
    (ROW_ORDER: 'val' wells first and then 'test' wells, the order make_submission works in, so
    it can adopt the matrix without a copy; EMBEDDING_ROWS: 'train' first); `sums` are views.
    For an embeddings file `n_classes` is the embedding size.
    """
    path: str
    n_classes: int
    ids: dict[str, np.ndarray]    # part -> sorted id codes
    sums: dict[str, np.ndarray]   # part -> float32 [wells, n_classes], rows in the order of ids
    matrix: np.ndarray            # float32 [wells of all parts, n_classes]


ROW_ORDER = ("val", "test")
EMBEDDING_ROWS = ("train", "val", "test")


def _sorted_ids(name: str, part: str, wells: dict) -> list[str]:
    for key in wells:
        if type(key) is not str:
            _check_well(name, part, key, None, None)  # raises: ids must be strings
    return sorted(wells)


def _check_site_counts(name: str, parts: dict, keys: dict) -> None:
    """A well holds one vector per site: fewer than the others where a site was unreadable
    (--skip-bad-images), never more (a site counted twice would weigh its well up)."""
    counts = {part: [len(v) if isinstance(v, (list, tuple)) else 1 for v in (parts[part][k] for k in keys[part])]
              for part in keys}
    every = [c for part_counts in counts.values() for c in part_counts]
    if not every:
        return
    # the most common count; of counts as common, the largest (a file of two wells, of 2 and 1 sites,
    # lost a site: it repeats none)
    usual = max(set(every), key=lambda c: (every.count(c), c))
    for part, part_counts in counts.items():
        above = [i for i, c in enumerate(part_counts) if c > usual]
        if above:
            raise PredictionFileError(f"{name}: {part}[{keys[part][above[0]]!r}] has {part_counts[above[0]]} site "
                                      f"vectors where the wells have {usual} ({len(above)} such well(s) in {part})")


def load_well_sums(path: str | os.PathLike, rows: Sequence[str] = ROW_ORDER) -> WellSums:
    """Read a prediction file and reduce it at once to per-well float32 site sums.

    The per-site arrays are dropped as they are summed: a full-size file holds ~50,000 of them,
    twice the memory of the sums. `rows`: the parts allowed and their row order (ROW_ORDER for
    logits; EMBEDDING_ROWS for an embeddings file, whose 'train' part comes first).
    """
    path = Path(path)
    name = str(path)
    obj = _check_top(_unpickle(path), name, tuple(rows) + OPTIONAL_PARTS)  # an ID test part is not read
    parts = {part: obj.get(part, {}) for part in rows}
    del obj
    keys = {part: _sorted_ids(name, part, wells) for part, wells in parts.items()}
    n_classes = 0
    for part in rows:  # the first well fixes the class count, checked in full
        if keys[part]:
            n_classes = _check_well(name, part, keys[part][0], parts[part][keys[part][0]], None)
            break
    _check_site_counts(name, parts, keys)
    matrix = np.empty((sum(map(len, keys.values())), n_classes), dtype=np.float32)
    sums, start = {}, 0
    for part in rows:
        sums[part] = matrix[start:start + len(keys[part])]
        start += len(keys[part])
        try:
            sum_site_lists(parts[part], keys[part], sums[part],
                           lambda key, sites, part=part: _check_well(name, part, key, sites, n_classes))
        except OverflowError as e:
            raise PredictionFileError(f"{path}: {part}[{e.args[0]!r}]: its site vectors are finite but too large "
                                      "to sum in float32 (values near 3.4e38): not what a model predicts") from None
    ids = {part: np.asarray(keys[part], dtype=str) for part in rows}
    # one cheap pass: a row with NaN or inf has a non-finite sum (the exact test runs only then;
    # finite values whose row sum overflows float32 take it too, without a warning)
    with np.errstate(over="ignore", invalid="ignore"):
        suspect = not np.isfinite(matrix.sum(axis=1)).all()
    if suspect:
        bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
        if bad.size:
            ends = np.cumsum([len(keys[p]) for p in rows])
            part = rows[int(np.searchsorted(ends, bad[0], side="right"))]
            well = str(np.concatenate([ids[p] for p in rows])[bad[0]])  # not np.str_ in the message
            raise PredictionFileError(f"{path}: {part}[{well!r}] has NaN or infinite values "
                                      f"({bad.size} well(s) in all)")
    return WellSums(name, n_classes, ids, sums, matrix)
