"""metadata.py's newer reading on small hand-made files: the three layouts told apart, RxRx1-WILDS
labels that must number their classes 0..N-1, a train row without a label, the sites of a well
that must agree (each field, by file line), a file that cannot be read, the data set's input
files, the file that lists a split's controls, and where its images are."""
from __future__ import annotations

import errno
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellpaint.core.errors import DataError
from cellpaint.data import metadata

HEADER = "site_id,well_id,cell_type,dataset,experiment,plate,well,site,well_type,sirna,sirna_id\n"


def refused(message: str):
    return pytest.raises(DataError, match="^" + re.escape(message) + "$")


def row(well: str, site: int, split: str = "train", label="0", kind: str = "treatment", experiment: str = "RPE-01",
        plate: int = 1, cell: str = "RPE") -> str:
    return f"{experiment}_{plate}_{well}_{site},{experiment}_{plate}_{well},{cell},{split},{experiment},{plate},{well},{site},{kind},s,{label}\n"


def metadata_csv(root: Path, *rows: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.csv").write_text(HEADER + "".join(rows))
    return root


def wilds(root: Path, *extra: str) -> Path:
    """Classes 0..2 over train, val and test experiments, two sites a well."""
    rows = [row(w, s, split, label, experiment=e) for w, split, label, e in
            (("B02", "train", 0, "RPE-01"), ("B03", "train", 1, "RPE-01"), ("B04", "val", 2, "RPE-02"),
             ("B05", "test", 1, "RPE-03")) for s in (1, 2)]
    return metadata_csv(root, *rows, *extra)


# ------------------------------------------------------------------------------------- layouts


def test_the_layout_is_told_by_its_files_and_the_dataset_column(tmp_path):
    assert metadata.detect_layout(wilds(tmp_path / "w")) == "wilds"
    release = metadata_csv(tmp_path / "r", row("B02", 1), row("B03", 1, "test", ""))
    assert metadata.detect_layout(release) == "release"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.csv").write_text("id_code\n")
    (tmp_path / "c" / "metadata.csv").write_text("dataset\nval\n")  # train.csv decides first
    assert metadata.detect_layout(tmp_path / "c") == "competition"


def test_a_metadata_csv_that_does_not_say_its_dataset(tmp_path):
    root = tmp_path / "no_dataset"
    root.mkdir()
    (root / "metadata.csv").write_text("site_id,well_id\nA,B\n")
    with refused(f"{root / 'metadata.csv'}: missing column(s) cell_type, dataset, experiment, plate, well, site, "
                 "well_type, sirna_id (found: site_id, well_id)"):
        metadata.detect_layout(root)
    (root / "metadata.csv").write_text("")
    with refused(f"{root / 'metadata.csv'}: cannot parse CSV (No columns to parse from file)"):
        metadata.detect_layout(root)


def test_wilds_reads_every_split_and_keeps_test_labels_hidden(tmp_path):
    wells = metadata.load_wells(wilds(tmp_path))
    assert wells["split"].tolist() == ["test", "train", "train", "val"]
    assert wells["sirna_true"].tolist() == [1, 0, 1, 2] and wells["sirna"].tolist() == [-1, 0, 1, 2]
    table = metadata.load_table(tmp_path)
    assert len(table) == 8 and table["image_prefix"].iloc[0] == f"{tmp_path.as_posix()}/images/RPE-03/Plate1/B05_s1"


@pytest.mark.parametrize("label, line, shown, n", [("4", 10, "label 4", 4), ("-1", 10, "label -1", 4),
                                                   ("7", 10, "label 7", 4)])
def test_wilds_labels_must_number_the_classes_from_0(tmp_path, label, line, shown, n):
    root = wilds(tmp_path, row("C02", 1, "val", label, experiment="RPE-02"))
    with refused(f"{root / 'metadata.csv'} line {line}, column sirna_id: {shown} is outside 0..{n - 1} (its rows use "
                 f"{n} distinct labels, and RxRx1-WILDS numbers its N classes 0..N-1, every one present)"):
        metadata.load_wells(root)


def test_wilds_labels_every_row_and_knows_its_splits(tmp_path):
    root = wilds(tmp_path / "a", row("C02", 1, "test", "", experiment="RPE-03"))
    with refused(f"{root / 'metadata.csv'} line 10, column sirna_id: an empty value is not an integer"):
        metadata.load_wells(root)
    root = wilds(tmp_path / "b", row("C02", 1, "holdout", "1", experiment="RPE-04"))
    with refused(f"{root / 'metadata.csv'}: unexpected value 'holdout' (expected one of train, val, test)"):
        metadata.load_wells(root)
    # the release layout knows no val: a file with val is read as RxRx1-WILDS
    root = metadata_csv(tmp_path / "c", row("B02", 1), row("B03", 1, "holdout"))
    with refused(f"{root / 'metadata.csv'}: unexpected value 'holdout' (expected one of train, test)"):
        metadata.load_wells(root)


def test_a_train_row_needs_its_label(tmp_path):
    root = metadata_csv(tmp_path, row("B02", 1), row("B02", 2), row("B03", 1, label=""), row("B04", 1, "test", ""))
    with refused(f"{root / 'metadata.csv'} line 4: train site RPE-01_1_B03_1 has no sirna_id "
                 "(every train row needs its label)"):
        metadata.load_wells(root)


@pytest.mark.parametrize("field, changed, shown, values", [
    ("experiment", dict(experiment="RPE-09"), "experiment", "RPE-01 vs RPE-09"),
    ("cell_type", dict(cell="HUVEC"), "cell_type", "RPE vs HUVEC"),
    ("plate", dict(plate=2), "plate", "1 vs 2"),
    ("split", dict(split="test"), "dataset", "train vs test"),
    ("well_type", dict(kind="negative_control"), "well_type", "treatment vs negative_control"),
    ("sirna_true", dict(label="4"), "sirna_id", "0 vs 4"),
])
def test_the_sites_of_a_well_must_agree_on_each_field(tmp_path, field, changed, shown, values):
    """The third site of the second well disagrees: its first line and its own are named."""
    other = row("B03", 3, **changed).split(",")
    other[1] = "RPE-01_1_B03"  # the same well id, whatever the changed field makes of its name
    root = metadata_csv(tmp_path, row("B02", 1, label="5"), row("B03", 1), row("B02", 2, label="5"), row("B03", 2),
                        ",".join(other))
    with refused(f"{root / 'metadata.csv'} lines 3 and 6: the sites of well RPE-01_1_B03 disagree on {shown} "
                 f"({values})"):
        metadata.load_table(root)


def test_a_file_there_but_unreadable_says_cannot_read(tmp_path, monkeypatch):
    root = metadata_csv(tmp_path, row("B02", 1))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(metadata.pd, "read_csv", denied)
    with refused(f"cannot read {root / 'metadata.csv'}: Permission denied"):
        metadata.read_csv(root / "metadata.csv", ["site_id"])
    monkeypatch.setattr(metadata.pd, "read_csv", lambda *a, **k: (_ for _ in ()).throw(OSError("device gone")))
    with refused(f"cannot read {root / 'metadata.csv'}: device gone"):
        metadata.read_csv(root / "metadata.csv", ["site_id"])


# ---------------------------------------------------------------------------- files of a data set


def test_input_files_are_the_metadata_files_there(tmp_path):
    for name in ("train.csv", "test_controls.csv", "pixel_stats.csv", "notes.csv"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "test.csv").mkdir()  # a folder is no input file
    assert metadata.input_files(tmp_path) == [tmp_path / "train.csv", tmp_path / "test_controls.csv",
                                              tmp_path / "pixel_stats.csv"]
    release = metadata_csv(tmp_path / "r", row("B02", 1))
    assert metadata.input_files(str(release)) == [release / "metadata.csv"]


def test_the_file_that_lists_a_splits_controls(tmp_path):
    competition = tmp_path / "c"
    competition.mkdir()
    (competition / "train.csv").write_text("id_code\n")
    assert [metadata.control_file(competition, s) for s in ("train", "val", "test")] == [
        competition / "train_controls.csv", competition / "train_controls.csv", competition / "test_controls.csv"]
    release = metadata_csv(tmp_path / "r", row("B02", 1))
    assert metadata.control_file(str(release), "test") == release / "metadata.csv"


def test_site_files_from_composites_or_channels_and_a_missing_image_named(tmp_path):
    root = wilds(tmp_path / "w")
    table = metadata.load_table(root)
    with refused(f"{root}: missing image: {table['image_prefix'].iloc[0]}.png (no image found for the first 8 "
                 "site(s) of the metadata)"):
        metadata.site_files(root, table)
    prefix = Path(table["image_prefix"].iloc[3])
    prefix.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(f"{prefix}.png")
    assert metadata.site_files(root, table) == metadata.SiteFiles(3, composite=True)
    release = metadata_csv(tmp_path / "r", row("B02", 1), row("B03", 1, "test", ""))
    table = metadata.load_table(release)
    prefix = Path(table["image_prefix"].iloc[1])
    prefix.parent.mkdir(parents=True)
    for channel in (1, 2, 3, 4, 5):
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(f"{prefix}_w{channel}.png")
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(f"{prefix}.png")  # not read: not a wilds set
    assert metadata.site_files(release, table) == metadata.SiteFiles(5)
    assert pd.read_csv(release / "metadata.csv")["dataset"].tolist() == ["train", "test"]


def test_a_place_named_twice_in_metadata_csv_names_the_file_and_lines(tmp_path):
    moved = row("B03", 1).replace("RPE-01_1_B03", "RPE-01_1_B02x").replace(",B03,", ",B02,")
    root = metadata_csv(tmp_path, row("B02", 1), row("B03", 2), moved)
    with refused(f"{root / 'metadata.csv'} line 4 repeats line 2: the same site or well "
                 "(split train, experiment RPE-01, plate 1, well B02)"):
        metadata.load_wells(root)
    with refused(f"{root / 'metadata.csv'} line 4 repeats line 2: the same site or well "
                 "(split train, experiment RPE-01, plate 1, well B02, site 1)"):
        metadata.load_table(root)


def test_a_place_named_in_two_files_names_both(tmp_path):
    files = {"train.csv": "id_code,experiment,plate,well,sirna\nH-01_1_B02,H-01,1,B02,0\nH-01_1_B03,H-01,1,B03,1\n",
             "test.csv": "id_code,experiment,plate,well\nH-02_1_B02,H-02,1,B02\n",
             "train_controls.csv": "id_code,experiment,plate,well,sirna,well_type\n"
                                   "H-01_1_B04,H-01,1,B04,2,negative_control\nH-01_1_B03c,H-01,1,B03,2,negative_control\n",
             "test_controls.csv": "id_code,experiment,plate,well,sirna,well_type\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with refused(f"{tmp_path / 'train_controls.csv'} line 3 repeats {tmp_path / 'train.csv'} line 3: the same site or "
                 "well (split train, experiment H-01, plate 1, well B03)"):
        metadata.load_wells(tmp_path)
