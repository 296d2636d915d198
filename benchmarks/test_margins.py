#!/usr/bin/env python3
"""How far each threshold test on planted or random data passes, over seeds other than the one it uses.

    python benchmarks/test_margins.py [--seeds 0-9] [--only NAME,...] [--json OUT.json]
    ATEN_CPU_CAPABILITY=default python benchmarks/test_margins.py ...   (torch without AVX)

A test that asserts an accuracy, a ranking or a threshold decides by chance unless its margin is
wide compared with how the quantity varies between seeds (and, for torch, between instruction
sets). This runs each such test's computation (the tests' own helpers) for other seeds and prints,
per seed, the quantity, and per check the smallest margin over the seeds. The distributed learning
test is measured by running it (tests/test_distributed.py documents its figures). Results:
benchmarks/RESULTS.md, "Test margins".
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import make_submission  # noqa: E402
from tests import test_knn, test_submission  # noqa: E402


def submission(info: dict, out: Path, *extra: str, files=None) -> None:
    files = info.get("files", [info.get("file")]) if files is None else files
    with contextlib.redirect_stdout(io.StringIO()):
        rc = make_submission.main(["--data", str(info["data"]), "-o", str(out), *extra, *map(str, files)])
    assert rc == 0


# ---------------------------------------------------------------------------------- the checks
# each: seed -> {check name: margin (> 0 passes)}, plus the figures behind it


def knn_planted_labels(seed: int) -> dict:
    """test_knn_recovers_planted_labels_per_cell_type: accuracy > 0.95 (the test's seed: 1)."""
    from cellpaint.modes import knn
    rng = np.random.default_rng(seed)
    cells, n_classes, dim, per_class = test_knn.CELLS, 12, 16, 4
    centres = rng.standard_normal((n_classes, dim))
    offsets = {c: 4 * rng.standard_normal(dim) for c in cells}

    def sample(n_per_class):
        labels = np.tile(np.repeat(np.arange(n_classes), n_per_class), len(cells))
        where = np.repeat(cells, n_classes * n_per_class)
        x = centres[labels] + np.stack([offsets[c] for c in where]) + 0.5 * rng.standard_normal((len(labels), dim))
        return test_knn.unit(x), where, labels

    ref, ref_cells, ref_labels = sample(per_class)
    query, query_cells, truth = sample(2)
    scores, _ = knn.knn_scores(query, query_cells, ref, ref_cells, ref_labels, {c: 3 for c in cells},
                               n_classes + 2, np.arange(n_classes))
    acc = float((np.argmax(scores, axis=1) == truth).mean())
    return {"acc > 0.95": acc - 0.95, "_acc": acc}


def knn_cli_stages(seed: int) -> dict:
    """test_cli_knn_end_to_end: 0.2 < knn < groups < assignment on val, every val plate's group
    right (the test's seed: 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = test_knn.fake_knn_set(tmp, seed=seed)
        submission(info, tmp / "sub.csv", "--knn", "3,4,3,2")
        acc = test_knn.stages(tmp / "sub.csv")
        groups = json.loads(Path(f"{tmp}/sub.csv.json").read_text())["plate_groups_correct"]["val"]
    return {"knn > 0.2": acc["knn"] - 0.2, "groups > knn": acc["groups"] - acc["knn"],
            "assignment > groups": acc["assignment"] - acc["groups"],
            "val plate groups all right": 1.0 if groups["correct"] == groups["total"] > 0 else -1.0,
            "_acc": acc}


def knn_use_valid(seed: int) -> dict:
    """test_cli_knn_use_valid_and_test_labels: test knn with val wells as references >= without - 0.02
    (the test's seed: 5)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = test_knn.fake_knn_set(tmp, layout="release", seed=seed)
        submission(info, tmp / "plain.csv", "--knn", "3")
        submission(info, tmp / "valid.csv", "--knn", "HEPG2=3,HUVEC=3,RPE=3,U2OS=3", "--use-valid")
        a, b = test_knn.stages(tmp / "plain.csv", "test"), test_knn.stages(tmp / "valid.csv", "test")
    return {"valid >= plain - 0.02": b["knn"] - (a["knn"] - 0.02), "_test_knn": (a["knn"], b["knn"])}


def knn_group_vs_cell(seed: int) -> dict:
    """test_cli_group_search_recovers_planted_plate_groups_and_beats_cell_search: assignment
    accuracy of the group-wise search > the cell-wide one + 0.05 on test and on val, planted test
    plate groups recovered, every val plate group right (the test's seed: 1)."""
    from cellpaint.data import metadata
    from cellpaint.data.structure import derive_structure
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = test_knn.fake_knn_set(tmp, layout="release", noise=1.5, train_experiments=(4, 4, 4, 4),
                                     test_experiments=(2, 2, 2, 2), seed=seed, classes=160)
        submission(info, tmp / "group.csv", "--knn", "5")
        submission(info, tmp / "cell.csv", "--knn", "5", "--knn-search", "cell")
        report = json.loads(Path(f"{tmp}/group.csv.json").read_text())
        cell_report = json.loads(Path(f"{tmp}/cell.csv.json").read_text())
        planted = test_knn.planted_group_of(info, derive_structure(metadata.load_wells(info["data"])))
        g, c = test_knn.stages(tmp / "group.csv", "test"), test_knn.stages(tmp / "cell.csv", "test")
        gv, cv = test_knn.stages(tmp / "group.csv"), test_knn.stages(tmp / "cell.csv")
    val_groups = report["plate_groups_correct"]["val"]
    return {"test: group > cell + 0.05": g["assignment"] - c["assignment"] - 0.05,
            "val: group > cell + 0.05": gv["assignment"] - cv["assignment"] - 0.05,
            "test plate groups planted": 1.0 if report["test_plate_groups"] == planted else -1.0,
            "val plate groups all right": 1.0 if val_groups["correct"] == val_groups["total"] else -1.0,
            "_assignment": {"test": (g["assignment"], c["assignment"]), "val": (gv["assignment"], cv["assignment"])},
            "_val_plate_groups": f"{val_groups['correct']}/{val_groups['total']}",
            "_cell_val_plate_groups": "{correct}/{total}".format(**cell_report["plate_groups_correct"]["val"])}


def submission_stages(seed: int) -> dict:
    """test_accuracy_rises_stage_by_stage: average > each file, groups > ensemble, assignment >
    groups on val, every val plate group right (the test's seed: 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = test_submission.make(tmp, seed=seed)
        submission(info, tmp / "sub.csv")
        acc = test_submission.stages(tmp / "sub.csv")
        groups = json.loads(Path(f"{tmp}/sub.csv.json").read_text())["plate_groups_correct"]["val"]
    return {"average > files": acc["average"] - max(acc["file 1"], acc["file 2"]),
            "groups > ensemble": acc["groups"] - acc["ensemble"],
            "assignment > groups": acc["assignment"] - acc["groups"],
            "val plate groups all right": 1.0 if groups["correct"] == groups["total"] > 0 else -1.0,
            "_acc": acc}


def submission_release(seed: int) -> dict:
    """test_release_layout_scores_test_labels: test assignment > test ensemble (the test's seed: 4)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        info = test_submission.make(tmp, layout="release", seed=seed)
        submission(info, tmp / "sub.csv")
        acc = test_submission.stages(tmp / "sub.csv", "test")
    return {"assignment > ensemble": acc["assignment"] - acc["ensemble"], "_acc": acc}


def plate_groups(seed: int) -> dict:
    """test_plates.py's group inference on planted scores (seeds 0, 1, 2 there): every plate's
    group found, with all plates and with one plate of 4 left out, by both methods (1: all right,
    else minus the fraction of wells whose group is wrong)."""
    from cellpaint.data import plates
    from tests.test_plates import planted
    scores, experiments, plate_numbers, masks, truth, _ = planted(seed=seed)
    out = {}
    for method in ("prob", "argmax"):
        found = plates.infer_plate_groups(scores, experiments, plate_numbers, masks, method=method)
        keep = ~((experiments == "EXP-01") & (plate_numbers == 2))
        part = plates.infer_plate_groups(scores[keep], experiments[keep], plate_numbers[keep], masks, method)
        for name, got, want in (("all plates", found, truth), ("3 of 4 plates", part, truth[keep])):
            wrong = float((got != want).mean())
            out[f"{method}: {name} right"] = -wrong if wrong else 1.0
    return out


def zoom_edges(seed: int) -> dict:
    """test_zoom_box_edge_is_a_uniform_whole_number: |mean edge - 36| < 0.45 over 4000 draws (seed 0)."""
    from cellpaint.data.augment import draw_zoom_box
    rng = np.random.default_rng(seed)
    edges = np.array([draw_zoom_box(rng, 48, 48, 0.5)[2] for _ in range(4000)])
    return {"|mean - 36| < 0.45": 0.45 - abs(edges.mean() - 36), "_mean": float(edges.mean())}


def photometric(seed: int) -> dict:
    """test_aug_prob_zero_is_identity_and_one_always_applies: 0.4 < fraction rotated < 0.6 of 400;
    test_gamma_range_draws_the_inverse_of_a_uniform_gamma: |mean(1/gamma) - 1| < 0.02 of 500
    (both draw with the generators (0, 0, i): here (seed, 0, i))."""
    import torch

    from cellpaint.core.settings import AugmentSettings
    from cellpaint.data.augment import draw_photometric
    from tests.test_recipe import FORTY_FIRST

    def draws(settings, n):
        return torch.stack([draw_photometric(settings, np.random.default_rng((seed, 0, i))) for i in range(n)])
    half = float((draws(FORTY_FIRST, 400)[:, 0] != 0).float().mean())
    gammas = draws(AugmentSettings(gamma_range=(0.8, 1.2)), 500)[:, 1]
    mean = float((1 / gammas).mean())
    return {"0.4 < half < 0.6": min(half - 0.4, 0.6 - half), "|mean 1/gamma - 1| < 0.02": 0.02 - abs(mean - 1),
            "_half": half, "_inverse_gamma_mean": mean}


def stem_init(seed: int) -> dict:
    """test_stem_is_fresh_by_default_when_weights_load: a fresh 64x6x7x7 stem, max > 0.9 bound and
    |std - bound/sqrt(3)| < 0.05 bound (torch's generator, seed 0 in the test)."""
    import torch
    from torch import nn
    torch.manual_seed(seed)
    stem = nn.Conv2d(6, 64, 7, stride=2, padding=3, bias=False).weight.detach()
    bound = 1 / math.sqrt(6 * 7 * 7)
    return {"max > 0.9 bound": float(stem.abs().max()) / bound - 0.9,
            "|std - b/sqrt3| < 0.05 b": 0.05 - abs(float(stem.std()) - bound / math.sqrt(3)) / bound}


def synthetic_learnability(seed: int) -> dict:
    """test_learnable_but_not_trivial: 3 x chance < nearest-centroid accuracy < 0.9 on the default
    data set with one site a well (the test's seed: 0)."""
    from cellpaint.data.synthetic import generate
    from cellpaint.data.synthetic_config import SyntheticConfig
    from tests.test_synthetic import nearest_centroid_accuracy
    with tempfile.TemporaryDirectory() as tmp:
        config = SyntheticConfig(sites=1, seed=seed)
        generate(Path(tmp), config, progress=False)
        acc, chance = nearest_centroid_accuracy(Path(tmp), config.sites)
    return {"acc > 3 chance": acc - 3 * chance, "acc < 0.9": 0.9 - acc, "_acc": acc, "_chance": chance}


CHECKS = {f.__name__: f for f in (knn_planted_labels, knn_cli_stages, knn_use_valid, knn_group_vs_cell,
                                  submission_stages, submission_release, plate_groups, zoom_edges, photometric, stem_init,
                                  synthetic_learnability)}


def seed_range(text: str) -> list[int]:
    if "-" in text:
        a, b = map(int, text.split("-"))
        return list(range(a, b + 1))
    return [int(s) for s in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=seed_range, default=seed_range("0-9"))
    p.add_argument("--only", default=None, help="comma-separated check names: " + ", ".join(CHECKS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(CHECKS)
    results = {}
    for name in names:
        per_seed = {seed: CHECKS[name](seed) for seed in args.seeds}
        margins = {k: min(r[k] for r in per_seed.values()) for k in per_seed[args.seeds[0]] if not k.startswith("_")}
        results[name] = {"seeds": per_seed, "smallest_margin": margins}
        print(f"{name} (seeds {args.seeds[0]}..{args.seeds[-1]}):")
        for seed, r in per_seed.items():
            print(f"  seed {seed}: " + ", ".join(f"{k.lstrip('_')} {_short(v)}" for k, v in r.items()))
        print("  smallest margin: " + ", ".join(f"{k} {v:+.4f}" for k, v in margins.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


def _short(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_short(x) for x in v) + ")"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
