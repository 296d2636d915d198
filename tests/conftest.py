"""Shared fixtures: small synthetic data sets written once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellpaint.data.synthetic_config import SyntheticConfig  # noqa: E402

from cellpaint.data.synthetic import generate  # noqa: E402

# Small but complete: 4 cell types, 10 experiments, 4 plates, 8 treatment classes (2 per plate group),
# 2 positive controls and a negative well per plate, 2 sites, 24 px, a planted layout coincidence.
TINY = dict(train_experiments=(2, 2, 1, 1), test_experiments=(1, 1, 1, 1), classes=8, positive_controls=2,
            negative_wells=1, image_size=24, drop_wells=0.0, pixel_stats=True, seed=3)


@pytest.fixture(scope="session")
def tiny_competition(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny_competition")
    return out, generate(out, SyntheticConfig(layout="competition", **TINY), progress=False)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny_release")
    return out, generate(out, SyntheticConfig(layout="release", **TINY), progress=False)


# a network small enough for seconds per epoch on two cores; on the CPU also on a GPU machine, where
# exact-reproduction tests would otherwise meet cuDNN's per-process algorithm choices (the CUDA
# paths are checked by benchmarks/gpu_check.sh)
SMALL = ["--device", "cpu", "--backbone", "smallcnn", "--pretrained", "none", "--embedding-size", "32", "-b", "16",
         "--num-data-workers", "0", "--seed", "5", "--disp-batches", "5"]


def run(*argv) -> int:
    """main.py in-process (torch is imported once for the whole session)."""
    import main
    return main.main([*map(str, argv)])


@pytest.fixture(scope="session")
def trained(tiny_competition, tmp_path_factory) -> Path:
    """A 2-epoch run with pseudo-labelling from epoch 1, validation fold 0."""
    save = tmp_path_factory.mktemp("run") / "net"
    rc = run("--data", tiny_competition[0], "--save", save, "-e", 2, "--pl-epoch", 1,
             "--pl-size-func", "0.5", "--cv-number", 0, *SMALL)
    assert rc == 0
    return save


def resolved_settings(*argv):
    """The settings main.py would run with for `argv`, every "auto" settled on this CPU (what the
    engine's functions expect); the data is not read, so give a --backbone."""
    import main
    from cellpaint.engine.context import RunContext
    from cellpaint.engine.setup import resolve

    return resolve(main.parse_settings([*map(str, argv)]), RunContext(), None)
