"""The metadata readers (metadata.py) and what is derived from them (structure.py) on small CSVs
written here: both layouts into one table, the hidden test labels, the checks of every column,
and the exact one-line message of each refusal (it names the file, the line or the value)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellpaint.data import metadata
from cellpaint.core.errors import DataError, UsageError
from cellpaint.data.structure import derive_structure


def refused(message: str):
    return pytest.raises(DataError, match="^" + re.escape(message) + "$")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.strip() + "\n")
    return path


def competition(root: Path, train_extra: str = "", controls_extra: str = "", images: bool = False) -> Path:
    """Two experiments: HEPG2-01 (train, plates 1 and 2) and HEPG2-02 (test, plate 1)."""
    write(root / "train.csv", "id_code,experiment,plate,well,sirna\n"
                              "HEPG2-01_1_B02,HEPG2-01,1,B02,0\nHEPG2-01_1_B03,HEPG2-01,1,B03,1\n"
                              "HEPG2-01_2_B02,HEPG2-01,2,B02,2\nHEPG2-01_2_B03,HEPG2-01,2,B03,3\n" + train_extra)
    write(root / "test.csv", "id_code,experiment,plate,well\nHEPG2-02_1_B03,HEPG2-02,1,B03\n"
                             "HEPG2-02_1_B02,HEPG2-02,1,B02\n")
    write(root / "train_controls.csv", "id_code,experiment,plate,well,sirna,well_type\n"
                                       "HEPG2-01_1_B04,HEPG2-01,1,B04,4,positive_control\n" + controls_extra)
    write(root / "test_controls.csv", "id_code,experiment,plate,well,sirna,well_type\n"
                                      "HEPG2-02_1_B04,HEPG2-02,1,B04,5,negative_control\n")
    if images:
        for split, experiment, plate, well in (("train", "HEPG2-01", 1, "B02"), ("test", "HEPG2-02", 1, "B04")):
            folder = root / split / experiment / f"Plate{plate}"
            folder.mkdir(parents=True, exist_ok=True)
            for site in (1, 3):
                Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / f"{well}_s{site}_w1.png")
            (folder / "notes.txt").write_text("not an image")
    return root


RELEASE_HEADER = "site_id,well_id,cell_type,dataset,experiment,plate,well,site,well_type,sirna,sirna_id\n"


def release(root: Path, extra: str = "") -> Path:
    rows = []
    for well, split, kind, label in (("B02", "train", "treatment", 0), ("B03", "train", "treatment", 1),
                                     ("B04", "train", "positive_control", 2), ("C02", "test", "treatment", 1),
                                     ("C03", "test", "treatment", 0), ("C04", "test", "negative_control", 3)):
        experiment = "RPE-01" if split == "train" else "RPE-02"
        for site in (1, 2):
            rows.append(f"{experiment}_1_{well}_{site},{experiment}_1_{well},RPE,{split},{experiment},1,{well},{site},"
                        f"{kind},s{label},{label}")
    write(root / "metadata.csv", RELEASE_HEADER + "\n".join(rows) + "\n" + extra)
    return root


# ------------------------------------------------------------------------------------ layouts


def test_the_competition_layout_as_wells(tmp_path):
    wells = metadata.load_wells(competition(tmp_path))
    assert list(wells.columns) == metadata.WELL_COLUMNS and wells.index.equals(pd.RangeIndex(8))
    assert wells["id_code"].tolist() == ["HEPG2-02_1_B02", "HEPG2-02_1_B03", "HEPG2-02_1_B04",   # split, experiment,
                                         "HEPG2-01_1_B02", "HEPG2-01_1_B03", "HEPG2-01_1_B04",   # plate, well order
                                         "HEPG2-01_2_B02", "HEPG2-01_2_B03"]
    assert wells["split"].tolist() == ["test"] * 3 + ["train"] * 5
    assert wells["well_type"].tolist() == ["treatment", "treatment", "negative_control", "treatment", "treatment",
                                           "positive_control", "treatment", "treatment"]
    assert wells["sirna"].tolist() == [-1, -1, 5, 0, 1, 4, 2, 3]  # test treatments unlabelled, controls known
    assert wells["sirna_true"].tolist() == wells["sirna"].tolist()
    assert set(wells["cell_type"]) == {"HEPG2"} and wells["leaked"].dtype == bool and not wells["leaked"].any()
    assert wells["plate"].dtype == np.int64 and wells["sirna"].dtype == np.int64
    assert all(isinstance(v, str) for c in ("id_code", "experiment", "well", "well_type", "split")
               for v in wells[c])


def test_the_competition_layout_as_sites(tmp_path):
    table = metadata.load_table(competition(tmp_path, images=True))
    assert list(table.columns) == metadata.SITE_COLUMNS
    assert sorted(set(table["site"])) == [1, 3] and len(table) == 16  # the sites found on disk, for every well
    first = table.iloc[0]
    assert (first["id_code"], first["site"]) == ("HEPG2-02_1_B02", 1)
    assert first["image_prefix"] == f"{tmp_path.as_posix()}/test/HEPG2-02/Plate1/B02_s1"
    assert table.iloc[1]["image_prefix"] == f"{tmp_path.as_posix()}/test/HEPG2-02/Plate1/B02_s3"
    assert metadata.wells_of(table).equals(metadata.load_wells(tmp_path))


def test_the_release_layout(tmp_path):
    table = metadata.load_table(release(tmp_path))
    assert len(table) == 12 and list(table.columns) == metadata.SITE_COLUMNS
    test = table[table["split"] == "test"]
    # test labels are ground truth only: hidden from training unless asked for
    assert test["sirna"].tolist() == [-1, -1, -1, -1, 3, 3] and test["sirna_true"].tolist() == [1, 1, 0, 0, 3, 3]
    assert table.iloc[0]["image_prefix"] == f"{tmp_path.as_posix()}/images/RPE-02/Plate1/C02_s1"  # test first
    assert (table["cell_type"] == "RPE").all()
    shown = metadata.load_table(tmp_path, test_labels_for_training=True)
    assert shown.loc[shown["split"] == "test", "sirna"].tolist() == [1, 1, 0, 0, 3, 3]
    wells = metadata.load_wells(tmp_path)
    assert len(wells) == 6 and list(wells.columns) == metadata.WELL_COLUMNS
    assert wells.loc[wells["split"] == "test", "sirna"].tolist() == [-1, -1, 3]  # hidden by default here too
    assert metadata.load_wells(tmp_path, True).loc[wells["split"] == "test", "sirna"].tolist() == [1, 0, 3]
    assert metadata.fingerprint(table) == metadata.fingerprint(wells)
    # nor does the row numbering count: a data set is its wells, not a table's index
    assert metadata.fingerprint(wells.set_axis(range(100, 106))) == metadata.fingerprint(wells)


def test_release_sites_in_site_order_and_a_wells_row_from_its_first_site(tmp_path):
    """metadata.csv may list a well's sites in any order: the table is in site order, and its
    per-well view is the well's row of load_wells. Sites that disagree on the well are refused."""
    write(tmp_path / "metadata.csv", RELEASE_HEADER
          + "RPE-01_1_B02_2,RPE-01_1_B02,RPE,train,RPE-01,1,B02,2,treatment,s1,1\n"
          + "RPE-01_1_B02_1,RPE-01_1_B02,RPE,train,RPE-01,1,B02,1,treatment,s1,1\n")
    table = metadata.load_table(tmp_path)
    assert table["site"].tolist() == [1, 2] and table["image_prefix"].str[-2:].tolist() == ["s1", "s2"]
    assert metadata.wells_of(table).equals(metadata.load_wells(tmp_path))
    write(tmp_path / "metadata.csv", RELEASE_HEADER
          + "RPE-01_1_B02_2,RPE-01_1_B02,RPE,train,RPE-01,1,B02,2,treatment,s0,0\n"
          + "RPE-01_1_B02_1,RPE-01_1_B02,RPE,train,RPE-01,1,B02,1,treatment,s1,1\n")
    with refused(f"{tmp_path / 'metadata.csv'} lines 2 and 3: the sites of well RPE-01_1_B02 disagree on sirna_id "
                 "(0 vs 1)"):
        metadata.load_wells(tmp_path)


