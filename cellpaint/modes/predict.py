"""The predict mode: per-site logits (and embeddings) of a checkpoint, written as a prediction file.

main.py calls `predict` with the run's settings (the architecture taken from the checkpoint of
--load), its context and that checkpoint.
"""
from __future__ import annotations

import logging

import numpy as np

from cellpaint.core.errors import DataError
from cellpaint.core.settings import Settings
from cellpaint.data import metadata
from cellpaint.data.prediction_file import save_embeddings, save_predictions
from cellpaint.data.wells import sites_by_well
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import make_dataset
from cellpaint.engine.inference import infer
from cellpaint.engine.setup import model_for_inference

log = logging.getLogger("cellpaint")


def predict(s: Settings, ctx: RunContext, state: dict | None = None) -> None:
    """Per-site logits of test and val wells (and, with --save-embeddings, embeddings of the
    labelled train treatment wells too: the kNN recipe's reference set)."""
    s, data, model, _ = model_for_inference(s, ctx, state)
    if data.subsets["test"].empty:  # the prediction file is for a submission: every test well, and there are none
        cell = f" of --finetune-cell-type {s.data.finetune_cell_type}" if s.data.finetune_cell_type else ""
        raise DataError(f"{s.data.root}: the data set has no test wells{cell} (a test.csv with only its header?): "
                        "nothing to predict")
    load, suffix, with_embeddings = s.run.load, s.inference.pred_suffix, s.inference.save_embeddings
    output: dict[str, dict] = {}
    embeddings: dict[str, dict] = {}
    train = data.subsets["train"]
    parts = {"test": data.subsets["test"], "val": data.subsets["val"]}
    if "id_test" in data.subsets:  # the official RxRx1-WILDS split's in-distribution test
        parts["id_test"] = data.subsets["id_test"]
    if with_embeddings:
        parts["train"] = train[(train["well_type"] == metadata.TREATMENT) & (train["split"] == "train")]
    for part, rows in parts.items():
        result = infer(s, ctx, model, make_dataset(s, data, rows), embeddings=with_embeddings, data=data)
        for key, target in (("logits", output), ("embedding", embeddings)):
            if key == "logits" and part == "train":
                continue
            if key == "embedding" and not with_embeddings:
                continue
            vectors = result.get(key)
            if vectors is None:
                if len(rows):
                    raise DataError(f"no readable image among the {len(rows)} {part} sites")
                target.setdefault(part, {})
                continue
            values = target.setdefault(part, {})
            values.update(sites_by_well(rows["id_code"], vectors))
            unread = [code for code in dict.fromkeys(rows["id_code"]) if code not in values]
            if unread and part != "train":  # every val/test well must be in the file: give it a neutral vector
                for code in unread:
                    values[code] = [np.zeros(vectors.shape[1], dtype=np.float32)]
                log.warning("%s: %d %s well(s) without a readable image get an all-zero %s vector (e.g. %s)",
                            load, len(unread), part, key, unread[0])
    if not ctx.world.main:
        return
    path = f"{load}.output{suffix}"
    save_predictions(path, output)
    log.info("wrote %s: %d test and %d val wells%s", path, len(output["test"]), len(output["val"]),
             f" and {len(output['id_test'])} ID test wells" if "id_test" in output else "")
    if with_embeddings:
        save_embeddings(f"{load}.embeddings{suffix}", embeddings)
        log.info("wrote %s.embeddings%s (train %d, val %d, test %d wells)", load, suffix,
                 *(len(embeddings[k]) for k in ("train", "val", "test")))
