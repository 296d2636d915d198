"""Pseudo-labelling on an RxRx1-WILDS split, whose val and test parts keep their control wells and
whose val wells belong to `val` experiments: controls are never candidates, and val wells count
as val in the log line (the count of wrong labels included)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd

from cellpaint.core.schedule import SizeFunction
from cellpaint.core.settings import PseudoLabelSettings
from cellpaint.modes import pseudo_labels
from tests.test_pseudo_labelling import STRUCTURE, planted_inference, sites


def with_controls(split: str, experiment: str, known: bool) -> pd.DataFrame:
    treatments = sites(split, experiment, 1, [1, 3, 5], known)
    controls = [dict(row, id_code=f"{experiment}_1_C{k}", well_type=kind, sirna=6, sirna_true=6)
                for k, kind in enumerate(("negative_control", "positive_control"))
                for row in sites(split, experiment, 1, [6], True)]
    return pd.DataFrame(treatments + controls)


def wilds_subsets() -> dict[str, pd.DataFrame]:
    train = pd.DataFrame(sites("train", "T-1", 1, [0, 2, 4], True))
    return {"train": train, "val": with_controls("val", "V-1", True), "test": with_controls("test", "X-1", False)}


def test_controls_are_never_candidates():
    parts = wilds_subsets()
    candidates = pseudo_labels.candidate_sites(parts)
    assert sorted(set(candidates["id_code"])) == ["V-1_1_W0", "V-1_1_W1", "V-1_1_W2", "X-1_1_W0", "X-1_1_W1",
                                                  "X-1_1_W2"]
    assert (candidates["well_type"] == "treatment").all() and len(candidates) == 12
    assert candidates.index.equals(pd.RangeIndex(12))


def test_val_wells_of_val_experiments_count_as_val(caplog):
    data = SimpleNamespace(subsets=wilds_subsets(), structure=STRUCTURE)
    settings = PseudoLabelSettings(first_epoch=0, size_func=SizeFunction("1"))
    asked: list = []
    with caplog.at_level(logging.INFO, logger="cellpaint"):
        new = pseudo_labels.pseudo_label_epoch(settings, 3, 0, data, {}, planted_inference(asked))
    assert asked == [["V-1_1_W0", "V-1_1_W1", "V-1_1_W2", "X-1_1_W0", "X-1_1_W1", "X-1_1_W2"]]
    # V-1_1_W0 (truly 1) looks like 3 surer than anything: it takes 3 on its plate, V-1_1_W1 (3) is
    # dropped, and 5 of the 6 candidates are labelled, one val well wrongly
    assert new["V-1_1_W0"] == 3 and "V-1_1_W1" not in new and len(new) == 5
    assert caplog.messages == ["pseudo-labels at epoch 0: 5 added of 6 asked (2 val, 1 of them wrong), "
                               "5 of 6 wells labelled"]
    assert np.array_equal(sorted(new.values()), [1, 3, 3, 5, 5])