def test_whole_numbers_written_as_decimals_load_as_integers(tmp_path):
    root = competition(tmp_path, train_extra="HEPG2-01_2_B04,HEPG2-01,2.0,B04,2.0\n", images=True)
    wells = metadata.load_wells(root).set_index("id_code")
    assert wells.loc["HEPG2-01_2_B04", ["plate", "sirna"]].tolist() == [2, 2]
    assert wells["plate"].dtype == np.int64 and wells["sirna"].dtype == np.int64
    prefixes = metadata.load_table(root).set_index("id_code")["image_prefix"]
    assert prefixes.loc["HEPG2-01_2_B04"].tolist() == [f"{root.as_posix()}/train/HEPG2-01/Plate2/B04_s{s}" for s in (1, 3)]


def test_an_unlabelled_release_row_reads_as_minus_one(tmp_path):
    text = (tmp_path / "metadata.csv")
    release(tmp_path, "RPE-02_1_C05_1,RPE-02_1_C05,RPE,test,RPE-02,1,C05,1,treatment,,\n")
    assert metadata.load_wells(tmp_path).set_index("id_code").loc["RPE-02_1_C05", "sirna_true"] == -1
    assert text.exists()


def test_the_fingerprint_follows_the_labels_not_the_path_or_order(tmp_path):
    a = metadata.load_wells(competition(tmp_path / "a"))
    b = metadata.load_wells(competition(tmp_path / "b"))
    assert metadata.fingerprint(a) == metadata.fingerprint(b.iloc[::-1])
    assert len(metadata.fingerprint(a)) == 16
    changed = a.copy()
    changed.loc[3, "sirna_true"] = 7
    assert metadata.fingerprint(changed) != metadata.fingerprint(a)


