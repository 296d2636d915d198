"""The trainer end to end on a tiny synthetic set (CPU): schedules, targets, checkpoints, resume,
pseudo-labelling and the prediction file."""
from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import main
from cellpaint.core.errors import UsageError
from cellpaint.core.schedule import LRSchedule, SizeFunction
from cellpaint.data import metadata
from cellpaint.data.folds import assign_folds, split_subsets
from cellpaint.data.layout_matches import apply_layout_matches, find_layout_matches
from cellpaint.data.structure import Structure, derive_structure
from cellpaint.engine import mixing
from cellpaint.engine.data import load_data
from cellpaint.engine.setup import build_model, make_optimizer
from cellpaint.modes import pseudo_labels
from tests.conftest import SMALL, run

# ------------------------------------------------------------------------------ pure functions


def test_lr_schedule_matches_the_formula():
    lr = LRSchedule.parse("cosine,1.5e-4,90,6e-5,150,0")
    cosine = lambda v, t, start, end: v * (math.cos((t - start) / (end - start) * math.pi) + 1) / 2
    assert lr(0, 130) == pytest.approx(1.5e-4)
    assert lr(45, 130) == pytest.approx(cosine(1.5e-4, 45, 0, 90)) == pytest.approx(0.75e-4)
    assert lr(89.5, 130) == pytest.approx(cosine(1.5e-4, 89.5, 0, 90))
    assert lr(90, 130) == pytest.approx(6e-5)
    assert lr(120, 130) == pytest.approx(cosine(6e-5, 120, 90, 150)) == pytest.approx(3e-5)
    assert lr(129.99, 130) == pytest.approx(cosine(6e-5, 129.99, 90, 150))
    const = LRSchedule.parse("const,1e-3,2,1e-4")
    assert (const(1.9, 4), const(2, 4), const(3.9, 4)) == (1e-3, 1e-4, 1e-4)
    single = LRSchedule.parse("cosine,1e-3")
    assert single(0, 10) == 1e-3 and single(5, 10) == pytest.approx(5e-4)


@pytest.mark.parametrize("text, message", [
    ("cosine,1e-3,5", "odd count"), ("linear,1e-3", "schedule must be"), ("cosine,1e-3,x,1e-4", "not a number"),
    ("cosine,1e-3,10,1e-4,5,0", "increasing"), ("cosine,-1", ">= 0")])
def test_lr_schedule_rejects_bad_text(text, message):
    with pytest.raises(ValueError, match=message):
        LRSchedule.parse(text)


def test_size_function_is_evaluated_safely():
    f = SizeFunction("0.6*x+0.4")
    assert f(0) == pytest.approx(0.4) and f(1) == pytest.approx(1.0) and f(0.5) == pytest.approx(0.7)
    assert SizeFunction("min(1, sqrt(x) + 0.1)")(0.25) == pytest.approx(0.6)
    for bad in ("__import__('os')", "x.real", "open('f')", "[x]", "x if x else 1", "'a'", "9**9**9", "lambda: 1"):
        with pytest.raises(ValueError, match="pl-size-func"):
            SizeFunction(bad)


def test_mixed_targets_sum_to_one():
    rng = np.random.default_rng(0)
    x = torch.rand(8, 6, 16, 16)
    cell = torch.eye(4)[torch.randint(0, 4, (8,))]
    target = torch.eye(10)[torch.randint(0, 10, (8,))] * 0.9 + 0.01
    for fn in (mixing.mixup, mixing.cutmix):
        for _ in range(5):
            mx, mc, mt = fn(x, cell, target, 1.0, rng)
            assert mx.shape == x.shape
            assert torch.allclose(mt.sum(1), torch.ones(8)) and torch.allclose(mc.sum(1), torch.ones(8))
    # each sample's target weights are its share of the mixed input: with one-hot targets and every
    # sample's partner another sample, the partner's weight is the blend weight (mixup) or the
    # fraction of pixels pasted from it (cutmix)
    perm = np.roll(np.arange(8), 1)
    pasted_any = False
    for seed in range(6):
        mx, _, mt = mixing.mixup(x, cell, torch.eye(8), 1.0, np.random.default_rng(seed), perm)
        lam = mt.diagonal()
        assert torch.allclose(mt.sum(1), torch.ones(8)) and torch.allclose(mt[np.arange(8), perm], 1 - lam)
        assert torch.allclose(mx, lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm], atol=1e-6)
        mx, _, mt = mixing.cutmix(x, cell, torch.eye(8), 1.0, np.random.default_rng(seed), perm)
        pasted = (mx != x).any(1).flatten(1).float().mean(1)  # per sample, the area that changed
        assert torch.allclose(mt.sum(1), torch.ones(8)) and torch.allclose(mt[np.arange(8), perm], pasted, atol=1e-6)
        assert torch.allclose(mt.diagonal(), 1 - pasted, atol=1e-6)
        pasted_any |= bool((pasted > 0).all())
    assert pasted_any  # some draw pasted a box (a check of no area at all would check nothing)


