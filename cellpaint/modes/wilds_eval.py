"""The eval mode: a prediction file scored as RxRx1-WILDS scores it (`main.py --mode eval`).

    python main.py --mode eval --data WILDS_DIR --load CKPT [--pred-suffix S] [--split official|mixed-to-test]

Reads `CKPT.output<S>` and writes `CKPT.output<S>.wilds.json`: for each evaluated part of the split
(val, the OOD test and, on the official split, the ID test) the WILDS evaluator's figures
(data/wilds.py `wilds_metrics`: average accuracy over sites, accuracy per cell type, the worst
cell type's) of

- the site predictions: each site's arg-max over all classes, every well type (what a standard
  WILDS entry reports), and, separately,
- the plate-assigned ones (val and OOD test): per experiment the plate groups are inferred from the
  summed site logits of its treatment wells, each plate's treatment wells get its group's siRNAs by
  a one-to-one assignment (the 1st place's last stages, as make_submission.py does them), both
  sites of a well take its well's siRNA; control wells keep their site predictions. This uses the
  test set jointly, so it is never a standard-track figure.

The track of the site predictions follows from how the checkpoint was trained (its settings):
standard only without val or test data in training (no --pl-epoch, no --all-controls-train, no
layout coincidence used) on the official split.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cellpaint.core.atomic import atomic_write
from cellpaint.core.errors import InputError, UsageError
from cellpaint.core.settings import AUTO, Settings
from cellpaint.data import metadata, plates, wilds
from cellpaint.data.layout_matches import find_layout_matches
from cellpaint.data.prediction_file import load_predictions
from cellpaint.data.structure import derive_structure

log = logging.getLogger("cellpaint")

EVALUATED = ("val", "test", "id_test")   # the parts with figures; plate assignment on val and test only
ASSIGNED = ("val", "test")


def site_logits(wells: dict, rows: pd.DataFrame, path: str, part: str, scheme: str) -> np.ndarray:
    """[sites of `rows`, classes]: the prediction file's part `wells` (id_code -> site vectors in site
    order) lined up with the split's rows; a well missing, or with another number of sites than the
    part has (a file predicted with another --split), is an InputError naming the file."""
    codes = rows["id_code"].to_numpy()
    position = rows.groupby("id_code", sort=False).cumcount().to_numpy()
    count = rows.groupby("id_code", sort=False)["id_code"].transform("size").to_numpy()
    missing = [c for c in dict.fromkeys(codes) if c not in wells]
    if missing:
        raise InputError(f"{path}: its {part} part lacks {len(missing)} well(s) of the {scheme} split's {part} part "
                         f"(e.g. {missing[0]}): was it predicted on this --data?")
    extra = set(wells) - set(codes)
    if extra:
        raise InputError(f"{path}: its {part} part holds {len(extra)} well(s) outside the {scheme} split's {part} part "
                         f"(e.g. {sorted(extra)[0]}): was it predicted with another --split?")
    out = None
    for i, (code, k, n) in enumerate(zip(codes, position, count)):
        sites = wells[code]
        if len(sites) != n:
            raise InputError(f"{path}: {part}[{code!r}] holds {len(sites)} site(s) but the {scheme} split's {part} "
                             f"part has {n}: was it predicted with another --split, or with sites skipped?")
        if out is None:
            out = np.empty((len(rows), len(sites[k])), dtype=np.float32)
        out[i] = sites[k]
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def plate_assigned(rows: pd.DataFrame, logits: np.ndarray, group_masks: np.ndarray) -> np.ndarray:
    """Site predictions after the plate stages: treatment wells summed, plate groups inferred per
    experiment ("prob"), each plate's wells assigned its group's classes one-to-one (on
    log-softmax scores, as make_submission.py's defaults); controls keep their own arg-max."""
    predicted = logits.argmax(1)
    treated = (rows["well_type"] == metadata.TREATMENT).to_numpy()
    if not treated.any():
        return predicted
    codes, inverse = np.unique(rows["id_code"].to_numpy()[treated], return_inverse=True)
    scores = np.zeros((len(codes), logits.shape[1]), dtype=np.float32)
    np.add.at(scores, inverse, logits[treated])
    first = np.zeros(len(codes), dtype=np.int64)
    first[inverse[::-1]] = np.flatnonzero(treated)[::-1]  # a row of each well: its experiment and plate
    experiment = rows["experiment"].to_numpy()[first]
    plate = rows["plate"].to_numpy()[first]
    masks = group_masks[:, :logits.shape[1]]
    groups = plates.infer_plate_groups(scores, experiment, plate, masks, "prob")
    plate_code = plates.plate_ids(experiment, plate)
    labels = np.full(len(codes), -1, dtype=np.int64)
    for members, classes, block in plates.split_by_group(scores, groups, masks):
        plates.log_softmax(block, out=block)
        found = plates.assign_plates(block, plate_code[members], fill_unassigned=True)
        labels[members] = np.where(found >= 0, classes[found], -1)
    predicted[treated] = np.where(labels[inverse] >= 0, labels[inverse], predicted[treated])
    return predicted


def training_track(state: dict | None, table: pd.DataFrame, scheme: str) -> tuple[str, list[str]]:
    """('standard' or 'non-standard', why) for site predictions of the checkpoint `state`, from the
    settings it was trained with; 'unknown' for a bare weights file."""
    settings = (state or {}).get("settings")
    if not settings:
        return "unknown", ["the checkpoint records no training settings"]
    data, pseudo = settings.get("data", {}), settings.get("pseudo", {})
    reasons = []
    if scheme != "official":
        reasons.append(f"the {scheme} split (its own benchmark: training sees site 1 of the test experiments)")
    if pseudo.get("first_epoch") is not None:
        reasons.append("pseudo-labels on val and test wells (--pl-epoch)")
    if data.get("all_controls_train", True):
        reasons.append("control wells of val and test experiments in training (--all-controls-train)")
    if data.get("use_layout_leak", True) and find_layout_matches(table):
        reasons.append("test wells labelled by a layout coincidence (--use-layout-leak)")
    return ("non-standard" if reasons else "standard"), reasons


def evaluate_file(s: Settings, state: dict | None = None) -> dict:
    """Score `s.run.load`'s prediction file as RxRx1-WILDS; write and return the report."""
    root = Path(s.data.root)
    layout = metadata.detect_layout(root)
    if layout != "wilds":
        raise UsageError(f"--mode eval scores RxRx1-WILDS predictions, but {root} is in the {layout} layout "
                         "(make_submission.py scores the others)")
    scheme = "official" if s.data.split == AUTO else s.data.split
    if scheme not in wilds.SCHEMES:
        raise UsageError(f"--split {scheme}: RxRx1-WILDS splits are {' and '.join(wilds.SCHEMES)}")
    path = f"{s.run.load}.output{s.inference.pred_suffix}"
    if not Path(path).is_file():
        raise InputError(f"prediction file {path} does not exist (python main.py --mode predict --load {s.run.load} "
                         "writes it)")
    table = metadata.load_table(root)
    structure = derive_structure(table)
    cell_types = structure.cell_types
    predictions = load_predictions(path)
    parts = wilds.wilds_parts(table, scheme)
    track, reasons = training_track(state, table, scheme)
    report: dict = {"data": str(root), "predictions": path, "split": scheme, "track": track,
                    "non_standard": reasons, "site": {}, "plate_assigned": {}}
    for part in EVALUATED:
        if part not in parts:
            continue
        rows = parts[part]
        if part not in predictions or (not predictions[part] and len(rows)):
            raise InputError(f"{path} holds no {part!r} part: predict again with this code (--mode predict)")
        logits = site_logits(predictions[part], rows, path, part, scheme)
        if logits.shape[1] < structure.n_classes:
            raise InputError(f"{path}: {logits.shape[1]} classes per vector but the metadata has {structure.n_classes}")
        truth = rows["sirna_true"].to_numpy()
        report["site"][part] = wilds.wilds_metrics(rows["cell_type"], logits.argmax(1), truth, cell_types)
        if part in ASSIGNED:
            assigned = plate_assigned(rows, logits, structure.group_masks(logits.shape[1]))
            report["plate_assigned"][part] = wilds.wilds_metrics(rows["cell_type"], assigned, truth, cell_types)
    out = f"{path}.wilds.json"
    with atomic_write(out, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(format_table(report, cell_types))
    print(f"wrote {out}")
    return report


def format_table(report: dict, cell_types: tuple[str, ...]) -> str:
    """The figures as a table: one line per part and kind of prediction, accuracy per cell type."""
    head = f"{'part':<8} {'predictions':<15} {'average':>8} " + " ".join(f"{c:>8}" for c in cell_types) + "   worst"
    lines = [f"RxRx1-WILDS {report['split']} split, {report['predictions']}; site predictions: "
             f"{report['track']} track" + (f" ({'; '.join(report['non_standard'])})" if report["non_standard"] else ""),
             head]
    for part in EVALUATED:
        for kind, name in (("site", "site"), ("plate_assigned", "plate-assigned")):
            m = report[kind].get(part)
            if not m:
                continue
            cells = " ".join(f"{m[f'acc_cell_type:{c}']:8.4f}" if m[f"count_cell_type:{c}"] else f"{'-':>8}"
                             for c in cell_types)
            lines.append(f"{part:<8} {name:<15} {m['acc_avg']:8.4f} {cells}   {m['worst_cell_type']} {m['acc_wg']:.4f}")
    return "\n".join(lines)
