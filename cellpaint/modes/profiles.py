"""The profiles mode: every well of the data set as a phenomic profile (`main.py --mode profiles`).

    python main.py --mode profiles --data DIR --load CKPT [--normalise none|controls|tvn] [--evaluate map]

Infers the embedding of every site of the data set (every split, every well type, with the TTA of
--tta), averages each well's sites and normalises them (cellpaint/data/profiles.py), and writes
`CKPT.profiles<suffix>.parquet`: one row a well, `Metadata_` columns and the features. With
`--evaluate map` it prints copairs' mean average precision of retrieving each siRNA's wells in
other experiments against the negative controls, and the fraction of siRNAs whose mAP is
significant, and writes them to `CKPT.profiles<suffix>.map.json` (per siRNA in `.map.csv`).
"""
from __future__ import annotations

import json
import logging

from cellpaint.core.atomic import atomic_write
from cellpaint.core.errors import DataError, UsageError
from cellpaint.core.settings import Settings
from cellpaint.data import metadata
from cellpaint.data.profiles import normalise, replicate_map, well_profiles
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import make_dataset
from cellpaint.engine.inference import infer
from cellpaint.engine.setup import model_for_inference

log = logging.getLogger("cellpaint")


def write_parquet(path: str, frame) -> None:
    try:
        import pyarrow  # noqa: F401 - pandas writes parquet through it
    except ImportError:
        raise UsageError("writing profiles as parquet needs pyarrow (pip install pyarrow)") from None
    with atomic_write(path, "wb") as f:
        frame.to_parquet(f, index=False)


def profiles(s: Settings, ctx: RunContext, state: dict | None = None) -> None:
    s, data, model, _ = model_for_inference(s, ctx, state)
    rows = data.table  # every site: all splits, all well types
    embeddings = infer(s, ctx, model, make_dataset(s, data, rows), embeddings=True).get("embedding")
    if embeddings is None:
        raise DataError(f"no readable image among the {len(rows)} sites")
    if not ctx.world.main:
        return
    table = well_profiles(rows, embeddings)
    dropped = rows["id_code"].nunique() - len(table)
    if dropped:
        log.warning("%d well(s) without a readable site have no profile", dropped)
    files = {split: str(metadata.control_file(s.data.root, split)) for split in rows["split"].unique()}
    table = normalise(table, s.run.normalise, files)
    base = f"{s.run.load}.profiles{s.inference.pred_suffix}"
    write_parquet(f"{base}.parquet", table)
    log.info("wrote %s.parquet: %d wells x %d features, normalised: %s", base, len(table),
             table.shape[1] - sum(c.startswith("Metadata_") for c in table.columns), s.run.normalise)
    if s.run.evaluate == "map":
        per_label, summary = replicate_map(table, seed=s.seed or 0)
        summary.update(normalise=s.run.normalise, profiles=f"{base}.parquet")
        with atomic_write(f"{base}.map.csv", "w") as f:
            per_label.to_csv(f, index=False)
        with atomic_write(f"{base}.map.json", "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
        print(f"replicate retrieval (same siRNA, other experiment) against negative controls, --normalise "
              f"{s.run.normalise}: mAP {summary['mean_map']:.4f} over {summary['perturbations']} siRNAs, "
              f"{summary['fraction_significant']:.1%} significant (FDR-corrected p < {summary['threshold']}); "
              f"wrote {base}.map.json")
