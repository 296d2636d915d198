"""Merge prediction (or embeddings) files that cover disjoint wells into one file.

    python -m tools.merge_predictions -o merged.output HEPG2.output HUVEC.output RPE.output U2OS.output

The per-cell-type recipe predicts each cell type with its own fine-tuned model
(`main.py --mode predict --finetune-cell-type X --load X.ckpt`); the merged file then goes to
make_submission.py like any other. A well present in two files is an error: merging is not
ensembling (list several files in make_submission.py for that).
"""
from __future__ import annotations

import argparse
import sys

from cellpaint.cli import entry
from cellpaint.core.outputs import check_not_inputs
from cellpaint.data.prediction_file import PredictionFileError, load_predictions, save_predictions


def merge(paths: list[str], kind: str = "logits") -> dict[str, dict]:
    merged: dict[str, dict] = {}
    origin: dict[tuple[str, str], str] = {}
    length = None
    for path in paths:
        for part, wells in load_predictions(path, kind=kind).items():
            target = merged.setdefault(part, {})
            for code, sites in wells.items():
                if (part, code) in origin:
                    raise PredictionFileError(f"{path}: well {code} ({part}) is also in {origin[part, code]}")
                if length is not None and sites[0].shape[0] != length:
                    raise PredictionFileError(f"{path}: vectors of length {sites[0].shape[0]}, "
                                              f"the other files have {length}")
                length = sites[0].shape[0]
                origin[part, code] = path
                target[code] = sites
    return merged


def write_merged(args: argparse.Namespace) -> None:
    kind = "embeddings" if args.embeddings else "logits"
    check_not_inputs([args.output], {f: "a file to merge" for f in args.files}, "merge_predictions -o")
    merged = merge(args.files, kind)
    save_predictions(args.output, merged, kind=kind)
    print(f"wrote {args.output}: " + ", ".join(f"{len(v)} {k} wells" for k, v in merged.items()))


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 written; 1 the files cannot be merged, or the output not written (the one line
    names the file); 2 the command line is wrong; 130/143 interrupted."""
    p = argparse.ArgumentParser(prog="python -m tools.merge_predictions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--embeddings", action="store_true", help="the files are embeddings files")
    args = p.parse_args(argv)
    return entry.run(lambda: write_merged(args))


if __name__ == "__main__":
    sys.exit(main())
