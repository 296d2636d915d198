"""The val mode: the validation accuracy of a checkpoint, per cell type (what training logs each epoch)."""
from __future__ import annotations

import logging

from cellpaint.core.errors import UsageError
from cellpaint.core.settings import Settings
from cellpaint.engine.context import RunContext
from cellpaint.engine.inference import evaluate
from cellpaint.engine.setup import model_for_inference

log = logging.getLogger("cellpaint")


def validate(s: Settings, ctx: RunContext, state: dict | None = None) -> dict[str, float]:
    """Validate the checkpoint of --load (`state`, when already read) on the validation experiments."""
    s, data, model, _ = model_for_inference(s, ctx, state)
    metrics = evaluate(s, ctx, model, data)
    if not metrics:
        raise UsageError("no validation experiments: choose a fold with --cv-number (not -1)")
    log.info("validation: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics
