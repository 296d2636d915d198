"""The prediction file's newer checks on hand-made files: a well with more site vectors than the
others (a site counted twice) is refused while fewer (an unreadable site) are not, with ties read
as the larger count; finite values whose float32 sum overflows are named by part and well; and the
optional RxRx1-WILDS 'id_test' part is kept when present and never summed."""
from __future__ import annotations

import pickle
import re
import warnings

import numpy as np
import pytest

from cellpaint.data import prediction_file as pf
from cellpaint.data.prediction_file import PredictionFileError


def vec(*values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def refused(message: str):
    return pytest.raises(PredictionFileError, match="^" + re.escape(message) + "$")


def test_fewer_sites_are_allowed_and_a_tie_reads_as_the_larger_count(tmp_path):
    one_lost = dump(tmp_path / "a.output", {"test": {"A": [vec(1, 0), vec(0, 1)], "B": [vec(2, 2)]}})
    np.testing.assert_array_equal(pf.load_well_sums(one_lost).sums["test"], [[1, 1], [2, 2]])
    mostly_one = dump(tmp_path / "b.output", {"val": {"V": [vec(1, 1)]},
                                              "test": {"A": [vec(1, 0), vec(0, 1)], "B": [vec(2, 2)], "C": [vec(3, 3)]}})
    with refused(f"{mostly_one}: test['A'] has 2 site vectors where the wells have 1 (1 such well(s) in test)"):
        pf.load_well_sums(mostly_one)


def test_a_repeated_site_is_named_by_its_part_and_the_count_of_such_wells(tmp_path):
    two = [vec(1, 0), vec(0, 1)]
    path = dump(tmp_path / "c.output", {"test": {"A": two, "B": two, "C": two},
                                        "val": {"V1": two, "V2": [*two, vec(1, 1)], "V3": [*two, vec(2, 2)]}})
    with refused(f"{path}: val['V2'] has 3 site vectors where the wells have 2 (2 such well(s) in val)"):
        pf.load_well_sums(path)
    # the usual count is over every part (val's wells alone would make 3 usual)
    path = dump(tmp_path / "d.output", {"test": {"A": two, "B": two, "C": two},
                                        "val": {"V2": [*two, vec(1, 1)], "V3": [*two, vec(2, 2)]}})
    with refused(f"{path}: val['V2'] has 3 site vectors where the wells have 2 (2 such well(s) in val)"):
        pf.load_well_sums(path)


def test_a_well_given_as_one_array_counts_as_one_site(tmp_path):
    """A bare vector is not a list of sites: it is refused by the well check, not as extra sites
    (its length is no site count)."""
    path = dump(tmp_path / "e.output", {"test": {"A": [vec(1, 0, 0)], "B": vec(1, 2, 3), "C": [vec(0, 0, 1)]}})
    with refused(f"{path}: test['B'] must be a non-empty list of per-site logit vectors, found ndarray"):
        pf.load_well_sums(path)


def test_finite_values_whose_sum_overflows_name_the_well(tmp_path):
    big = np.full(2, 3e38, dtype=np.float32)
    path = dump(tmp_path / "f.output", {"val": {"V": [vec(1, 1), vec(1, 1)]}, "test": {"A": [vec(1, 1), vec(1, 1)],
                                                                                       "B": [big, big]}})
    with refused(f"{path}: test['B']: its site vectors are finite but too large to sum in float32 (values near "
                 "3.4e38): not what a model predicts"):
        pf.load_well_sums(path)
    # one such vector alone sums fine: the values are refused only where they overflow
    alone = dump(tmp_path / "g.output", {"test": {"A": [big, vec(-3e38, 0)]}})
    np.testing.assert_allclose(pf.load_well_sums(alone).sums["test"], [[0, 3e38]], rtol=1e-6)


def test_the_finiteness_pass_warns_of_nothing(tmp_path):
    """Values whose sum over the classes overflows are a well's scores all the same (read without a
    warning); +inf beside -inf is refused by name, not with numpy's warning first."""
    big = np.full(2, 3e38, dtype=np.float32)
    wide = dump(tmp_path / "h.output", {"test": {"A": [big], "B": [vec(1, 1)]}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(pf.load_well_sums(wide).sums["test"], [big, [1, 1]])
        both = dump(tmp_path / "i.output", {"val": {"V": [vec(1, 1)]},
                                            "test": {"A": [vec(1, 1)], "B": [vec(np.inf, -np.inf)]}})
        with refused(f"{both}: test['B'] has NaN or infinite values (1 well(s) in all)"):
            pf.load_well_sums(both)


def test_an_id_test_part_is_kept_when_there_and_never_summed(tmp_path):
    parts = {"test": {"X": [vec(1, 2)]}, "val": {"V": [vec(0, 1)]}, "id_test": {"T": [vec(5, 5)]}}
    pf.save_predictions(tmp_path / "w.output", parts)
    loaded = pf.load_predictions(tmp_path / "w.output")
    assert list(loaded) == ["test", "val", "id_test"] and set(loaded["id_test"]) == {"T"}
    pf.save_predictions(tmp_path / "p.output", {"test": parts["test"]})
    assert list(pf.load_predictions(tmp_path / "p.output")) == ["test", "val"]  # only when the file has it
    sums = pf.load_well_sums(tmp_path / "w.output")
    assert {p: ids.tolist() for p, ids in sums.ids.items()} == {"val": ["V"], "test": ["X"]}
    np.testing.assert_array_equal(sums.matrix, [[0, 1], [1, 2]])
    # an embeddings file has no such part
    with pytest.raises(PredictionFileError, match=r"unexpected part\(s\) 'id_test'"):
        pf.save_predictions(tmp_path / "net.embeddings", {"train": {"R": [vec(1)]}, "id_test": {"T": [vec(1)]}})