def test_pl_fraction_follows_the_original_schedule():
    """x = (e - pl + 1) / (E - pl + 1): the 1st place's recipe (130 epochs, pl 90, 0.6x+0.4)
    labels 41.46% of the candidates at epoch 90 and 98.54% at the last epoch, never 100%."""
    f = SizeFunction("0.6*x+0.4")
    assert pseudo_labels.pl_fraction(f, 90, 90, 130) == pytest.approx(0.6 / 41 + 0.4)
    assert pseudo_labels.pl_fraction(f, 90, 90, 130) == pytest.approx(0.414634, abs=1e-6)
    assert pseudo_labels.pl_fraction(f, 129, 90, 130) == pytest.approx(0.985366, abs=1e-6)
    # wells labelled by each epoch of the recipe for 19,897 candidate wells (round(f(x) * N))
    n = 19_897
    counts = [round(pseudo_labels.pl_fraction(f, e, 90, 130) * n) for e in range(90, 130)]
    assert counts[0] == 8250 and counts[1] == 8541 and counts[-1] == 19606
    assert all(b > a for a, b in zip(counts, counts[1:]))
    # with the default x the first pseudo-labelling epoch already labels 1/(E - pl + 1)
    assert pseudo_labels.pl_fraction(SizeFunction("x"), 90, 90, 130) == pytest.approx(1 / 41)
    assert pseudo_labels.pl_fraction(SizeFunction("min(1, 2*x)"), 129, 90, 130) == 1.0


def test_pseudo_label_selection_respects_plates():
    """Planted: 2 experiments x 2 plates, 2 groups of 3 classes; plate groups must be inferred."""
    structure = Structure(7, np.arange(6), np.array([6]), (np.array([0, 2, 4]), np.array([1, 3, 5])),
                          ("A",))
    rng = np.random.default_rng(0)
    rows, logits = [], []
    truth = {("E1", 1): [0, 2, 4], ("E1", 2): [1, 3, 5], ("E2", 1): [1, 3, 5], ("E2", 2): [0, 2, 4]}
    for (exp, plate), classes in truth.items():
        for k, c in enumerate(classes):
            rows.append({"id_code": f"{exp}_{plate}_W{k}", "experiment": exp, "plate": plate})
            v = rng.normal(0, 0.3, 7)
            v[c] += 3.0 if k else 2.0
            if k == 0:
                v[(c + 1) % 6] += 2.5  # a stronger competitor from the other group
            logits.append(v)
    wells = pd.DataFrame(rows)
    logits = np.array(logits, dtype=np.float32)
    empty = pd.DataFrame({"experiment": [], "plate": []})
    chosen = pseudo_labels.select(wells, logits, structure, empty, np.zeros(0, np.int64), count=9, duplicates="refill")
    assert len(chosen) == 9
    by_plate = {}
    for code, label in chosen.items():
        exp, plate, _ = code.split("_")
        assert label in truth[(exp, int(plate))]  # group inferred right, other group excluded
        by_plate.setdefault((exp, plate), []).append(label)
    assert all(len(v) == len(set(v)) for v in by_plate.values())
    # classes already labelled on a plate are not given again, and their wells vote for the group
    labelled = pd.DataFrame({"experiment": ["E1"], "plate": [1]})
    again = pseudo_labels.select(wells, logits, structure, labelled, np.array([0]), count=12, duplicates="refill")
    assert all(label != 0 for code, label in again.items() if code.startswith("E1_1_"))
    assert len(again) == 11  # 12 wells, class 0 of E1 plate 1 is taken: one well cannot be labelled


