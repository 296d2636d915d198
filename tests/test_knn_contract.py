"""knn.py at its edges: K against the size of each searched group (below, equal, far above), a
group of one reference well, a cell type missing a group, an `out` array reused, neighbours
that all point away, three files side by side, the dtypes it returns, and the exact message of
every refusal (it names the flag, the text or the sizes)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from cellpaint.modes import knn

CELLS = ["HEPG2", "HUVEC", "RPE", "U2OS"]


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def refused(message: str, kind=knn.KnnError):
    return pytest.raises(kind, match="^" + re.escape(message) + "$")


def brute_force(query, reference, labels, groups, k, n_classes, weight="sigmoid"):
    """Per query row: the k most similar reference rows of each group (all of a smaller group)."""
    out = np.zeros((len(query), n_classes))
    sim = query.astype(np.float64) @ reference.T.astype(np.float64)
    for g in np.unique(groups):
        cols = np.flatnonzero(groups == g)
        order = np.argsort(-sim[:, cols], axis=1)[:, :k]
        s = np.take_along_axis(sim[:, cols], order, 1)
        votes = 1 / (1 + np.exp(-s)) if weight == "sigmoid" else np.maximum(s, 0)
        np.add.at(out, (np.arange(len(query))[:, None], labels[cols][order]), votes)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 20])
def test_group_search_with_k_below_equal_and_far_above_each_groups_size(k):
    """Groups of 4, 3 and 1 reference wells (the last group's class in one well only)."""
    rng = np.random.default_rng(k)
    reference = unit(rng.normal(size=(8, 5)))
    labels = np.array([0, 1, 0, 1, 2, 3, 2, 4])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    query = unit(rng.normal(size=(6, 5)))
    scores, used = knn.knn_scores(query, ["A"] * 6, reference, ["A"] * 8, labels, {"A": k}, 6, np.arange(5),
                                  reference_groups=groups)
    expected = brute_force(query, reference, labels, groups, k, 6)
    expected[:, 5] = -np.inf  # class 5: not a candidate
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    sizes = [4, 3, 1]
    ks = [min(k, n) for n in sizes]
    assert used == {"A": ks[0] if len(set(ks)) == 1 else dict(enumerate(ks))}


def test_one_group_holds_every_reference():
    rng = np.random.default_rng(9)
    reference, query = unit(rng.normal(size=(5, 3))), unit(rng.normal(size=(2, 3)))
    labels = np.array([0, 1, 2, 0, 1])
    grouped, used = knn.knn_scores(query, ["A"] * 2, reference, ["A"] * 5, labels, {"A": 2}, 3, np.arange(3),
                                   reference_groups=np.zeros(5, int))
    cell, _ = knn.knn_scores(query, ["A"] * 2, reference, ["A"] * 5, labels, {"A": 2}, 3, np.arange(3))
    np.testing.assert_array_equal(grouped, cell)
    assert used == {"A": 2}


def test_a_cell_type_without_the_last_group_is_refused():
    reference = unit(np.eye(4))
    groups = np.array([0, 1, 0, 0])  # group 1 only among B's wells
    with refused("no reference wells of plate group 1 among the A wells: a group-wise search needs every "
                 "group (use --knn-search cell)"):
        knn.knn_scores(reference[:1], ["A"], reference, ["A", "B", "A", "A"], np.array([0, 1, 0, 2]), {"A": 1, "B": 1},
                       3, np.arange(3), reference_groups=groups)


def test_an_out_array_is_overwritten_not_added_to():
    rng = np.random.default_rng(0)
    query, reference = unit(rng.normal(size=(3, 4))), unit(rng.normal(size=(6, 4)))
    labels = np.array([0, 1, 2, 0, 1, 2])
    fresh, _ = knn.knn_scores(query, ["A"] * 3, reference, ["A"] * 6, labels, {"A": 2}, 4, np.arange(3))
    out = np.full((3, 4), 7.0, dtype=np.float32)
    reused, _ = knn.knn_scores(query, ["A"] * 3, reference, ["A"] * 6, labels, {"A": 2}, 4, np.arange(3), out=out)
    assert reused is out
    np.testing.assert_array_equal(reused, fresh)
    assert fresh.dtype == np.float32
    with refused("out must be float32 (3, 4), got float32 (3, 5)", ValueError):
        knn.knn_scores(query, ["A"] * 3, reference, ["A"] * 6, labels, {"A": 2}, 4, np.arange(3),
                       out=np.zeros((3, 5), np.float32))
    with refused("out must be float32 (3, 4), got float64 (3, 4)", ValueError):
        knn.knn_scores(query, ["A"] * 3, reference, ["A"] * 6, labels, {"A": 2}, 4, np.arange(3),
                       out=np.zeros((3, 4)))


def test_relu_cos_only_rows_whose_neighbours_all_point_away_vote_equally():
    sim = np.array([[-0.5, -0.2], [0.3, -0.1]], dtype=np.float32)
    np.testing.assert_array_equal(knn.neighbour_weights(sim, "relu-cos"), np.array([[1, 1], [0.3, 0]], np.float32))
    np.testing.assert_allclose(knn.neighbour_weights(sim, "sigmoid"), 1 / (1 + np.exp(-sim)), rtol=1e-6)
    with refused("--knn-weight 'cos': expected one of sigmoid, relu-cos", knn.KnnFlagError):
        knn.neighbour_weights(sim, "cos")


def test_average_and_concatenate_give_float32_unit_rows():
    a = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    one = knn.average([a], [2.0])  # one file: its rows, normalised
    assert one.dtype == np.float32
    np.testing.assert_allclose(one, [[0.6, 0.8], [1.0, 0.0]], rtol=1e-6)
    rng = np.random.default_rng(1)
    blocks = [unit(rng.normal(size=(4, w))) for w in (2, 3, 5)]
    joined = knn.concatenate(blocks, [1.0, 2.0, 1.0])
    assert joined.dtype == np.float32 and joined.shape == (4, 10)
    for block, (start, stop), w in zip(blocks, [(0, 2), (2, 5), (5, 10)], [0.25, 0.5, 0.25]):
        np.testing.assert_allclose(joined[:, start:stop], block * np.sqrt(w), rtol=1e-6)


def test_refusals_name_what_does_not_fit():
    q = unit(np.eye(3))
    args = dict(query=q, query_cells=["A"] * 3, reference=q, reference_cells=["A"] * 3,
                reference_labels=np.arange(3), k={"A": 1}, n_classes=4, candidates=np.arange(3))
    with refused("--knn-weight 'cos': expected one of sigmoid, relu-cos", knn.KnnFlagError):
        knn.knn_scores(**args, weight="cos")
    with refused("query and reference vectors differ in size: (3,) vs (2,)"):
        knn.knn_scores(**{**args, "reference": q[:, :2]})
    with refused("reference wells must be labelled with candidate classes"):
        knn.knn_scores(**{**args, "reference_labels": np.array([0, 1, 3])})
    for groups in (np.array([0, 1]), np.array([0, -1, 1])):
        with refused("every reference well needs the plate group of its class"):
            knn.knn_scores(**args, reference_groups=groups)
    with refused("no K given for cell type A"):
        knn.knn_scores(**{**args, "k": {"B": 1}})
    with refused("no reference wells of cell type A for its 3 well(s) to compare with"):
        knn.knn_scores(**{**args, "reference": q[:0], "reference_cells": [], "reference_labels": np.zeros(0, int)},
                       reference_groups=np.zeros(0, int))


@pytest.mark.parametrize("text, message", [
    ("x", "--knn 'x': 'x' is not an integer"),
    ("0", "--knn '0': K must be at least 1, got 0"),
    ("30,100,30", "--knn '30,100,30' gives 3 values for 4 cell types (one K for all, or one each in this "
                  "order: HEPG2, HUVEC, RPE, U2OS; or TYPE=K,...)"),
    ("HEPG2=3,4", "--knn 'HEPG2=3,4': give every K as TYPE=K or none (cell types: HEPG2, HUVEC, RPE, U2OS)"),
    ("MCF7=3", "--knn 'MCF7=3': unknown cell type 'MCF7' (the metadata has HEPG2, HUVEC, RPE, U2OS)"),
    ("HEPG2=3,HEPG2=4", "--knn 'HEPG2=3,HEPG2=4': cell type HEPG2 given twice"),
    ("HEPG2=3,RPE=1", "--knn 'HEPG2=3,RPE=1' gives no K for HUVEC, U2OS (cell types: HEPG2, HUVEC, RPE, U2OS)"),
    ("HEPG2=3=4,HUVEC=1,RPE=1,U2OS=1", "--knn 'HEPG2=3=4,HUVEC=1,RPE=1,U2OS=1': '3=4' is not an integer for HEPG2"),
    ("HEPG2=0,HUVEC=1,RPE=1,U2OS=1", "--knn 'HEPG2=0,HUVEC=1,RPE=1,U2OS=1': K must be at least 1 for HEPG2, got 0"),
    ("1,x,1,1", "--knn '1,x,1,1': 'x' is not an integer for HUVEC"),
])
def test_parse_k_messages(text, message):
    with refused(message, knn.KnnFlagError):
        knn.parse_k(text, CELLS[::-1])
