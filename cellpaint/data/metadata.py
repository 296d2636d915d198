"""The metadata table: both RxRx1 layouts read into one table, and everything derived from it.

Data flows one way through the project: metadata table -> samples -> batches -> logits ->
prediction file -> submission. This module is the first step. Nothing downstream knows which
layout the data came in, and no size of the competition (classes, plates, wells, experiments)
is written down anywhere: it is all derived here from the metadata of the data set at hand.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellpaint.errors import CellpaintError

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
_SITE_RE = re.compile(r"^([A-Z]+\d+)_s(\d+)_w\d+\.png$")


class DataError(CellpaintError, ValueError):
    """A problem with the user's data set: the message names the file and what is wrong."""


# ----------------------------------------------------------------------------------------- reading


def read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    """Read a CSV and check that it has the `required` columns, failing with a message naming the file."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        df = pd.read_csv(path)
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
    """'competition' (train.csv) or 'release' (metadata.csv); a clear error for anything else."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist. Point --data at the competition data "
                        "(kaggle competitions download -c recursion-cellular-image-classification: train.csv, "
                        "test.csv, ...) or the RxRx1 release (https://www.rxrx.ai/rxrx1: metadata.csv, images/), "
                        "or make a synthetic set with: python synthetic.py DIR")
    if (data_dir / "train.csv").exists():
        return "competition"
    if (data_dir / "metadata.csv").exists():
        return "release"
    raise DataError(f"{data_dir} holds neither train.csv (competition layout) nor metadata.csv "
                    "(RxRx1 release layout)")


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
        frames.append(df)
    wells = pd.concat(frames, ignore_index=True)
    wells["sirna_true"] = wells["sirna"]
    wells["cell_type"] = wells["experiment"].str.split("-").str[0]
    return wells


def _read_release_sites(data_dir: Path) -> pd.DataFrame:
    path = data_dir / "metadata.csv"
    df = read_csv(path, RELEASE_COLUMNS)
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
    })
    for column, allowed in (("split", ("train", "test")), ("well_type", (TREATMENT,) + CONTROL_TYPES)):
        bad = ~sites[column].isin(allowed)
        if bad.any():
            raise DataError(f"{path}: unexpected value {sites[column][bad].iloc[0]!r} "
                            f"(expected one of {', '.join(allowed)})")
    return sites


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
        raise DataError(f"duplicate entry in the metadata: {table[duplicated].iloc[0][keys].tolist()}")
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
    if detect_layout(data_dir) == "competition":
        wells = _read_competition_wells(data_dir)
    else:
        wells = _read_release_sites(data_dir).drop(columns="site").drop_duplicates("id_code")
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
    if detect_layout(data_dir) == "competition":
        wells = load_wells(data_dir, test_labels_for_training)
        sites = discover_sites(data_dir, wells)
        table = wells.loc[wells.index.repeat(len(sites))].reset_index(drop=True)
        table["site"] = np.tile(np.asarray(sites, dtype=np.int64), len(wells))
        root = data_dir.as_posix() + "/" + table["split"]
    else:
        table = _finish(_read_release_sites(data_dir), ["split", "experiment", "plate", "well", "site"],
                        WELL_COLUMNS + ["site"], test_labels_for_training)
        root = data_dir.as_posix() + "/images"
    table["image_prefix"] = (root + "/" + table["experiment"] + "/Plate" + table["plate"].astype(str)
                             + "/" + table["well"] + "_s" + table["site"].astype(str))
    return table[SITE_COLUMNS]


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