# ------------------------------------------------------------------------------ end to end


def test_training_writes_checkpoints_log_and_metrics(trained):
    for suffix in (".0", ".1", "", ".log", ".metrics.csv"):
        assert trained.with_name(trained.name + suffix).exists(), suffix
    metrics = pd.read_csv(f"{trained}.metrics.csv")
    assert metrics["epoch"].tolist() == [0, 1]
    assert {"train_loss", "acc", "lr", "pseudo_labels"} <= set(metrics.columns)
    log = trained.with_name(trained.name + ".log").read_text()
    assert "layout coincidence" in log and "pseudo-labels at epoch 1" in log
    state = torch.load(f"{trained}.1", weights_only=True)
    assert state["epoch"] == 1 and {"model", "optimizer", "scaler", "settings", "pseudo_labels"} <= set(state)


def test_pseudo_labels_follow_the_schedule(trained, tiny_competition):
    state = torch.load(f"{trained}.1", weights_only=True)
    table = metadata.load_table(tiny_competition[0])
    table = apply_layout_matches(table, find_layout_matches(table))
    subsets = split_subsets(table, assign_folds(table, 6, 0), 0)
    candidates = pseudo_labels.candidate_sites(subsets)["id_code"].unique()
    labels = state["pseudo_labels"]
    # asked for round(f * N); the duplicate rule may drop some of those, never add more
    assert 0 < len(labels) <= round(0.5 * len(candidates)) and set(labels) <= set(candidates)
    wells = metadata.wells_of(table).set_index("id_code")
    seen = set()
    for code, label in labels.items():
        key = (wells.at[code, "experiment"], wells.at[code, "plate"], label)
        assert key not in seen
        seen.add(key)


def test_resume_reproduces_uninterrupted_weights(trained, tmp_path, tiny_competition):
    shutil.copy(f"{trained}.0", tmp_path / "again.0")
    rc = run("--data", tiny_competition[0], "--resume", tmp_path / "again.0", "-e", 2, "--pl-epoch", 1,
             "--pl-size-func", "0.5", "--cv-number", 0, *SMALL)
    assert rc == 0
    a = torch.load(f"{trained}.1", weights_only=True)
    b = torch.load(tmp_path / "again.1", weights_only=True)
    assert a["pseudo_labels"] == b["pseudo_labels"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    assert "resumed" in (tmp_path / "again.log").read_text()


def test_predict_writes_the_pickle_structure(trained, tiny_competition):
    rc = run("--mode", "predict", "--data", tiny_competition[0], "--load", f"{trained}.1", "--tta", 3,
             "--pred-suffix", "_x", "--save-embeddings", "--cv-number", 0, *SMALL)
    assert rc == 0
    with open(f"{trained}.1.output_x", "rb") as f:
        output = pickle.load(f)
    table = metadata.load_table(tiny_competition[0])
    subsets = split_subsets(table, assign_folds(table, 6, 0), 0)
    assert set(output) == {"test", "val"}
    for part in ("test", "val"):
        assert set(output[part]) == set(subsets[part]["id_code"])
        for sites in output[part].values():
            assert isinstance(sites, list) and len(sites) == 2
            assert all(v.dtype == np.float32 and v.shape == (11,) for v in sites)
    with open(f"{trained}.1.embeddings_x", "rb") as f:
        emb = pickle.load(f)
    assert next(iter(emb["test"].values()))[0].shape == (32,)
    train = subsets["train"]
    labelled = train[(train["well_type"] == "treatment") & (train["split"] == "train")]
    assert set(emb["train"]) == set(labelled["id_code"]) and set(emb["val"]) == set(output["val"])
    assert (trained.parent / "net.1.output_x.log").exists() and not (trained.parent / "net.1.output_x.log.partial").exists()


def test_a_failed_predict_keeps_the_last_good_log(trained, tiny_competition, tmp_path):
    """The log of a prediction is renamed into place only when the prediction succeeds."""
    args = ["--mode", "predict", "--load", f"{trained}.1", "--pred-suffix", "_keep", "--cv-number", 0, *SMALL]
    assert run("--data", tiny_competition[0], *args) == 0
    good_log = Path(f"{trained}.1.output_keep.log")
    before, output = good_log.read_text(), Path(f"{trained}.1.output_keep").read_bytes()
    broken = tmp_path / "data"
    shutil.copytree(tiny_competition[0], broken)
    victim = next((broken / "test").rglob("*_w1.png"))
    victim.unlink()
    assert run("--data", broken, *args) == 1
    assert good_log.read_text() == before and Path(f"{trained}.1.output_keep").read_bytes() == output
    assert f"missing image: {victim}" in Path(f"{good_log}.partial").read_text()


def test_val_mode_reports_accuracy(trained, tiny_competition, caplog):
    """The accuracies --mode val logs are those of the checkpoint's val predictions: each site's
    best treatment class against its label, overall and per cell type (the default --val-unit site)."""
    with caplog.at_level("INFO", logger="cellpaint"):
        assert run("--mode", "val", "--data", tiny_competition[0], "--load", trained, *SMALL) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("validation: "))
    reported = {k: float(v) for k, v in (item.split() for item in line[len("validation: "):].split(", "))}
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", trained, "--pred-suffix", "_acc", *SMALL) == 0
    from cellpaint.data.prediction_file import load_predictions
    val = load_predictions(f"{trained}.output_acc")["val"]
    table = metadata.load_table(tiny_competition[0])
    treatment = derive_structure(table).treatment_classes
    wells = table.drop_duplicates("id_code").set_index("id_code")
    hits: dict[str, list[bool]] = {}
    for code, sites in val.items():
        for logits in sites:
            hit = treatment[int(np.argmax(logits[treatment]))] == wells.at[code, "sirna"]
            hits.setdefault("acc", []).append(hit)
            hits.setdefault(f"acc_{wells.at[code, 'cell_type']}", []).append(hit)
    assert len(hits["acc"]) == len(table[table["id_code"].isin(val)]) > 0  # every val site, once
    assert set(reported) == set(hits) and len(hits) >= 2  # overall and per cell type
    for key, values in hits.items():
        assert reported[key] == pytest.approx(np.mean(values), abs=5e-5), key


