"""The metadata table: the three RxRx1 layouts read into one table (one row per site or per well).

- competition (`train.csv`, ...): six grey PNGs per site under `{train,test}/`;
- release (`metadata.csv`, `dataset` train/test): the same under `images/`;
- wilds (`metadata.csv` whose `dataset` also says `val`: RxRx1-WILDS): one RGB composite per site,
  `images/{experiment}/Plate{plate}/{well}_s{site}.png`, every row labelled (`sirna_id`).

Data flows one way through the project: metadata table -> samples -> batches -> logits ->
prediction file -> submission. This module is the first step; what follows from the table has a
module of its own: structure.py (classes, plate groups), folds.py (validation folds, subsets),
layout_matches.py (layout coincidences), wells.py (sites into wells). Nothing downstream knows which
layout the data came in, and no size of the competition (classes, plates, wells, experiments)
is written down anywhere: it is all derived from the metadata of the data set at hand.

The table has one row per site (or per well, from `load_wells`), with the columns of
`WELL_COLUMNS` (+ `site`, `image_prefix`):

- `sirna`      the label training may use: -1 where it is unknown or must stay hidden
               (test treatment wells, even where the release layout publishes them)
- `sirna_true` the ground truth where anything knows it (release layout test labels), else -1;
               for scoring only
- `leaked`     True where `sirna` of a test well was filled in from a layout coincidence
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from cellpaint.core.errors import DataError
from cellpaint.data.images import ImageError, SiteFiles, discover

TREATMENT = "treatment"
CONTROL_TYPES = ("positive_control", "negative_control")
WELL_COLUMNS = ["id_code", "experiment", "cell_type", "plate", "well", "well_type", "split",
                "sirna", "sirna_true", "leaked"]
SITE_COLUMNS = WELL_COLUMNS + ["site", "image_prefix"]

COMPETITION_FILES = {
    "train.csv": ["id_code", "experiment", "plate", "well", "sirna"],
    "test.csv": ["id_code", "experiment", "plate", "well"],
    "train_controls.csv": ["id_code", "experiment", "plate", "well", "sirna", "well_type"],
    "test_controls.csv": ["id_code", "experiment", "plate", "well", "sirna", "well_type"],
}
RELEASE_COLUMNS = ["site_id", "well_id", "cell_type", "dataset", "experiment", "plate", "well", "site",
                   "well_type", "sirna_id"]
WILDS_SPLITS = ("train", "val", "test")
_SITE_RE = re.compile(r"^([A-Z]+\d+)_s(\d+)_w\d+\.png$")


# ----------------------------------------------------------------------------------------- reading


def read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    """Read a CSV and check that it has the `required` columns, failing with a message naming the file."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        df = pd.read_csv(path)
    except OSError as e:  # no read permission, an I/O error: the file is there but cannot be read
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse CSV ({e})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(found: {', '.join(map(str, df.columns))})")
    return df


def _as_int(series: pd.Series, path: Path, column: str, fill: int | None = None) -> pd.Series:
    """A column of integers, strictly: 3.7 is refused, not cut to 3 (a decimal plate or label would
    silently change the plate-group structure). The error names the file, line and column."""
    values = pd.to_numeric(series, errors="coerce")
    if fill is not None:
        values = values.fillna(fill)
    with np.errstate(invalid="ignore"):
        bad = values.isna() | ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        i = bad.to_numpy().argmax()
        # line numbers as an editor shows them: the header is line 1 (the index is the file's row order)
        shown = "an empty value" if pd.isna(series.iloc[i]) else repr(str(series.iloc[i]))
        raise DataError(f"{path} line {int(series.index[i]) + 2}, column {column}: {shown} is not an integer")
    return values.astype(np.int64)


