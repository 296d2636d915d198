"""One pseudo-labelling epoch without a network: planted logits stand in for the model, so the
wells chosen, their count, the rows training then reads and the log line are known exactly."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cellpaint.data.structure import Structure
from cellpaint.modes import pseudo_labels
from cellpaint.core.schedule import SizeFunction
from cellpaint.core.settings import PseudoLabelSettings

# 6 treatment classes in 2 plate groups ({0, 2, 4}, {1, 3, 5}), class 6 a control
STRUCTURE = Structure(7, np.arange(6), np.array([6]), (np.array([0, 2, 4]), np.array([1, 3, 5])), ("A",))


def sites(split: str, experiment: str, plate: int, classes: list[int], known: bool) -> list[dict]:
    """Two sites per well, one well per class; val wells carry their label in `sirna`."""
    rows = []
    for k, c in enumerate(classes):
        for site in (1, 2):
            rows.append({"id_code": f"{experiment}_{plate}_W{k}", "experiment": experiment, "plate": plate,
                         "site": site, "split": split, "well_type": "treatment",
                         "sirna": c if known else -1, "sirna_true": c})
    return rows


def subsets() -> dict[str, pd.DataFrame]:
    train = pd.DataFrame(sites("train", "T-1", 1, [0, 2, 4], True) + sites("train", "T-1", 2, [1, 3, 5], True))
    val = pd.DataFrame(sites("train", "V-1", 1, [1, 3, 5], True) + sites("train", "V-1", 2, [0, 2, 4], True))
    test = pd.DataFrame(sites("test", "X-1", 1, [0, 2, 4], False) + sites("test", "X-1", 2, [1, 3, 5], False)
                        + sites("test", "X-2", 1, [5], True))  # a test well labelled by a layout match
    return {"train": train, "val": val, "test": test}


def planted_inference(asked: list):
    """Site logits: the true class at +m per site, m the well's index + 1 (later wells are
    surer); well V-1_1_W0 (class 1) looks like class 3 instead, surer than any: a wrong label."""
    def infer(rows: pd.DataFrame) -> np.ndarray:
        asked.append(sorted(set(rows["id_code"])))
        logits = np.zeros((len(rows), 7), dtype=np.float32)
        for i, (code, c) in enumerate(zip(rows["id_code"], rows["sirna_true"])):
            logits[i, 3 if code == "V-1_1_W0" else c] = 10 if code == "V-1_1_W0" else 1 + int(code[-1])
        return logits
    return infer


def test_training_rows_are_the_train_subset_and_every_site_of_the_pseudo_labelled_wells():
    parts = subsets()
    rows, labels = pseudo_labels.training_rows(parts, {"V-1_2_W1": 2, "X-1_1_W2": 4, "X-2_1_W0": 5})
    # fresh row numbers: the parts' own indexes repeat (each starts at 0)
    assert rows.index.equals(pd.RangeIndex(len(rows)))
    candidates = pseudo_labels.candidate_sites(parts)
    assert candidates.index.equals(pd.RangeIndex(len(candidates))) and len(candidates) == 24
    extra = rows.iloc[len(parts["train"]):]
    # X-2_1_W0 is labelled already (a layout match): not a candidate, not added twice
    assert sorted(extra["id_code"]) == ["V-1_2_W1", "V-1_2_W1", "X-1_1_W2", "X-1_1_W2"]
    assert labels[:len(parts["train"])].tolist() == parts["train"]["sirna"].tolist()
    assert dict(zip(extra["id_code"], labels[len(parts["train"]):])) == {"V-1_2_W1": 2, "X-1_1_W2": 4}
    assert labels.dtype == np.int64


def test_taken_classes_per_plate():
    wells = pd.DataFrame({"experiment": ["E", "E", "E", "F"], "plate": [1, 1, 2, 1]})
    assert pseudo_labels.taken_classes(wells, np.array([0, 3, 0, 5])) == {
        ("E", 1): {0, 3}, ("E", 2): {0}, ("F", 1): {5}}


def test_one_epoch_adds_the_most_confident_wells_and_logs_the_wrong_ones(caplog):
    """12 candidate wells (6 val, 6 unlabelled test), f = 0.5 at x = 1/2: 6 labelled by then."""
    data = SimpleNamespace(subsets=subsets(), structure=STRUCTURE)
    settings = PseudoLabelSettings(first_epoch=4, size_func=SizeFunction("x"))
    asked: list = []
    with caplog.at_level(logging.INFO, logger="cellpaint"):
        new = pseudo_labels.pseudo_label_epoch(settings, 7, 5, data, {"X-1_1_W0": 0}, planted_inference(asked))
    # 12 candidates, round(0.5 * 12) = 6 labelled, one already: 5 more, the surest first
    assert new == {"V-1_1_W0": 3, "V-1_1_W2": 5, "V-1_2_W2": 4, "X-1_1_W2": 4, "X-1_2_W2": 5}
    # the network is asked about the sites of the wells not labelled yet, and about nothing else
    assert asked == [sorted(set(pseudo_labels.candidate_sites(data.subsets)["id_code"]) - {"X-1_1_W0"})]
    assert caplog.messages == ["pseudo-labels at epoch 5: 5 added of 5 asked (3 val, 1 of them wrong), "
                               "6 of 12 wells labelled"]


def test_the_wrong_val_label_is_counted(caplog):
    data = SimpleNamespace(subsets=subsets(), structure=STRUCTURE)
    settings = PseudoLabelSettings(first_epoch=0, size_func=SizeFunction("1"), duplicates="refill")
    with caplog.at_level(logging.INFO, logger="cellpaint"):
        new = pseudo_labels.pseudo_label_epoch(settings, 3, 0, data, {}, planted_inference([]))
    # every candidate is asked for. V-1_1_W0 takes class 3, so V-1_1_W1 (truly 3) is skipped and
    # the refill goes on down the ranking: 11 of the 12 are labelled, V-1_1_W0 wrongly
    assert len(new) == 11 and "V-1_1_W1" not in new and new["V-1_1_W0"] == 3
    assert "11 added of 12 asked (5 val, 1 of them wrong), 11 of 12 wells labelled" in caplog.text
    # classes 3 and 5 labelled on V-1 plate 1 by an earlier epoch: V-1_1_W0's only candidate left
    # in the plate's group {1, 3, 5} is 1
    again = pseudo_labels.pseudo_label_epoch(settings, 3, 0, data, {"V-1_1_W1": 3, "V-1_1_W2": 5},
                                             planted_inference([]))
    assert again["V-1_1_W0"] == 1 and len(again) == 10


def test_nothing_to_add_is_logged_and_asks_no_inference(caplog):
    data = SimpleNamespace(subsets=subsets(), structure=STRUCTURE)
    settings = PseudoLabelSettings(first_epoch=4, size_func=SizeFunction("0.1"))
    asked: list = []
    with caplog.at_level(logging.INFO, logger="cellpaint"):
        new = pseudo_labels.pseudo_label_epoch(settings, 7, 5, data, {"X-1_1_W0": 0}, planted_inference(asked))
    assert new == {} and asked == []  # round(0.1 * 12) = 1, already labelled
    assert caplog.messages == ["pseudo-labels: none added at epoch 5 (1 of 12 wells labelled)"]


@pytest.mark.parametrize("epoch, expected", [(4, 1 / 4), (5, 2 / 4), (7, 4 / 4), (3, 0.0), (9, 1.0)])
def test_pl_fraction_is_clipped_to_0_and_1(epoch, expected):
    assert pseudo_labels.pl_fraction(SizeFunction("x"), epoch, 4, 7) == pytest.approx(expected)
    # a run whose pseudo-labelling starts at its last epoch: x = 1/1 there, no division by zero
    assert pseudo_labels.pl_fraction(SizeFunction("x"), 9, 9, 9) == 1.0


def test_select_refuses_an_unknown_duplicate_rule():
    empty = pd.DataFrame({"experiment": [], "plate": [], "id_code": []})
    with pytest.raises(ValueError, match=r"unknown duplicate rule 'keep' \(choose from drop, refill\)"):
        pseudo_labels.select(empty, np.zeros((0, 7)), STRUCTURE, empty, np.zeros(0, np.int64), 3, "keep")
    assert pseudo_labels.select(empty, np.zeros((0, 7)), STRUCTURE, empty, np.zeros(0, np.int64), 3) == {}


def test_refill_goes_on_down_the_ranking_where_drop_stops():
    """7/12 of 12 wells by then, one labelled: 6 asked. The sixth surest (V-1_1_W1) wants class 3,
    which the surest (V-1_1_W0) took: `drop` adds 5, `refill` takes the seventh instead."""
    data = SimpleNamespace(subsets=subsets(), structure=STRUCTURE)
    added = {}
    for rule in ("drop", "refill"):
        settings = PseudoLabelSettings(first_epoch=4, size_func=SizeFunction("7/12"), duplicates=rule)
        added[rule] = pseudo_labels.pseudo_label_epoch(settings, 7, 5, data, {"X-1_1_W0": 0}, planted_inference([]))
    assert sorted(added["drop"]) == ["V-1_1_W0", "V-1_1_W2", "V-1_2_W2", "X-1_1_W2", "X-1_2_W2"]
    assert sorted(added["refill"]) == sorted([*added["drop"], "V-1_2_W1"])


def test_a_single_well_to_add_is_added(caplog):
    data = SimpleNamespace(subsets=subsets(), structure=STRUCTURE)
    settings = PseudoLabelSettings(first_epoch=4, size_func=SizeFunction("2/12"))
    with caplog.at_level(logging.INFO, logger="cellpaint"):
        new = pseudo_labels.pseudo_label_epoch(settings, 7, 5, data, {"X-1_1_W0": 0}, planted_inference([]))
    assert new == {"V-1_1_W0": 3}
    one = {"train": data.subsets["train"], "val": data.subsets["val"].iloc[:2],
           "test": data.subsets["test"].iloc[:0]}  # one candidate well (two sites)
    settings = PseudoLabelSettings(first_epoch=0, size_func=SizeFunction("1"))
    alone = pseudo_labels.pseudo_label_epoch(settings, 3, 0, SimpleNamespace(subsets=one, structure=STRUCTURE), {},
                                             planted_inference([]))
    assert alone == {"V-1_1_W0": 3}


def test_a_labelled_well_votes_once_for_its_plates_group_whatever_its_sites():
    """V-1 plate 1 holds a labelled well of class 0 (group {0, 2, 4}) and two wells that lean to
    group {1, 3, 5} (mass ~0.95 each); plate 2 is undecided. One vote for the labelled well: the
    two leaning wells outweigh it and plate 1 is taken for group {1, 3, 5}; counted once per site
    (two votes) it would not be."""
    val = pd.DataFrame(sites("train", "V-1", 1, [0, 1, 3], True) + sites("train", "V-1", 2, [0, 2], True))
    parts = {"train": subsets()["train"], "val": val, "test": val.iloc[:0]}

    def infer(rows: pd.DataFrame) -> np.ndarray:
        logits = np.zeros((len(rows), 7), dtype=np.float32)
        lean = rows["id_code"].isin(["V-1_1_W1", "V-1_1_W2"]).to_numpy()
        logits[lean, rows["sirna_true"].to_numpy()[lean]] = 2.0  # 4 summed over the two sites
        return logits

    settings = PseudoLabelSettings(first_epoch=0, size_func=SizeFunction("3/5"))
    new = pseudo_labels.pseudo_label_epoch(settings, 3, 0, SimpleNamespace(subsets=parts, structure=STRUCTURE),
                                           {"V-1_1_W0": 0}, infer)
    assert new == {"V-1_1_W1": 1, "V-1_1_W2": 3}


def test_tied_wells_are_taken_in_table_order():
    """60 one-well plates in three tiers of exactly equal margins: the 25 taken are the 20 of the
    surest tier and the first 5 of the next, in the order of the table (a stable ranking; an
    unstable sort would pick among the ties by its own internals, which differ by CPU)."""
    rng = np.random.default_rng(0)
    tier = rng.permutation(np.repeat([3.0, 2.0, 1.0], 20))
    wells = pd.DataFrame({"id_code": [f"E{i:02d}_1_A" for i in range(60)], "experiment": [f"E{i:02d}" for i in range(60)],
                          "plate": 1})
    logits = np.zeros((60, 7), dtype=np.float32)
    logits[np.arange(60), np.arange(60) % 6] = tier
    empty = pd.DataFrame({"experiment": [], "plate": []})
    chosen = pseudo_labels.select(wells, logits, STRUCTURE, empty, np.zeros(0, np.int64), count=25)
    expected = [i for i in range(60) if tier[i] == 3] + [i for i in range(60) if tier[i] == 2][:5]
    assert sorted(chosen) == sorted(f"E{i:02d}_1_A" for i in expected)


def test_one_well_and_count_one():
    wells = pd.DataFrame({"id_code": ["E_1_A"], "experiment": ["E"], "plate": [1]})
    logits = np.array([[0, 0, 0, 2.0, 0, 0, 0]], dtype=np.float32)
    empty = pd.DataFrame({"experiment": [], "plate": []})
    assert pseudo_labels.select(wells, logits, STRUCTURE, empty, np.zeros(0, np.int64), count=1) == {"E_1_A": 3}
    assert pseudo_labels.select(wells, logits, STRUCTURE, empty, np.zeros(0, np.int64), count=0) == {}