def sum_sites(rows: pd.DataFrame, site_values: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Sum per-site vectors over the sites of each well: (one row per well, [wells, K] sums).

    Sites whose vector is not finite (NaN: an unreadable image skipped) are left out, and so is a
    well with no site left."""
    finite = np.isfinite(site_values).all(axis=1) if len(site_values) else np.ones(0, dtype=bool)
    if not finite.all():
        rows, site_values = rows[finite], site_values[finite]
    codes, first, inverse = np.unique(rows["id_code"].to_numpy(), return_index=True, return_inverse=True)
    sums = np.zeros((len(codes), site_values.shape[1]), dtype=np.float32)
    np.add.at(sums, inverse, site_values)
    return rows.iloc[first].reset_index(drop=True), sums


# ----------------------------------------------------------------------------- derived structure


@dataclass(frozen=True)
class Structure:
    """What the metadata says about the problem; nothing here is a constant of the competition."""
    n_classes: int
    treatment_classes: np.ndarray       # sorted class ids seen in treatment wells
    control_classes: np.ndarray         # sorted class ids seen in control wells
    groups: tuple[np.ndarray, ...]      # plate groups: disjoint sorted sets of treatment classes
    plate_groups: dict                  # (experiment, plate) -> group index, for labelled plates
    cell_types: tuple[str, ...]

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def class_group(self) -> np.ndarray:
        """Group index per class (-1 for controls and unseen classes)."""
        out = np.full(self.n_classes, -1, dtype=np.int64)
        for g, classes in enumerate(self.groups):
            out[classes] = g
        return out

    def group_masks(self) -> np.ndarray:
        """Boolean [n_groups, n_classes]: which classes each plate group holds."""
        masks = np.zeros((self.n_groups, self.n_classes), dtype=bool)
        for g, classes in enumerate(self.groups):
            masks[g, classes] = True
        return masks


def _plate_components(plates: list[np.ndarray], n: int) -> np.ndarray:
    """Union-find over classes: the classes sharing a plate belong to one group."""
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for classes in plates:
        root = find(classes[0])
        for c in classes[1:]:
            parent[find(c)] = root
    return np.array([find(i) for i in range(n)])


def _spans(values: np.ndarray, limit: int = 3) -> str:
    """Sorted integers as ranges: '24..998', '5, 9..11'."""
    spans, start = [], values[0]
    for a, b in zip(values, list(values[1:]) + [None]):
        if b is None or b != a + 1:
            spans.append(f"{start}..{a}" if a != start else f"{a}")
            start = b
    return ", ".join(spans[:limit]) + (", ..." if len(spans) > limit else "")


def derive_structure(table: pd.DataFrame, n_classes: int | None = None) -> Structure:
    """Class count, treatment/control classes and plate groups, from the labels training may use."""
    wells = wells_of(table) if "site" in table else table
    known = wells[wells["sirna"] >= 0]
    if known.empty:
        raise DataError("the metadata has no labelled wells: nothing to train on or score against")
    derived = int(max(wells["sirna"].max(), wells["sirna_true"].max())) + 1
    if n_classes is not None and n_classes < derived:
        raise DataError(f"--classes {n_classes} is smaller than the {derived} classes in the metadata")
    if not ((known["well_type"] == TREATMENT) & (known["split"] == "train")).any():
        raise DataError("the metadata has no labelled treatment wells in train: nothing to train on "
                        "(an empty train.csv, or a metadata.csv without train treatment rows?)")
    if n_classes is None:
        # the class count is derived as the largest label + 1, so a typo (999 among 24 classes) would
        # make classes no well has: in the real data every class, treatment or control, is in some well
        labels = pd.concat([wells.loc[wells["sirna"] >= 0, ["id_code", "split", "sirna"]],
                            wells.loc[wells["sirna_true"] >= 0, ["id_code", "split", "sirna_true"]]
                            .rename(columns={"sirna_true": "sirna"})])
        empty = np.setdiff1d(np.arange(derived), labels["sirna"].unique())
        if empty.size:
            above = labels[labels["sirna"] > empty[0]].sort_values("sirna", ascending=False)
            top = above.iloc[0]
            raise DataError(f"labels leave {empty.size} class(es) without any well ({_spans(empty)}): is label "
                            f"{top.sirna} of {top.split} well {top.id_code} a typo? ({above['id_code'].nunique()} "
                            f"well(s) above the gap; --classes N allows classes that no well has)")
    treat = known[known["well_type"] == TREATMENT]
    treatment_classes = np.sort(treat["sirna"].unique())
    control_classes = np.sort(known.loc[known["well_type"] != TREATMENT, "sirna"].unique())
    overlap = np.intersect1d(treatment_classes, control_classes)
    if overlap.size:
        raise DataError(f"classes {overlap[:5].tolist()} occur both as treatment and as control")

    by_plate = treat.groupby(["experiment", "plate"])["sirna"]
    plate_classes = {key: np.unique(v.to_numpy()) for key, v in by_plate}
    roots = _plate_components(list(plate_classes.values()), derived)
    groups = sorted((np.flatnonzero(roots == r) for r in np.unique(roots[treatment_classes])),
                    key=lambda g: g[0])
    groups = tuple(np.intersect1d(g, treatment_classes) for g in groups)
    group_of = {int(c): gi for gi, g in enumerate(groups) for c in g}
    plate_groups = {key: group_of[int(v[0])] for key, v in plate_classes.items()}
    return Structure(
        n_classes=n_classes or derived,
        treatment_classes=treatment_classes,
        control_classes=control_classes,
        groups=groups,
        plate_groups=plate_groups,
        cell_types=tuple(sorted(wells["cell_type"].unique())),
    )


# --------------------------------------------------------------------------------------- folds


def assign_folds(table: pd.DataFrame, n_folds: int = 6, seed: int = 0) -> dict[str, int]:
    """Validation fold of each train experiment: dealt within each cell type after a seeded shuffle.

    The deal continues across cell types rather than restarting at fold 0, so folds stay balanced
    (and none is empty) when a cell type has fewer experiments than there are folds.
    """
    if n_folds < 1:
        raise ValueError(f"the number of folds must be positive, got {n_folds}")
    rng = np.random.default_rng(seed)
    train = table[table["split"] == "train"]
    folds: dict[str, int] = {}
    turn = 0
    for _, experiments in sorted(train.groupby("cell_type")["experiment"]):
        for experiment in rng.permutation(sorted(experiments.unique())):
            folds[str(experiment)] = turn % n_folds
            turn += 1
    return folds


def last_experiments(table: pd.DataFrame) -> list[str]:
    """The last train experiment of each cell type, in name order (HEPG2-07, HUVEC-16, RPE-07,
    U2OS-03 in the competition data): the 41st place's validation split."""
    train = table.loc[table["split"] == "train", ["cell_type", "experiment"]].astype(str).drop_duplicates()
    return sorted(train.sort_values("experiment").groupby("cell_type")["experiment"].last())


def named_folds(table: pd.DataFrame, validation: list[str]) -> dict[str, int]:
    """Folds that put exactly the named train experiments in fold 0 (validation) and every other
    train experiment in fold 1: `--val-experiments`, for a split chosen by name (e.g. the 1st
    place's per-fold table) instead of dealt."""
    train = sorted(table.loc[table["split"] == "train", "experiment"].astype(str).unique())
    unknown = [e for e in validation if e not in train]
    if unknown:
        raise DataError(f"--val-experiments: {', '.join(unknown)} is not a train experiment of the data set "
                        f"(train experiments: {', '.join(train)})")
    if len(set(validation)) != len(validation):
        raise DataError(f"--val-experiments: an experiment is named twice in {','.join(validation)}")
    return {e: 0 if e in validation else 1 for e in train}


# --------------------------------------------------------------------------- layout coincidences


@dataclass(frozen=True)
class LayoutMatch:
    """Test experiment `test` holds, on its k-th plate, what train experiment `train` holds on its
    (k - shift)-th plate (cyclically): the same siRNA in the same well."""
    test: str
    train: str
    shift: int
    wells_compared: int

    def source_plate(self, plate: int, plates: list[int]) -> int:
        return plates[(plates.index(plate) - self.shift) % len(plates)]


def _control_layout(wells: pd.DataFrame) -> dict[str, dict[int, dict[str, int]]]:
    controls = wells[(wells["well_type"] != TREATMENT) & (wells["sirna"] >= 0)]
    layout: dict[str, dict[int, dict[str, int]]] = {}
    for (experiment, plate), rows in controls.groupby(["experiment", "plate"]):
        layout.setdefault(experiment, {})[int(plate)] = dict(zip(rows["well"], rows["sirna"]))
    return layout


def find_layout_matches(table: pd.DataFrame, min_agreement: float = 0.95) -> list[LayoutMatch]:
    """Test experiments whose control-well layout equals a train experiment's, up to a cyclic plate shift.

    Controls are labelled in both splits, so their positions can be compared. A match must cover
    most control wells of both experiments and be unique: a test experiment that fits several
    train experiments or shifts is ambiguous and not reported.
    """
    wells = wells_of(table) if "site" in table else table
    layout = _control_layout(wells)
    experiments = wells.drop_duplicates("experiment").set_index("experiment")["split"]
    matches = []
    for test in experiments[experiments == "test"].index:
        found = []
        for train in experiments[experiments == "train"].index:
            t, r = layout.get(test, {}), layout.get(train, {})
            plates = sorted(r)
            if not t or sorted(t) != plates:
                continue
            for shift in range(len(plates)):
                m = LayoutMatch(test, train, shift, 0)
                agree = compared = 0
                for plate in plates:
                    a, b = t[plate], r[m.source_plate(plate, plates)]
                    common = a.keys() & b.keys()
                    compared += len(common)
                    agree += sum(a[w] == b[w] for w in common)
                n_t = sum(map(len, t.values()))
                n_r = sum(map(len, r.values()))
                if compared >= 0.9 * max(n_t, n_r) and agree >= min_agreement * compared:
                    found.append(LayoutMatch(test, train, shift, compared))
        if len(found) == 1:
            matches.append(found[0])
    return matches


def apply_layout_matches(table: pd.DataFrame, matches: list[LayoutMatch]) -> pd.DataFrame:
    """Label the treatment wells of matched test experiments from their train twins (`leaked`)."""
    table = table.copy()
    for m in matches:
        source = table[(table["experiment"] == m.train) & (table["well_type"] == TREATMENT)]
        labels = dict(zip(zip(source["plate"], source["well"]), source["sirna"]))
        # the plates the match was found on (controls included): a plate without treatment wells still counts
        plates = sorted(table.loc[table["experiment"] == m.train, "plate"].unique().tolist())
        rows = table.index[(table["experiment"] == m.test) & (table["well_type"] == TREATMENT)]
        keys = [(m.source_plate(p, plates), w) for p, w in zip(table.loc[rows, "plate"], table.loc[rows, "well"])]
        found = np.array([labels.get(k, -1) for k in keys], dtype=np.int64)
        table.loc[rows, "sirna"] = found
        table.loc[rows, "leaked"] = found >= 0
    return table


# ------------------------------------------------------------------------------------- subsets


def split_subsets(table: pd.DataFrame, folds: dict[str, int], cv_number: int,
                  all_controls_train: bool = True) -> dict[str, pd.DataFrame]:
    """The rows the trainer needs: `train`, `val` and `test`.

    - train: labelled wells of the train experiments outside the validation fold (controls too),
      test wells labelled through a layout coincidence, and, with `all_controls_train`, the
      control wells of validation and test experiments (their labels are public).
    - val: treatment wells of the validation experiments (scored on treatment only).
    - test: treatment wells of the test experiments (all of them: the submission needs every one).
    """
    if cv_number >= 0 and cv_number not in set(folds.values()):
        raise DataError(f"--cv-number {cv_number}: no experiment falls in that fold "
                        f"(folds present: {sorted(set(folds.values()))})")
    in_val = table["experiment"].map(folds).eq(cv_number) & (cv_number >= 0)
    treatment = table["well_type"] == TREATMENT
    train_split = table["split"] == "train"
    labelled = table["sirna"] >= 0
    train = (train_split & ~in_val & labelled) | (table["leaked"] & ~in_val)
    if all_controls_train:
        train |= ~treatment & labelled
    subsets = {
        "train": table[train],
        "val": table[train_split & in_val & treatment],
        "test": table[~train_split & treatment],
    }
    return {k: v.reset_index(drop=True) for k, v in subsets.items()}