def detect_layout(data_dir: Path) -> str:
    """'competition' (train.csv), 'release' (metadata.csv) or 'wilds' (metadata.csv with `val` in its
    `dataset` column: RxRx1-WILDS); a clear error for anything else."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist. Point --data at the competition data "
                        "(kaggle competitions download -c recursion-cellular-image-classification: train.csv, "
                        "test.csv, ...) or the RxRx1 release (https://www.rxrx.ai/rxrx1: metadata.csv, images/), "
                        "or make a synthetic set with: python synthetic.py DIR")
    if (data_dir / "train.csv").exists():
        return "competition"
    if (data_dir / "metadata.csv").exists():
        return "wilds" if "val" in set(_dataset_column(data_dir / "metadata.csv")) else "release"
    raise DataError(f"{data_dir} holds neither train.csv (competition layout) nor metadata.csv "
                    "(RxRx1 release or RxRx1-WILDS layout)")


def _dataset_column(path: Path) -> pd.Series:
    """The `dataset` column of a metadata.csv (what tells the release from RxRx1-WILDS)."""
    try:
        return pd.read_csv(path, usecols=["dataset"])["dataset"].astype(str)
    except ValueError:  # no such column: the full read names what is missing
        read_csv(path, RELEASE_COLUMNS)
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse CSV ({e})") from None


def input_files(data_dir: Path) -> list[Path]:
    """The metadata files of a data set that exist (what a command reads besides the images): no
    command may write over one of them."""
    names = [*COMPETITION_FILES, "metadata.csv", "pixel_stats.csv"]
    return [Path(data_dir) / name for name in names if (Path(data_dir) / name).is_file()]


def _read_competition_wells(data_dir: Path) -> pd.DataFrame:
    frames = []
    for name, required in COMPETITION_FILES.items():
        path = data_dir / name
        df = read_csv(path, required)[required].copy()
        split = name.split("_")[0].replace(".csv", "")
        df["split"] = split
        if "well_type" not in df:
            df["well_type"] = TREATMENT
        else:
            bad = ~df["well_type"].isin(CONTROL_TYPES)
            if bad.any():
                raise DataError(f"{path}: unknown well_type {df['well_type'][bad].iloc[0]!r} "
                                f"(expected one of {', '.join(CONTROL_TYPES)})")
        df["sirna"] = _as_int(df["sirna"], path, "sirna") if "sirna" in df else -1
        df["plate"] = _as_int(df["plate"], path, "plate")
        df["_source"] = [(str(path), i + 2) for i in range(len(df))]  # file and line, for messages
        frames.append(df)
    wells = pd.concat(frames, ignore_index=True)
    wells["sirna_true"] = wells["sirna"]
    wells["cell_type"] = wells["experiment"].str.split("-").str[0]
    return wells


def _read_release_sites(data_dir: Path, wilds: bool = False) -> pd.DataFrame:
    path = data_dir / "metadata.csv"
    df = read_csv(path, RELEASE_COLUMNS)
    if wilds:
        _check_wilds_labels(df["sirna_id"], path)
    sites = pd.DataFrame({
        "id_code": df["well_id"].astype(str),
        "experiment": df["experiment"].astype(str),
        "cell_type": df["cell_type"].astype(str),
        "plate": _as_int(df["plate"], path, "plate"),
        "well": df["well"].astype(str),
        "site": _as_int(df["site"], path, "site"),
        "well_type": df["well_type"].astype(str),
        "split": df["dataset"].astype(str),
        "sirna_true": _as_int(df["sirna_id"], path, "sirna_id", fill=-1),
        "_source": [(str(path), i + 2) for i in range(len(df))],  # file and line, for messages
    })
    splits = WILDS_SPLITS if wilds else ("train", "test")
    for column, allowed in (("split", splits), ("well_type", (TREATMENT,) + CONTROL_TYPES)):
        bad = ~sites[column].isin(allowed)
        if bad.any():
            raise DataError(f"{path}: unexpected value {sites[column][bad].iloc[0]!r} "
                            f"(expected one of {', '.join(allowed)})")
    unlabelled = (sites["split"] == "train").to_numpy() & df["sirna_id"].isna().to_numpy()
    if unlabelled.any():  # training would read -1 as its label; only test rows may keep theirs unknown
        i = int(unlabelled.argmax())
        raise DataError(f"{path} line {i + 2}: train site {df['site_id'].iloc[i]} has no sirna_id "
                        "(every train row needs its label)")
    _check_sites_agree(sites, path)
    return sites


# what every site row of one well must say alike (the release layout repeats them per site)
WELL_FIELDS = ["experiment", "cell_type", "plate", "well", "split", "well_type", "sirna_true"]
_SHOWN = {"split": "dataset", "sirna_true": "sirna_id"}


def _check_sites_agree(sites: pd.DataFrame, path: Path) -> None:
    """The sites of a well (one well_id) must agree on what describes the well: split, type, label
    and place; otherwise one of them would silently decide (the competition layout, one row per
    well, cannot disagree)."""
    first = sites.groupby("id_code", sort=False)[WELL_FIELDS].transform("first")
    differs = (first != sites[WELL_FIELDS]).to_numpy()
    if not differs.any():
        return
    row = int(differs.any(axis=1).argmax())
    column = WELL_FIELDS[int(differs[row].argmax())]
    code = sites["id_code"].iloc[row]
    first_line = sites.loc[sites["id_code"] == code, "_source"].iloc[0][1]
    shown = _SHOWN.get(column, column)
    raise DataError(f"{path} lines {first_line} and {row + 2}: the sites of well {code} disagree on {shown} "
                    f"({first[column].iloc[row]} vs {sites[column].iloc[row]})")


def _check_wilds_labels(labels: pd.Series, path: Path) -> None:
    """RxRx1-WILDS labels every site, and its classes are 0..N-1 with every one present (N distinct
    labels): the `wilds` package counts N = max + 1 and asserts that. A row outside is named."""
    values = _as_int(labels, path, "sirna_id")
    n = values.nunique()
    bad = (values < 0) | (values >= n)
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise DataError(f"{path} line {int(values.index[i]) + 2}, column sirna_id: label {values.iloc[i]} is outside "
                        f"0..{n - 1} (its rows use {n} distinct labels, and RxRx1-WILDS numbers its N classes "
                        "0..N-1, every one present)")


def _finish(table: pd.DataFrame, keys: list[str], columns: list[str],
            test_labels_for_training: bool) -> pd.DataFrame:
    hidden = (table["split"] == "test") & (table["well_type"] == TREATMENT) & (not test_labels_for_training)
    table["sirna"] = np.where(hidden, -1, table["sirna_true"]).astype(np.int64)
    table["leaked"] = False
    for column in ("id_code", "experiment", "cell_type", "well", "well_type", "split"):
        table[column] = table[column].astype(str)  # one string dtype, whichever reader made the column
    table = table.sort_values(["split", "experiment", "plate", "well"] + keys[4:], kind="stable")
    duplicated = table.duplicated(keys)
    if duplicated.any():
        again = table[duplicated].iloc[0]
        first = table[(table[keys] == again[keys]).all(axis=1)].iloc[0]
        where = ", ".join(f"{k} {again[k]}" for k in keys)
        (path, line), (first_path, first_line) = again["_source"], first["_source"]
        earlier = f"line {first_line}" if first_path == path else f"{first_path} line {first_line}"
        raise DataError(f"{path} line {line} repeats {earlier}: the same site or well ({where})")
    # prediction files and submissions are keyed by id_code: one code in two places (train and test,
    # a treatment and a control row) would make one well's predictions overwrite another's
    same_code = table.duplicated(["id_code"] + keys[4:], keep=False)
    if same_code.any():
        rows = table[same_code]
        code = rows["id_code"].iloc[0]
        places = rows.loc[rows["id_code"] == code, ["split", "well_type"]].drop_duplicates()
        raise DataError(f"id_code {code} names {len(places)} wells ({', '.join(places['split'] + ' ' + places['well_type'])}); "
                        f"{rows['id_code'].nunique()} id_code(s) are used more than once")
    return table[columns].reset_index(drop=True)


def load_wells(data_dir: Path, test_labels_for_training: bool = False) -> pd.DataFrame:
    """One row per well, from either layout; needs no images (make_submission uses this)."""
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    if layout == "competition":
        wells = _read_competition_wells(data_dir)
    else:
        wells = _read_release_sites(data_dir, layout == "wilds").drop(columns="site").drop_duplicates("id_code")
    return _finish(wells, ["split", "experiment", "plate", "well"], WELL_COLUMNS,
                   test_labels_for_training)


def discover_sites(data_dir: Path, wells: pd.DataFrame) -> list[int]:
    """The site numbers the images have, read off the plate directories (competition layout)."""
    sites: set[int] = set()
    for (split, experiment, plate), _ in wells.groupby(["split", "experiment", "plate"]):
        plate_dir = data_dir / split / experiment / f"Plate{plate}"
        if plate_dir.is_dir():
            sites.update(int(m.group(2)) for m in map(_SITE_RE.match, os.listdir(plate_dir)) if m)
    if not sites:
        raise DataError(f"no images found under {data_dir / 'train'} or {data_dir / 'test'} "
                        "(expected {split}/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png)")
    return sorted(sites)


def load_table(data_dir: Path, test_labels_for_training: bool = False) -> pd.DataFrame:
    """One row per site, from either layout, with the path prefix of its channel images."""
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    if layout == "competition":
        wells = load_wells(data_dir, test_labels_for_training)
        sites = discover_sites(data_dir, wells)
        table = wells.loc[wells.index.repeat(len(sites))].reset_index(drop=True)
        table["site"] = np.tile(np.asarray(sites, dtype=np.int64), len(wells))
        root = data_dir.as_posix() + "/" + table["split"]
    else:
        table = _finish(_read_release_sites(data_dir, layout == "wilds"), ["split", "experiment", "plate", "well", "site"],
                        WELL_COLUMNS + ["site"], test_labels_for_training)
        root = data_dir.as_posix() + "/images"
    table["image_prefix"] = (root + "/" + table["experiment"] + "/Plate" + table["plate"].astype(str)
                             + "/" + table["well"] + "_s" + table["site"].astype(str))
    return table[SITE_COLUMNS]


def site_files(data_dir: Path, table: pd.DataFrame) -> SiteFiles:
    """How the data set's sites are stored (composites in the wilds layout, grey PNGs per channel in
    the other two) and how many channels they have, read off its files."""
    try:
        return discover(table["image_prefix"].to_numpy(), composite=detect_layout(data_dir) == "wilds")
    except ImageError as e:
        raise DataError(f"{data_dir}: {e}") from None


def control_file(data_dir: Path, split: str) -> Path:
    """The file that lists the control wells of `split` (what names a missing control in a message)."""
    if detect_layout(data_dir) == "competition":
        return Path(data_dir) / f"{'test' if split == 'test' else 'train'}_controls.csv"
    return Path(data_dir) / "metadata.csv"


def wells_of(table: pd.DataFrame) -> pd.DataFrame:
    """The per-well view of a per-site table (first site of each well)."""
    return table.drop_duplicates("id_code")[WELL_COLUMNS].reset_index(drop=True)


def fingerprint(table: pd.DataFrame) -> str:
    """A short hash of what identifies a data set: its wells, their splits, types and labels (not
    its path, which may move, nor its images). Checkpoints carry it so that a run is not continued
    on another data set by mistake."""
    wells = wells_of(table) if "site" in table else table
    key = wells.sort_values("id_code")[["id_code", "split", "well_type", "sirna_true"]]
    text = key.to_csv(index=False).encode()
    return hashlib.sha256(text).hexdigest()[:16]
