"""The prediction-file format (prediction_file.py) at its edges: the pickles it reads (protocols 2
to 5, numpy's old module spelling, the containers it allows and nothing else), what it writes
(float32 vectors, pickle protocol 4), its reduction to well sums (row order, NaN found in the
right part and well), and the exact one-line message of every refusal, naming the file."""
from __future__ import annotations

import collections
import errno
import gc
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from cellpaint.core.errors import OutputError
from cellpaint.data import prediction_file as pf
from cellpaint.data.prediction_file import PredictionFileError


def refused(message: str, kind=PredictionFileError):
    return pytest.raises(kind, match="^" + re.escape(message) + "$")


def vec(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def dump(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


PREDICTIONS = {"test": {"X_1_B02": [vec(1, 2, 3), vec(0, 1, 0)], "X_1_A01": [vec(0, 0, 1)]},
               "val": {"T_1_B02": [vec(5, 0, 0), vec(1, 0, 0)]}}


# ------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_of_numpy_arrays_loads(tmp_path, protocol):
    path = dump(tmp_path / "a.output", PREDICTIONS, protocol)
    loaded = pf.load_predictions(path)
    assert set(loaded) == {"test", "val"}
    np.testing.assert_array_equal(loaded["test"]["X_1_B02"][0], [1, 2, 3])
    sums = pf.load_well_sums(path)
    assert sums.ids["test"].tolist() == ["X_1_A01", "X_1_B02"]
    np.testing.assert_array_equal(sums.matrix, [[6, 0, 0], [0, 0, 1], [1, 3, 3]])  # val rows, then test rows


def test_numpys_old_module_spelling_loads(tmp_path):
    """Files written before numpy 2 name numpy.core, not numpy._core."""
    data = pickle.dumps(PREDICTIONS, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in data
    (tmp_path / "old.output").write_bytes(data)
    np.testing.assert_array_equal(pf.load_predictions(tmp_path / "old.output")["val"]["T_1_B02"][1], [1, 0, 0])


def test_allowed_containers_load_and_other_objects_fail_the_structure_check(tmp_path):
    ordered = {"test": collections.OrderedDict([("X_1_B02", [vec(1, 2)])])}
    assert pf.load_predictions(dump(tmp_path / "o.output", ordered))["test"]["X_1_B02"][0].tolist() == [1, 2]
    # a numpy scalar and a bytearray are rebuilt (they are harmless), then refused as site vectors
    for what, site in (("float32", np.float32(1)), ("bytearray", bytearray(b"ab"))):
        path = dump(tmp_path / f"{what}.output", {"test": {"X_1_B02": [site]}})
        with refused(f"{path}: test['X_1_B02'] holds {what}; expected 1-D numeric logit vectors"):
            pf.load_predictions(path)


def test_code_and_external_objects_are_refused_before_they_run(tmp_path):
    path = dump(tmp_path / "evil.output", {"test": {"X": [collections.Counter()]}})
    with refused(f"refusing to load {path}: it contains collections.Counter, which could run code "
                 "(a prediction file holds only dicts, lists, numbers, strings and numpy arrays)"):
        pf.load_predictions(path)

    class External(pickle.Pickler):
        def persistent_id(self, obj):
            return "outside" if isinstance(obj, list) else None

    with open(tmp_path / "ext.output", "wb") as f:
        External(f, protocol=4).dump({"test": {"X": [vec(1)]}})
    with refused(f"refusing to load {tmp_path / 'ext.output'}: it references an external object"):
        pf.load_predictions(tmp_path / "ext.output")


def test_unreadable_files_are_named(tmp_path, monkeypatch):
    with refused(f"prediction file {tmp_path / 'none.output'} does not exist"):
        pf.load_predictions(tmp_path / "none.output")
    (tmp_path / "bad.output").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(PredictionFileError, match="^" + re.escape(f"{tmp_path / 'bad.output'} is not a readable "
                                                                   "prediction file (UnpicklingError: ")):
        pf.load_predictions(tmp_path / "bad.output")
    path = dump(tmp_path / "a.output", PREDICTIONS)

    def failing_open(errno_, text):
        def fake(*args, **kwargs):
            raise OSError(errno_, text) if errno_ else OSError(text)
        return fake
    monkeypatch.setattr(pf, "open", failing_open(errno.EIO, "Input/output error"), raising=False)
    with refused(f"cannot read prediction file {path}: Input/output error"):
        pf.load_predictions(path)
    monkeypatch.setattr(pf, "open", failing_open(None, "the disk went away"), raising=False)
    with refused(f"cannot read prediction file {path}: the disk went away"):
        pf.load_predictions(path)


def test_loading_leaves_the_garbage_collector_as_it_was(tmp_path):
    path = dump(tmp_path / "a.output", PREDICTIONS)
    assert gc.isenabled()
    pf.load_well_sums(path)
    pf.load_predictions(path)
    assert gc.isenabled()
    gc.disable()
    try:
        pf.load_predictions(path)
        assert not gc.isenabled()
    finally:
        gc.enable()


# --------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("obj, message", [
    ([1], "X: expected a dict with parts 'test', 'val', found list"),
    ({"test": {}, "extra": {}}, "X: unexpected part(s) 'extra' (expected 'test', 'val')"),
    ({"b": {}, "a": {}}, "X: unexpected part(s) 'b', 'a' (expected 'test', 'val')"),
    ({"train": {}, "test": {}}, "X: unexpected part(s) 'train' (expected 'test', 'val'); a 'train' part belongs to "
                                "an embeddings file (main.py --save-embeddings), which make_submission.py reads with "
                                "--knn"),
    ({"test": []}, "X: part 'test' must map id_code -> list of site logits, found list"),
    ({"test": {"A": [vec(1)]}, "val": {"A": [vec(1)]}}, "X: well 'A' is in more than one part"),
    ({"test": {5: [vec(1)]}}, "X: part 'test' has a non-string id 5"),
    ({"test": {"A": []}}, "X: test['A'] must be a non-empty list of per-site logit vectors, found list"),
    ({"test": {"A": vec(1)}}, "X: test['A'] must be a non-empty list of per-site logit vectors, found ndarray"),
    ({"test": {"A": [np.zeros((2, 2))]}}, "X: test['A'] holds an array of shape (2, 2) and dtype float64; "
                                          "expected 1-D numeric logit vectors"),
    ({"test": {"A": [np.array(["a"])]}}, "X: test['A'] holds an array of shape (1,) and dtype <U1; expected 1-D "
                                         "numeric logit vectors"),
    ({"test": {"A": ["text"]}}, "X: test['A'] holds str; expected 1-D numeric logit vectors"),
    ({"test": {"A": [vec(1, 2, 3)], "B": [vec(1, 2)]}}, "X: test['B'] has 2 classes, other wells have 3"),
    ({"test": {"A": [vec(1, 2, 3), vec(1, 2)]}}, "X: test['A'] has 2 classes, other wells have 3"),
])
def test_structure_refusals_name_the_file_part_and_well(obj, message):
    with refused(message):
        pf.check_predictions(obj, "X")


def test_check_predictions_returns_the_vector_length():
    assert pf.check_predictions(PREDICTIONS) == 3
    assert pf.check_predictions({"test": {}, "val": {}}) == 0
    assert pf.check_predictions({"test": {"A": [np.arange(4)]}}) == 4  # integers are numbers too
    with refused("predictions: expected a dict with parts 'test', 'val', found str"):
        pf.check_predictions("x")  # the default name
    with refused("X: unexpected part(s) 'x' (expected 'train', 'val', 'test')"):
        pf.check_predictions({"x": {}}, "X", pf.EMBEDDING_PARTS)


# ------------------------------------------------------------------------------------ writing


def test_files_are_written_as_float32_vectors_in_pickle_protocol_4(tmp_path):
    path = tmp_path / "net.output"
    pf.save_predictions(path, {"test": {"X_1_B02": [np.arange(3, dtype=np.float64)[::-1]]}})
    assert path.read_bytes()[:2] == b"\x80\x04"  # protocol 4: what the 1st place's tools read
    loaded = pf.load_predictions(path)["test"]["X_1_B02"][0]
    assert loaded.dtype == np.float32 and loaded.flags.c_contiguous and loaded.tolist() == [2, 1, 0]
    assert pf.load_predictions(path)["val"] == {}  # a missing part comes back empty


def test_the_kind_of_file_comes_from_its_name_or_is_given(tmp_path):
    parts = {"train": {"T_1_A": [vec(1)]}, "test": {"X_1_A": [vec(2)]}}
    pf.save_predictions(tmp_path / "net.embeddings", parts)
    assert set(pf.load_predictions(tmp_path / "net.embeddings", kind=None)) == {"train", "val", "test"}
    pf.save_embeddings(tmp_path / "plain.name", parts)
    with refused(f"{tmp_path / 'net.output'}: unexpected part(s) 'train' (expected 'test', 'val', 'id_test'); "
                 "a 'train' part belongs to an embeddings file (main.py --save-embeddings), which make_submission.py "
                 "reads with --knn"):
        pf.save_predictions(tmp_path / "net.output", parts)
    assert not (tmp_path / "net.output").exists()
    with refused("unknown kind 'probs' (expected one of logits, embeddings)", ValueError):
        pf.load_predictions(tmp_path / "plain.name", kind="probs")


@pytest.mark.parametrize("raised, reason", [(OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
                                            (OSError("disk full"), "disk full")])
def test_a_failed_write_names_the_file_asked_for(tmp_path, monkeypatch, raised, reason):
    """A write that fails half-way (a full disk) is reported with the name the user gave, never the
    temporary file's, and the file already there is left as it was."""
    path = tmp_path / "a.output"
    pf.save_predictions(path, PREDICTIONS)
    before = path.read_bytes()

    def full_disk(obj, f, protocol=None):
        f.write(b"half a pickle")
        raise raised

    monkeypatch.setattr(pf.pickle, "dump", full_disk)
    with pytest.raises(OutputError) as error:
        pf.save_predictions(path, PREDICTIONS)
    assert str(error.value) == f"cannot write {path}: {reason}"
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.output"]


# -------------------------------------------------------------------------------- well sums


def test_well_sums_in_row_order_with_their_ids(tmp_path):
    path = dump(tmp_path / "net.embeddings", {"test": {"X_2": [vec(1, 0), vec(0, 1)], "X_1": [vec(2, 0), vec(0, 2)]},
                                              "train": {"T_1": [vec(0, 2), vec(0, 3)]}})
    sums = pf.load_well_sums(path, pf.EMBEDDING_ROWS)
    assert sums.n_classes == 2 and sums.matrix.dtype == np.float32 and sums.path == str(path)
    assert {p: ids.tolist() for p, ids in sums.ids.items()} == {"train": ["T_1"], "val": [], "test": ["X_1", "X_2"]}
    assert sums.ids["val"].dtype.kind == "U"  # an empty part's ids are strings too
    np.testing.assert_array_equal(sums.matrix, [[0, 5], [2, 2], [1, 1]])
    np.testing.assert_array_equal(sums.sums["test"], [[2, 2], [1, 1]])
    empty = pf.load_well_sums(dump(tmp_path / "e.output", {"test": {}}))
    assert empty.n_classes == 0 and empty.matrix.shape == (0, 0)


def test_well_sums_refuse_bad_wells_naming_part_and_well(tmp_path):
    path = dump(tmp_path / "a.output", {"test": {5: [vec(1)]}})
    with refused(f"{path}: part 'test' has a non-string id 5"):
        pf.load_well_sums(path)
    path = dump(tmp_path / "b.output", {"val": {"A": [vec(1, 2)]}, "test": {"B": [vec(1, 2)], "C": [vec(1)]}})
    with refused(f"{path}: test['C'] has 1 classes, other wells have 2"):
        pf.load_well_sums(path)
    path = dump(tmp_path / "first.output", {"val": {}, "test": {"A": [], "B": [vec(1, 2)]}})  # the first well read
    with refused(f"{path}: test['A'] must be a non-empty list of per-site logit vectors, found list"):
        pf.load_well_sums(path)
    path = dump(tmp_path / "c.output", {"val": {"A": [vec(1, 2)]}, "test": {"B": [vec(1, 2)], "C": [["x"]]}})
    with refused(f"{path}: test['C'] holds list; expected 1-D numeric logit vectors"):
        pf.load_well_sums(path)


@pytest.mark.parametrize("bad, message", [
    ({"V_1": np.nan}, "val['V_1'] has NaN or infinite values (1 well(s) in all)"),
    ({"X_1": np.inf}, "test['X_1'] has NaN or infinite values (1 well(s) in all)"),  # the first row of a part
    ({"X_2": -np.inf, "V_2": np.nan}, "val['V_2'] has NaN or infinite values (2 well(s) in all)"),
])
def test_non_finite_sums_are_refused_naming_the_first_such_well(tmp_path, bad, message):
    obj = {"val": {"V_1": [vec(1, 2)], "V_2": [vec(1, 2)]}, "test": {"X_1": [vec(3, 4)], "X_2": [vec(5, 6)]}}
    for code, value in bad.items():
        part = "val" if code[0] == "V" else "test"
        obj[part][code] = [vec(value, 1)]
    path = dump(tmp_path / "n.output", obj)
    with refused(f"{path}: {message}"):
        pf.load_well_sums(path)
    # finite but large: a float32 sum may overflow a row's total, the exact test then passes it
    big = dump(tmp_path / "big.output", {"test": {"X": [vec(3e38, 3e38)]}})
    with np.errstate(over="ignore"):
        assert pf.load_well_sums(big).matrix.tolist() == [vec(3e38, 3e38).tolist()]
