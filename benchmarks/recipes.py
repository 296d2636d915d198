#!/usr/bin/env python3
"""Both recipes on the same synthetic data set (CPU, small configuration), stage accuracies side by side.

    python benchmarks/recipes.py [--out runs/recipes] [--epochs 20]

1st place: softmax + ArcFace, pseudo-labelling, logits -> plate groups -> assignment.
41st place: cross-entropy only, a head with a hidden layer, a slower backbone learning rate,
rotation/brightness/contrast/gamma augmentation, no pseudo-labels; TTA-averaged embeddings -> kNN per cell type -> plate groups -> assignment.
The small CPU configuration (demo.py's) stands in for DenseNet161/201 at 512 px.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402


def run_recipe(name: str, data: Path, out: Path, train: list[str], predict: list[str],
               submit: list[str], epochs: int, pred_file: str) -> tuple[dict, float]:
    import main as trainer
    import make_submission

    started = time.time()
    save = out / name
    common = ["--data", str(data), *demo.SMALL_CPU]
    # --overwrite: --out is this benchmark's own folder, run again (a --save holding a run is refused otherwise)
    if trainer.main([*common, "--save", str(save), "-e", str(epochs), "--overwrite", *train]):
        raise SystemExit(f"{name}: training failed")
    checkpoint = f"{save}.{epochs - 1}"
    if trainer.main([*common, "--mode", "predict", "--load", checkpoint, *predict]):
        raise SystemExit(f"{name}: prediction failed")
    sub = out / f"{name}.csv"
    if make_submission.main(["--data", str(data), "-o", str(sub), *submit, f"{checkpoint}.{pred_file}"]):
        raise SystemExit(f"{name}: submission failed")
    return json.loads(Path(f"{sub}.json").read_text()), time.time() - started


def final_scores(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    for stage in report["stages"]:
        cells = [stage.get(s, {}).get("all") if isinstance(stage.get(s), dict) else None for s in ("val", "test")]
        rows.append((stage["stage"], *(f"{c:.4f}" if isinstance(c, (int, float)) else "-" for c in cells)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/recipes"))
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or demo.synthetic_data(args.out, "")
    pl = str(args.epochs * 3 // 5)
    first, t1 = run_recipe("first", data, args.out,
                           ["--pl-epoch", pl, "--pl-size-func", "0.6*x+0.4", "--lr", f"cosine,3e-3,{pl},1e-3"],
                           ["--tta", "8"], [], args.epochs, "output")
    second, t2 = run_recipe("second", data, args.out,
                            ["--metric-loss-coeff", "0", "--head-hidden", "256", "--backbone-lr-mult", "0.5",
                             "--lr", "cosine,3e-3", "--rotate-aug", "15", "--brightness-aug", "0.1",
                             "--contrast-aug", "0.1", "--gamma-aug", "0.1"],
                            ["--tta", "10", "--tta-size", "0.9", "--save-embeddings"], ["--knn", "5"],
                            args.epochs, "embeddings")
    print(f"\nrecipes on {data} ({args.epochs} epochs each; val = fold 0 experiments, test = test experiments)")
    print(f"{'1st place (logits)':<44}{'val':>8}{'test':>8}   |   {'41st place (kNN)':<40}{'val':>8}{'test':>8}")
    a, b = final_scores(first), final_scores(second)
    for i in range(max(len(a), len(b))):
        left = a[i] if i < len(a) else ("", "", "")
        right = b[i] if i < len(b) else ("", "", "")
        print(f"{left[0]:<44}{left[1]:>8}{left[2]:>8}   |   {right[0]:<40}{right[1]:>8}{right[2]:>8}")
    print(f"{'time':<44}{t1:>15.0f}s   |   {'':<40}{t2:>15.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
