"""Phenomic profiles: a model's site embeddings averaged per well, normalised against negative
controls, and judged by how well a perturbation's replicates in other experiments are retrieved.

The table is what pycytominer writes: one row a well, `Metadata_` columns (experiment, plate, well,
cell type, label, well type, split, id code) and the features `emb_0000`, `emb_0001`, ...

Normalisations (`normalise`):
- `none`: the well means as they are;
- `controls`: each plate centred on the mean of its negative-control wells, then each feature
  divided by the negative controls' spread around their plates' means (pooled over plates; a
  feature is left unscaled where that spread is 0, e.g. when every plate has one control well, as
  RxRx1's do: then this is centring alone). Each plate's negative controls end at mean 0.
- `tvn` (typical variation normalisation): whitened on the negative controls of all plates: their
  mean removed and their covariance turned into the identity (ZCA, eigenvalues + 1e-6, pycytominer's
  default), so the directions in which controls vary (batch effects) are scaled down.

`replicate_map` is copairs' mean average precision (0.5.5): each treatment well of known label
ranks the wells of the same siRNA in other experiments (positives) against the negative-control
wells (negatives) by cosine similarity; a perturbation's mAP is the mean over its wells, and its
significance comes from copairs' null distribution, FDR-corrected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from cellpaint.core.errors import DataError, UsageError
from cellpaint.data.metadata import TREATMENT

NORMALISATIONS = ("none", "controls", "tvn")
EVALUATIONS = ("none", "map")
NEGATIVE = "negative_control"
FEATURE = "emb_"
TVN_EPSILON = 1e-6       # pycytominer's spherize default
MAP_NULL_SIZE = 10_000   # samples of copairs' null distribution per configuration
MAP_THRESHOLD = 0.05     # FDR-corrected p-value below which a perturbation's mAP is significant
META = {"id_code": "Metadata_id_code", "experiment": "Metadata_experiment", "plate": "Metadata_plate",
        "well": "Metadata_well", "cell_type": "Metadata_cell_type", "sirna_true": "Metadata_label",
        "well_type": "Metadata_well_type", "split": "Metadata_split"}


def feature_columns(profiles: pd.DataFrame) -> list[str]:
    return [c for c in profiles.columns if not c.startswith("Metadata_")]


def well_profiles(rows: pd.DataFrame, embeddings: np.ndarray) -> pd.DataFrame:
    """One row a well: the mean of its sites' embeddings (sites with NaN rows, unreadable, left out;
    a well with none is dropped), with its metadata. `Metadata_label` is the known label (-1 where
    nobody knows it, e.g. the competition's test treatments)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    read = np.isfinite(embeddings).all(axis=1)
    codes, inverse = np.unique(rows["id_code"].to_numpy()[read], return_inverse=True)
    sums = np.zeros((len(codes), embeddings.shape[1]))
    np.add.at(sums, inverse, embeddings[read])
    means = sums / np.bincount(inverse, minlength=len(codes))[:, None]
    meta = rows.drop_duplicates("id_code").set_index("id_code").loc[codes].reset_index()
    out = meta[list(META)].rename(columns=META)
    features = pd.DataFrame(means.astype(np.float32), columns=[f"{FEATURE}{i:04d}" for i in range(means.shape[1])])
    out = pd.concat([out.reset_index(drop=True), features], axis=1)
    return out.sort_values(["Metadata_experiment", "Metadata_plate", "Metadata_well"], kind="stable").reset_index(drop=True)


def _plate_centres(profiles: pd.DataFrame, x: np.ndarray, control_files: Mapping[str, str | Path],
                   method: str) -> tuple[np.ndarray, np.ndarray]:
    """(each well's plate centre: its plate's negative-control mean, mask of negative controls)."""
    negative = (profiles["Metadata_well_type"] == NEGATIVE).to_numpy()
    keys = profiles["Metadata_experiment"].astype(str) + "\0" + profiles["Metadata_plate"].astype(str)
    centres = np.empty_like(x)
    for key, index in keys.groupby(keys).groups.items():
        index = profiles.index.get_indexer(index)
        controls = index[negative[index]]
        if not len(controls):
            experiment, plate = key.split("\0")
            split = str(profiles["Metadata_split"].iat[index[0]])
            raise DataError(f"{control_files.get(split, '?')}: {experiment} plate {plate} has no negative-control well; "
                            f"--normalise {method} centres each plate on its own negative controls")
        centres[index] = x[controls].mean(axis=0)
    return centres, negative


def normalise(profiles: pd.DataFrame, method: str, control_files: Mapping[str, str | Path]) -> pd.DataFrame:
    """The profiles normalised by `method` (module docstring). `control_files`: split -> the file
    that lists that split's control wells, named when a plate has none."""
    if method not in NORMALISATIONS:
        raise UsageError(f"--normalise {method}: choose from {', '.join(NORMALISATIONS)}")
    if method == "none":
        return profiles
    columns = feature_columns(profiles)
    x = profiles[columns].to_numpy(np.float64)
    if method == "controls":
        centres, negative = _plate_centres(profiles, x, control_files, method)
        x = x - centres
        spread = np.sqrt((x[negative] ** 2).mean(axis=0))
        x = x / np.where(spread > 0, spread, 1.0)
    else:
        negative = (profiles["Metadata_well_type"] == NEGATIVE).to_numpy()
        if negative.sum() < 2:
            split = str(profiles["Metadata_split"].iat[0]) if len(profiles) else "train"
            raise DataError(f"{control_files.get(split, '?')}: {int(negative.sum())} negative-control well(s); "
                            "--normalise tvn whitens on the negative controls' covariance (at least 2 wells)")
        controls = x[negative]
        mean = controls.mean(axis=0)
        cov = np.cov(controls - mean, rowvar=False, bias=False).reshape(len(columns), len(columns))
        values, vectors = np.linalg.eigh(cov)
        whiten = (vectors / np.sqrt(np.maximum(values, 0) + TVN_EPSILON)) @ vectors.T
        x = (x - mean) @ whiten
    out = profiles.copy()
    out[columns] = x.astype(np.float32)
    return out


def map_inputs(profiles: pd.DataFrame) -> pd.DataFrame:
    """The wells copairs ranks: treatment wells of known label (the queries and their replicates)
    and the negative controls, with a reference column that pairs each treatment only with
    controls as negatives (copairs' usual phenotypic-activity set-up)."""
    keep = (((profiles["Metadata_well_type"] == TREATMENT) & (profiles["Metadata_label"] >= 0))
            | (profiles["Metadata_well_type"] == NEGATIVE))
    df = profiles[keep].reset_index(drop=True)
    negative = (df["Metadata_well_type"] == NEGATIVE).to_numpy()
    df["Metadata_reference"] = np.where(negative, np.arange(len(df)), -1)
    return df


POS_SAMEBY = ["Metadata_label", "Metadata_reference"]   # the same siRNA (controls never pair as positives)
POS_DIFFBY = ["Metadata_experiment"]                     # ... in another experiment
NEG_SAMEBY: list[str] = []
NEG_DIFFBY = ["Metadata_label", "Metadata_reference"]   # a treatment against a negative-control well


def replicate_map(profiles: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """copairs' average precision per treatment well and mAP per siRNA with its FDR-corrected
    p-value; and a summary: mean mAP over siRNAs, the fraction with significant mAP."""
    try:
        from copairs.map import average_precision, mean_average_precision
    except ImportError:
        raise UsageError("--evaluate map needs copairs (pip install copairs==0.5.5)") from None
    df = map_inputs(profiles)
    treated = df["Metadata_well_type"] == TREATMENT
    if not (df["Metadata_well_type"] == NEGATIVE).any() or not treated.any():
        raise DataError("--evaluate map needs treatment wells of known label and negative-control wells")
    meta = df[[c for c in df.columns if c.startswith("Metadata_")]]
    feats = df[feature_columns(profiles)].to_numpy(np.float64)
    norms = np.linalg.norm(feats, axis=1)
    flat = norms <= 1e-9 * max(float(np.median(norms)), 1e-30)
    if flat.any():  # cosine similarity to a zero vector is undefined: copairs would rank it arbitrarily
        raise DataError(f"{int(flat.sum())} profile(s) are zero vectors (e.g. {meta['Metadata_id_code'].iat[int(np.argmax(flat))]}"
                        "): a plate with a single negative-control well is its own centre under --normalise controls, "
                        "and cosine similarity to it is undefined; evaluate with --normalise none or tvn")
    ap = average_precision(meta, feats, POS_SAMEBY, POS_DIFFBY, NEG_SAMEBY, NEG_DIFFBY, progress_bar=False)
    ap = ap[ap["Metadata_well_type"] == TREATMENT]
    per_label = mean_average_precision(ap, ["Metadata_label"], null_size=MAP_NULL_SIZE, threshold=MAP_THRESHOLD,
                                       seed=seed, progress_bar=False)
    per_label = per_label.drop(columns=["indices"], errors="ignore")
    summary = {"perturbations": int(len(per_label)),
               "mean_map": float(per_label["mean_average_precision"].mean()),
               "fraction_significant": float(per_label["below_corrected_p"].mean()),
               "threshold": MAP_THRESHOLD, "null_size": MAP_NULL_SIZE,
               "queries": int(ap["average_precision"].notna().sum()),
               "negative_controls": int((df["Metadata_well_type"] == NEGATIVE).sum())}
    return per_label, summary
