#!/usr/bin/env python3
"""Group-wise vs cell-wide kNN (make_submission.py --knn) on planted RxRx1-sized embeddings.

    python benchmarks/knn_groupwise.py [--noise 3.4,5.0,6.0] [--dim 1024] [--json OUT.json] [--export DIR]

The design is RxRx1's, from synthetic.py (no images): 4 plate groups of 277 siRNAs, 30 positive
controls and a negative one (308 wells a plate), train experiments 7,16,7,3 and test 4,8,4,2
(HEPG2, HUVEC, RPE, U2OS), a few wells dropped. Validation = the last train experiment of each
cell type, as the 41st place's split. Per site: class centre (norm ~1) + cell-type offset
(norm ~3) + experiment offset (norm ~0.3) + Gaussian noise (norm ~noise). K = 30,100,30,15,
--use-valid (validation wells join the test wells' neighbours), as the 41st place ran it.

Runs per noise level: the cell-wide search as before this change (max(cos,0) votes, group
evidence from summed probabilities), and the group-wise search (the default: sigmoid votes,
weighted-mode evidence; and with max(cos,0) votes). Prints test accuracy after each stage and
the seconds of the whole make_submission run; --json (default benchmarks/knn_groupwise.json)
writes it all. --export DIR also writes
each noise level's per-well site means (npz) for running another scorer on the same vectors.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import make_submission  # noqa: E402
from cellpaint.data import synthetic_config  # noqa: E402
from cellpaint.data import synthetic as synthetic_data  # noqa: E402
from cellpaint.core.atomic import write_text  # noqa: E402
from cellpaint.data.prediction_file import save_embeddings  # noqa: E402

CELLS = ("HEPG2", "HUVEC", "RPE", "U2OS")
VARIANTS = {
    "cell-wide (before)": ["--knn-search", "cell", "--knn-weight", "relu-cos", "--group-method", "prob"],
    "group-wise, sigmoid (default)": [],
    "group-wise, relu-cos": ["--knn-weight", "relu-cos"],
}


def planted(wells, dim: int, noise: float, seed: int) -> np.ndarray:
    """float32 [wells, 2 sites, dim]: class centre + cell-type offset + experiment offset + noise."""
    rng = np.random.default_rng(seed)
    scale = np.float32(1 / np.sqrt(dim))
    centres = rng.standard_normal((int(wells["sirna"].max()) + 1, dim), dtype=np.float32) * scale
    _, cell = np.unique(wells["cell_type"].to_numpy(), return_inverse=True)
    _, experiment = np.unique(wells["experiment"].to_numpy(), return_inverse=True)
    cells = 3 * scale * rng.standard_normal((cell.max() + 1, dim), dtype=np.float32)
    experiments = 0.3 * scale * rng.standard_normal((experiment.max() + 1, dim), dtype=np.float32)
    out = rng.standard_normal((len(wells), 2, dim), dtype=np.float32) * np.float32(noise * scale)
    out += (centres[wells["sirna"].to_numpy()] + cells[cell] + experiments[experiment])[:, None, :]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise", default="3.4,5.0,6.0", help="comma-separated noise levels")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", default="30,100,30,15")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(Path(__file__).with_suffix(".json")),
                   help="write the results here (default: benchmarks/knn_groupwise.json)")
    p.add_argument("--export", help="directory for per-well site means (npz), one file per noise level")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="knn_groupwise_") as tmp:
        results = run(a, Path(tmp))
    if results is None:
        return 1
    print(f"\n{'noise':>5}  {'variant':<32}{'knn':>8}{'groups':>8}{'assign':>8}{'groups ok':>11}{'s':>7}")
    for r in results:
        t, ok = r["test"], r["plate_groups_correct"]["test"]
        print(f"{r['noise']:>5g}  {r['variant']:<32}{t['knn']:8.3f}{t['groups']:8.3f}{t['assignment']:8.3f}"
              f"{ok['correct']:>6}/{ok['total']:<4}{r['seconds']:7.1f}")
    if a.json:
        write_text(a.json, json.dumps({"dim": a.dim, "k": a.k, "seed": a.seed, "results": results}, indent=1) + "\n")
    return 0


def run(a: argparse.Namespace, work: Path) -> list | None:
    """All noise levels and variants; None when a make_submission run failed (its error is printed)."""
    config = synthetic_config.SyntheticConfig(layout="release", cell_types=CELLS, train_experiments=(7, 16, 7, 3),
                                       test_experiments=(4, 8, 4, 2), classes=1108, plates=4,
                                       positive_controls=30, negative_wells=1, drop_wells=0.0005,
                                       leak=False, seed=a.seed)
    wells, _ = synthetic_data.write_metadata(work / "data", config)
    wells = wells[wells["well_type"] == "treatment"].reset_index(drop=True)
    split = wells["dataset"].to_numpy().astype(object)
    last = {c: max(e for e in wells.loc[wells["dataset"] == "train", "experiment"] if e.startswith(c + "-"))
            for c in CELLS}
    split[wells["experiment"].isin(last.values()).to_numpy()] = "val"
    results = []
    for noise in (float(v) for v in a.noise.split(",")):
        vectors = planted(wells, a.dim, noise, a.seed + 1)
        data = {part: {code: list(v) for code, v in zip(wells["id_code"][split == part], vectors[split == part])}
                for part in ("train", "val", "test")}
        path = work / "net.embeddings"
        save_embeddings(path, data)
        del data
        if a.export:
            Path(a.export).mkdir(parents=True, exist_ok=True)
            np.savez(Path(a.export) / f"noise_{noise:g}.npz", embedding=vectors.mean(axis=1), split=split.astype(str),
                     label=wells["sirna"].to_numpy(), experiment=wells["experiment"].to_numpy().astype(str),
                     plate=wells["plate"].to_numpy(), cell_type=wells["cell_type"].to_numpy().astype(str),
                     id_code=wells["id_code"].to_numpy().astype(str))
        del vectors
        for name, flags in VARIANTS.items():
            out = work / "sub.csv"
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its tables: in the JSON below
                rc = make_submission.main(["--data", str(work / "data"), "-o", str(out), "--knn", a.k,
                                           "--use-valid", *flags, str(path)])
            seconds = time.perf_counter() - started
            if rc != 0:
                return None
            report = json.loads(Path(f"{out}.json").read_text())
            acc = {s["stage"].split(" (")[0].split(",")[0]: s["test"]["all"] for s in report["stages"]}
            results.append({"noise": noise, "variant": name, "test": acc, "val": {
                s["stage"].split(" (")[0].split(",")[0]: s["val"]["all"] for s in report["stages"]},
                "plate_groups_correct": report["plate_groups_correct"], "seconds": round(seconds, 2),
                "knn_seconds": report["timings"]["knn"]["wall_s"]})
    return results


if __name__ == "__main__":
    sys.exit(main())
