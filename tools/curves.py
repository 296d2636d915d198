"""Training curves from the trainer's `<save>.metrics.csv` (one row per epoch) as one PNG
(cellpaint/modes/curves.py draws them; training redraws them itself).

    python -m tools.curves results/dn161_0.metrics.csv [-o results/dn161_0.curves.png]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script (python tools/curves.py): make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellpaint.cli import entry  # noqa: E402
from cellpaint.core.errors import FAILED, OK, InputError, OutputError  # noqa: E402
from cellpaint.modes.curves import default_output, plot_training_curves  # noqa: E402

PROG = "python -m tools.curves"


def draw_curves(metrics_csv: Path, out: Path) -> bool:
    if not metrics_csv.is_file():
        raise InputError(f"no such file: {metrics_csv}")
    try:
        return plot_training_curves(metrics_csv, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {' '.join(str(e).split())}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 drawn; 1 not drawn (no such CSV, no rows, no matplotlib, the PNG not
    written); 2 the command line is wrong; 130/143 interrupted."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("metrics_csv", type=Path, metavar="METRICS_CSV", help="the trainer's <save>.metrics.csv")
    p.add_argument("-o", "--output", type=Path, metavar="OUT.png",
                   help="default: <save>.curves.png beside the CSV")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = args.output or default_output(args.metrics_csv)
    return entry.run(lambda: OK if draw_curves(args.metrics_csv, out) else FAILED,
                     report=lambda line: print(f"{PROG}: error: {line}", file=sys.stderr))


if __name__ == "__main__":
    sys.exit(main())