# ------------------------------------------------------------------------------------ refusals


def test_refusals_of_the_competition_files(tmp_path):
    root = competition(tmp_path / "d")
    with refused(f"data directory {tmp_path / 'nowhere'} does not exist. Point --data at the competition data "
                 "(kaggle competitions download -c recursion-cellular-image-classification: train.csv, test.csv, "
                 "...) or the RxRx1 release (https://www.rxrx.ai/rxrx1: metadata.csv, images/), or make a "
                 "synthetic set with: python synthetic.py DIR"):
        metadata.load_wells(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with refused(f"{tmp_path / 'empty'} holds neither train.csv (competition layout) nor metadata.csv "
                 "(RxRx1 release or RxRx1-WILDS layout)"):
        metadata.load_wells(tmp_path / "empty")
    assert metadata.detect_layout(root) == "competition" and metadata.detect_layout(release(tmp_path / "r")) == "release"
    write(root / "test.csv", "id_code,experiment,well\nA_1_B02,A,B02")
    with refused(f"{root / 'test.csv'}: missing column(s) plate (found: id_code, experiment, well)"):
        metadata.load_wells(root)
    write(root / "test.csv", "id_code,well\nA_1_B02,B02")
    with refused(f"{root / 'test.csv'}: missing column(s) experiment, plate (found: id_code, well)"):
        metadata.load_wells(root)
    (root / "test.csv").unlink()
    with refused(f"missing file: {root / 'test.csv'}"):
        metadata.load_wells(root)
    write(root / "test.csv", "")
    with pytest.raises(DataError, match="^" + re.escape(f"{root / 'test.csv'}: cannot parse CSV (")):
        metadata.load_wells(root)


@pytest.mark.parametrize("extra, message", [
    ("HEPG2-01_2_B04,HEPG2-01,2,B04,3.7\n", "train.csv line 6, column sirna: '3.7' is not an integer"),
    ("HEPG2-01_2_B04,HEPG2-01,2.5,B04,3\n", "train.csv line 6, column plate: '2.5' is not an integer"),
    ("HEPG2-01_2_B04,HEPG2-01,2,B04,\n", "train.csv line 6, column sirna: an empty value is not an integer"),
    ("HEPG2-01_2_B04,HEPG2-01,2,B04,inf\n", "train.csv line 6, column sirna: 'inf' is not an integer"),
    ("HEPG2-01_2_B04,HEPG2-01,2,B04,x\n", "train.csv line 6, column sirna: 'x' is not an integer"),
])
def test_a_number_that_is_not_an_integer_is_refused_with_its_line(tmp_path, extra, message):
    root = competition(tmp_path, train_extra=extra)
    with refused(f"{root}/{message}"):
        metadata.load_wells(root)


def test_refusals_of_values_and_duplicates(tmp_path):
    root = competition(tmp_path / "a", controls_extra="HEPG2-01_1_B05,HEPG2-01,1,B05,4,control\n")
    with refused(f"{root / 'train_controls.csv'}: unknown well_type 'control' (expected one of positive_control, "
                 "negative_control)"):
        metadata.load_wells(root)
    root = competition(tmp_path / "b", train_extra="HEPG2-01_1_B02,HEPG2-01,1,B02,0\n")
    # (numpy 2 showed the plate as np.int64(1) in this line)
    with refused(f"{root / 'train.csv'} line 6 repeats line 2: the same site or well "
                 "(split train, experiment HEPG2-01, plate 1, well B02)"):
        metadata.load_wells(root)
    root = competition(tmp_path / "b2", train_extra="HEPG2-01_1_B02x,HEPG2-01,1,B02,3\n")  # the same well, relabelled
    with refused(f"{root / 'train.csv'} line 6 repeats line 2: the same site or well "
                 "(split train, experiment HEPG2-01, plate 1, well B02)"):
        metadata.load_wells(root)
    root = competition(tmp_path / "c2", controls_extra="HEPG2-02_1_B02,HEPG2-01,1,B06,4,positive_control\n"
                                                      "HEPG2-01_1_B03,HEPG2-01,1,B07,4,positive_control\n")
    with refused("id_code HEPG2-02_1_B02 names 2 wells (test treatment, train positive_control); "
                 "2 id_code(s) are used more than once"):
        metadata.load_wells(root)
    root = competition(tmp_path / "c", controls_extra="HEPG2-01_1_B02,HEPG2-01,1,B06,4,positive_control\n")
    with refused("id_code HEPG2-01_1_B02 names 2 wells (train treatment, train positive_control); "
                 "1 id_code(s) are used more than once"):
        metadata.load_wells(root)
    for bad, value in (("treatment", "holdout"), ("well_type", "empty")):
        r = release(tmp_path / bad, f"RPE-09_1_B02_1,RPE-09_1_B02,RPE,{value if bad == 'treatment' else 'train'},"
                                    f"RPE-09,1,B02,1,{value if bad == 'well_type' else 'treatment'},s0,0\n")
        allowed = "train, test" if bad == "treatment" else "treatment, positive_control, negative_control"
        with refused(f"{r / 'metadata.csv'}: unexpected value {value!r} (expected one of {allowed})"):
            metadata.load_wells(r)
    for column, row in (("site", "RPE-09,1,B02,1.5,treatment,s0,0"), ("plate", "RPE-09,x,B02,1,treatment,s0,0"),
                        ("sirna_id", "RPE-09,1,B02,1,treatment,s0,0.5")):
        r = release(tmp_path / column, f"RPE-09_1_B02_x,RPE-09_1_B02,RPE,train,{row}\n")
        shown = {"site": "'1.5'", "plate": "'x'", "sirna_id": "'0.5'"}[column]
        with refused(f"{r / 'metadata.csv'} line 14, column {column}: {shown} is not an integer"):
            metadata.load_table(r)


def test_no_images_is_refused(tmp_path):
    root = competition(tmp_path)
    with refused(f"no images found under {root / 'train'} or {root / 'test'} "
                 "(expected {split}/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png)"):
        metadata.load_table(root)


# ----------------------------------------------------------------------------------- structure


def test_structure_of_the_competition_files(tmp_path):
    structure = derive_structure(metadata.load_wells(competition(tmp_path)))
    assert structure.n_classes == 6 and structure.n_groups == 2
    assert structure.treatment_classes.tolist() == [0, 1, 2, 3] and structure.control_classes.tolist() == [4, 5]
    assert [g.tolist() for g in structure.groups] == [[0, 1], [2, 3]]
    assert structure.cell_types == ("HEPG2",)
    assert structure.group_masks().tolist() == [[True, True, False, False, False, False],
                                                [False, False, True, True, False, False]]
    assert structure.group_masks().dtype == bool
    assert structure.group_masks(8).shape == (2, 8)  # over a prediction file's columns
    assert derive_structure(metadata.load_wells(tmp_path), n_classes=9).n_classes == 9


def test_plate_groups_join_classes_that_share_any_plate(tmp_path):
    """Plate 3 holds classes of both groups of plates 1 and 2: they are one group."""
    root = competition(tmp_path, train_extra="HEPG2-01_3_B02,HEPG2-01,3,B02,1\nHEPG2-01_3_B03,HEPG2-01,3,B03,3\n")
    assert [g.tolist() for g in derive_structure(metadata.load_wells(root)).groups] == [[0, 1, 2, 3]]


def table_of(*wells: tuple) -> pd.DataFrame:
    """Wells (split, experiment, plate, well_type, sirna, sirna_true) as a metadata table."""
    return pd.DataFrame([{"id_code": f"{e}_{p}_{i}", "split": s, "experiment": e, "plate": p, "well": str(i),
                          "well_type": t, "cell_type": e.split("-")[0], "sirna": l, "sirna_true": tl, "leaked": False}
                         for i, (s, e, p, t, l, tl) in enumerate(wells)])


def test_a_class_known_only_as_ground_truth_or_only_through_a_layout_match_has_a_well():
    base = [("train", "A-1", 1, "treatment", 1, 1), ("train", "A-1", 1, "treatment", 2, 2)]
    hidden = derive_structure(table_of(*base, ("test", "A-2", 1, "treatment", -1, 0)))  # a release test label
    leaked = derive_structure(table_of(*base, ("test", "A-2", 1, "treatment", 0, -1)))  # a layout match
    assert hidden.n_classes == leaked.n_classes == 3
    assert hidden.treatment_classes.tolist() == [1, 2] and leaked.treatment_classes.tolist() == [0, 1, 2]


def test_a_group_of_one_class_and_the_order_of_groups():
    """Plates holding {9} alone, {0, 7} and {1, 2}: groups in the order of their smallest class."""
    structure = derive_structure(table_of(("train", "A-1", 1, "treatment", 9, 9), ("train", "A-1", 2, "treatment", 7, 7),
                                          ("train", "A-1", 2, "treatment", 0, 0), ("train", "A-1", 3, "treatment", 2, 2),
                                          ("train", "A-1", 3, "treatment", 1, 1)), n_classes=10)
    assert [g.tolist() for g in structure.groups] == [[0, 7], [1, 2], [9]]


def test_groups_are_ordered_by_their_smallest_class(tmp_path):
    root = tmp_path
    competition(root)
    text = (root / "train.csv").read_text().replace(",0\n", ",9\n").replace(",1\n", ",8\n")
    (root / "train.csv").write_text(text)  # plate 1 now holds 9 and 8, plate 2 holds 2 and 3
    structure = derive_structure(metadata.load_wells(root), n_classes=10)
    assert [g.tolist() for g in structure.groups] == [[2, 3], [8, 9]]


def test_structure_refusals(tmp_path):
    wells = metadata.load_wells(competition(tmp_path / "a"))
    with pytest.raises(UsageError, match=r"^--classes 5 is smaller than the 6 classes in the metadata$"):
        derive_structure(wells, n_classes=5)
    with refused("the metadata has no labelled wells: nothing to train on or score against"):
        derive_structure(wells.assign(sirna=-1, sirna_true=-1))
    with refused("the metadata has no labelled treatment wells in train: nothing to train on (an empty "
                 "train.csv, or a metadata.csv without train treatment rows?)"):
        derive_structure(wells[wells["well_type"] != "treatment"])
    six = table_of(*[("train", "A-1", 1, "treatment", c, c) for c in range(7)],
                   *[("train", "A-1", 2, "positive_control", c, c) for c in range(7)])
    with refused("classes [0, 1, 2, 3, 4] occur both as treatment and as control"):  # the first five named
        derive_structure(six)
    with refused("classes [4] occur both as treatment and as control"):
        derive_structure(wells.assign(sirna=wells["sirna"].replace({3: 4}), sirna_true=wells["sirna_true"].replace({3: 4})),
                         n_classes=6)
    far = wells.copy()
    far.loc[far["id_code"] == "HEPG2-01_2_B03", ["sirna", "sirna_true"]] = 40
    with refused("labels leave 35 class(es) without any well (3, 6..39): is label 40 of train well HEPG2-01_2_B03 "
                 "a typo? (3 well(s) above the gap; --classes N allows classes that no well has)"):
        derive_structure(far)
    three = table_of(("train", "A-1", 1, "treatment", 0, 0), ("train", "A-1", 1, "treatment", 2, 2),
                     ("train", "A-1", 1, "treatment", 4, 4), ("test", "A-2", 1, "treatment", -1, 9))
    with refused("labels leave 6 class(es) without any well (1, 3, 5..8): is label 9 of test well A-2_1_3 a typo? "
                 "(3 well(s) above the gap; --classes N allows classes that no well has)"):
        derive_structure(three)  # exactly three spans: no "..."; the highest label a hidden test label
    gaps = wells.copy()
    for code, label in (("HEPG2-01_1_B03", 7), ("HEPG2-01_2_B02", 9), ("HEPG2-01_2_B03", 13), ("HEPG2-01_1_B02", 15)):
        gaps.loc[gaps["id_code"] == code, ["sirna", "sirna_true"]] = label
    with refused("labels leave 10 class(es) without any well (0..3, 6, 8, ...): is label 15 of train well "
                 "HEPG2-01_1_B02 a typo? (6 well(s) above the gap; --classes N allows classes that no well has)"):
        derive_structure(gaps)
