#!/usr/bin/env python3
"""The whole RxRx1-WILDS path in one command, on a CPU in minutes (what `make wilds-demo` runs).

    python wilds_demo.py [--data DIR] [--out DIR]

1. data: a synthetic set in the wilds layout (RGB composites, dataset = train/val/test), unless --data
2. both recipes, shortened for the CPU: recipes/wilds-standard.args (standard track) and
   recipes/wilds-transductive.args (the 1st place whole: non-standard), each trained, predicting
   the val, OOD test and ID test sites, and scored by --mode eval as RxRx1-WILDS scores them
3. the per-cell-type table of both: the standard recipe's site predictions, the transductive
   recipe's site and plate-assigned predictions (OUT/{standard,transductive}/net.*.output.wilds.json)

Synthetic figures say that the path works; they are not RxRx1 figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from cellpaint.cli import entry  # noqa: E402
from cellpaint.core import errors  # noqa: E402
from demo import SMALL_CPU  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="an existing RxRx1-WILDS data set")
    p.add_argument("--out", type=Path, default=Path("wilds-demo"), help="where everything is written")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--pl-epoch", type=int, default=10, help="the transductive recipe's first pseudo-labelling epoch")
    p.add_argument("--lr", default="cosine,3e-3,10,1e-3")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--synthetic", default="", help="extra synthetic.py flags, e.g. '--classes 20'")
    args = p.parse_args(argv)
    if not 0 <= args.pl_epoch < args.epochs:
        p.error(f"--pl-epoch must be in [0, --epochs), got {args.pl_epoch}")
    return args


def synthetic_data(out: Path, extra: str) -> Path | None:
    """A wilds-layout synthetic set in OUT/data, generated once and reused (None: it failed, and said why)."""
    import synthetic
    from cellpaint.data import synthetic as synthetic_data

    data = out / "data"
    info = data / synthetic_data.INFO_FILE
    if info.exists() and json.loads(info.read_text()).get("complete"):
        print(f"using the synthetic data already in {data}")
        return data
    return data if synthetic.main([str(data), "--layout", "wilds", *extra.split()]) == 0 else None


def recipe(args, data: Path, name: str, extra: list[str], tta: int) -> tuple[int, dict | None]:
    """Train, predict and evaluate one recipe file (shortened by the demo's flags, which come after it)."""
    import main as trainer

    save = args.out / name / "net"
    common = ["--data", str(data), *SMALL_CPU, *(["--threads", str(args.threads)] if args.threads else [])]
    rc = trainer.main([f"@{ROOT / 'recipes' / f'wilds-{name}.args'}", *common, "--save", str(save),
                       "-e", str(args.epochs), "--lr", args.lr, *extra])
    if rc:
        return rc, None
    checkpoint = f"{save}.{args.epochs - 1}"
    for mode in (["--mode", "predict", "--tta", str(tta)], ["--mode", "eval"]):
        rc = trainer.main([*common, *mode, "--load", checkpoint])
        if rc:
            return rc, None
    return errors.OK, json.loads(Path(f"{checkpoint}.output.wilds.json").read_text())


def table(results: dict[str, dict]) -> str:
    """Per cell type: the OOD test (and val) accuracy of each recipe's predictions."""
    cell_types = sorted({k.split(":", 1)[1] for r in results.values() for k in r["site"]["test"] if k.startswith("acc_cell")})
    lines = [f"{'recipe':<14} {'track':<13} {'predictions':<15} {'part':<5} {'average':>8} "
             + " ".join(f"{c:>7}" for c in cell_types) + "  worst"]
    rows = [("standard", "standard", "site"), ("transductive", "non-standard", "site"),
            ("transductive", "non-standard", "plate_assigned")]
    for name, track, kind in rows:
        for part in ("test", "val"):
            m = results[name][kind][part]
            lines.append(f"{name:<14} {track:<13} {kind.replace('_', '-'):<15} {part:<5} {m['acc_avg']:8.4f} "
                         + " ".join(f"{m[f'acc_cell_type:{c}']:7.4f}" for c in cell_types)
                         + f"  {m['worst_cell_type']} {m['acc_wg']:.4f}")
    return "\n".join(lines)


def demo(args: argparse.Namespace) -> int:
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or synthetic_data(args.out, args.synthetic)
    if data is None:
        return errors.FAILED
    results = {}
    for name, extra, tta in (("standard", [], 1),
                             ("transductive", ["--pl-epoch", str(args.pl_epoch)], 8)):
        rc, results[name] = recipe(args, data, name, extra, tta)
        if rc:
            return rc
    if results["standard"]["track"] != "standard":
        print(f"note: the standard recipe's run is {results['standard']['track']}: {results['standard']['non_standard']}")
    print(f"\nRxRx1-WILDS demo finished in {time.time() - started:.0f} s; outputs in {args.out}/ "
          "(synthetic data: these are not RxRx1 figures)\n")
    print(table(results))
    return errors.OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return entry.run(lambda: demo(args))


if __name__ == "__main__":
    sys.exit(main())