@pytest.mark.parametrize("argv, message", [
    (["--lr", "cosine,1e-3,5"], "odd count"),
    (["--pl-size-func", "__import__('os')"], "is not allowed"),
    (["--cv-number", "7"], "--cv-number"),
    (["-b", "0"], "--batch-size 0: must be an integer >= 1 (on the command line)"),
    (["--tta", "9"], "--tta 9"),
    (["--concat-cell-type", "maybe"], "expected true/false"),
])
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main.parse_settings(["--save", str(tmp_path / "x"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_checkpoints_are_refused(tmp_path, tiny_competition, trained, caplog, capsys):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a checkpoint")
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", junk, *SMALL) == 1
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", tmp_path / "missing", *SMALL) == 1
    state = torch.load(f"{trained}.1", weights_only=True)
    state["settings"]["model"]["backbone"] = "resnet34"
    torch.save(state, tmp_path / "other")
    # --load takes the architecture from the checkpoint: typing another one is refused (exit 2) ...
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", tmp_path / "other", *SMALL) == 2
    assert "--backbone smallcnn contradicts --load" in capsys.readouterr().err
    # ... and weights that do not fit the architecture the checkpoint names are refused too
    caplog.clear()
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", tmp_path / "other", "--device", "cpu",
               "--num-data-workers", 0) == 1
    assert "does not fit this model" in caplog.text and "made with --backbone resnet34" in caplog.text
    assert not (tmp_path / "other.output").exists()
    # a bare weights file for another class count: the same weight names with other shapes
    torch.save(state["model"], tmp_path / "bare")
    caplog.clear()
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", tmp_path / "bare", "--classes", 13,
               *SMALL) == 1
    assert f"{tmp_path / 'bare'} does not fit this model (size mismatch" in caplog.text
    assert not (tmp_path / "bare.output").exists()
    caplog.clear()  # weights alone cannot continue a run: there is no optimizer state or epoch in them
    assert run("--data", tiny_competition[0], "--resume", tmp_path / "bare", "-e", 2, *SMALL) == 1
    assert "a bare weights file cannot resume a run (use --load)" in capsys.readouterr().err
    assert not (tmp_path / "bare.0").exists()


def test_layer_wise_learning_rates(tmp_path):
    # built straight from the arguments: a real name, as main's modes resolve --backbone auto first
    s = main.parse_settings(["--save", str(tmp_path / "x"), "--backbone-lr-mult", "0.1", "--lr", "const,1e-3",
                             "--backbone", "mem-densenet161"])
    model = build_model(s.model, 11, 4, "none", in_channels=6)
    optimizer = make_optimizer(s.optim, model)
    backbone, head = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(1e-4) and head["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert len(backbone["params"]) + len(head["params"]) == len(list(model.parameters()))
    with pytest.raises(SystemExit):
        main.parse_settings(["--save", str(tmp_path / "x"), "--backbone-lr-mult", "-1"])


def test_finetune_cell_type_keeps_one_cell_type(tiny_competition, tmp_path):
    s = main.parse_settings(["--data", str(tiny_competition[0]), "--save", str(tmp_path / "x"),
                             "--finetune-cell-type", "HUVEC", *SMALL])
    data = load_data(s.data)
    for part, rows in data.subsets.items():
        assert set(rows["cell_type"]) <= {"HUVEC"}, part
    assert len(data.subsets["train"]) and len(data.subsets["test"])
    assert data.structure.cell_types == ("HEPG2", "HUVEC", "RPE", "U2OS")  # the model's inputs are unchanged
    with pytest.raises(UsageError, match="--finetune-cell-type NOPE"):
        load_data(s.replace(data={"finetune_cell_type": "NOPE"}).data)


def test_finetune_cell_type_without_validation_wells_says_so(tiny_competition, tmp_path, caplog):
    table = metadata.load_table(tiny_competition[0])
    train = sorted(table.loc[table["split"] == "train", "experiment"].unique())
    other = next(e for e in train if not e.startswith("HUVEC"))
    s = main.parse_settings(["--data", str(tiny_competition[0]), "--save", str(tmp_path / "x"),
                             "--finetune-cell-type", "HUVEC", "--val-experiments", other, *SMALL])
    with caplog.at_level("WARNING", logger="cellpaint"):
        data = load_data(s.data)
    assert data.subsets["val"].empty
    assert "--finetune-cell-type HUVEC: the validation experiments hold none of its wells" in caplog.text


def test_merge_per_cell_type_predictions(tmp_path, capsys):
    from cellpaint.data.prediction_file import load_predictions, save_predictions
    from tools import merge_predictions
    v = lambda: [np.zeros(5, np.float32), np.ones(5, np.float32)]
    save_predictions(tmp_path / "a.output", {"test": {"A_1_B02": v()}, "val": {"A_2_B02": v()}})
    save_predictions(tmp_path / "b.output", {"test": {"B_1_B02": v()}, "val": {}})
    assert merge_predictions.main(["-o", str(tmp_path / "m.output"), str(tmp_path / "a.output"),
                                   str(tmp_path / "b.output")]) == 0
    merged = load_predictions(tmp_path / "m.output")
    assert set(merged["test"]) == {"A_1_B02", "B_1_B02"} and set(merged["val"]) == {"A_2_B02"}
    assert merge_predictions.main(["-o", str(tmp_path / "n.output"), str(tmp_path / "a.output"),
                                   str(tmp_path / "a.output")]) == 1
    assert "A_1_B02 (test) is also in" in capsys.readouterr().err and not (tmp_path / "n.output").exists()


def test_channels_last_training_runs(tiny_competition, tmp_path):
    assert run("--data", tiny_competition[0], "--save", tmp_path / "cl", "-e", 1, "--cv-number", -1,
               "--channels-last", "true", *SMALL) == 0
    state = torch.load(tmp_path / "cl.0", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state["model"])


def test_a_full_disk_in_predict_is_one_line_and_keeps_the_last_prediction(trained, tiny_competition, monkeypatch,
                                                                          capsys):
    args = ["--mode", "predict", "--data", tiny_competition[0], "--load", f"{trained}.1", "--pred-suffix", "_full",
            "--cv-number", 0, *SMALL]
    assert run(*args) == 0
    output = Path(f"{trained}.1.output_full")
    before = output.read_bytes()

    def full(*_, **__):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pickle, "dump", full)
    capsys.readouterr()
    assert run(*args) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR" in line]
    assert len(errors) == 1 and errors[0].endswith(f"cannot write {output}: No space left on device")
    assert output.read_bytes() == before
    assert not [p for p in output.parent.iterdir() if p.name.endswith(".tmp")]
