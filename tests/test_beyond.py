"""Beyond the 1st place (issue 24): other top teams' options, each off by default and each checked by
what it must do: the EMA update and its resume, same-plate batches on one process and under
torchrun, AdaBN's per-plate statistics, Sinkhorn/column balancing, plate-centred kNN and
progressive resizing, and one-line errors for their bad values."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import dataset
import main
import make_submission
from cellpaint.core.schedule import SizeSchedule
from cellpaint.core.settings import DataSettings, settings_dict, settings_from_dict
from cellpaint.data import plates
from cellpaint.data.augment import resize_batch
from cellpaint.data.prediction_file import load_predictions
from cellpaint.data.sampling import domain_keys, group_batches
from cellpaint.engine import adabn, distributed
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import load_data, make_dataset, make_loader
from cellpaint.engine.ema import WeightAverage, ema_decay
from cellpaint.engine.inference import infer
from cellpaint.engine.setup import model_for_inference
from cellpaint.modes import knn
from tests.conftest import SMALL, resolved_settings, run
from tests.test_distributed import PROCESSES, probe, torchrun

# same-plate batches need the network without the cell-type one-hot (see flags.problems)
NO_ONEHOT = ["--concat-cell-type", "false"]


def one_line_usage_error(capsys, flag: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ EMA


def test_ema_update_equals_its_formula():
    """ema <- d_t * ema + (1 - d_t) * weights after step t, d_1 = 0 (a copy), d_t = min(D, 1 - t^(-2/3)),
    for every parameter and floating buffer (BatchNorm statistics); integer buffers are copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    decay = 0.9
    average = WeightAverage(model, decay)
    previous = {k: v.clone() for k, v in average.module.state_dict().items()}
    for step in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 5))  # moves the BatchNorm statistics and the batch counter
        average.update()
        d = 0.0 if step == 1 else min(decay, 1 - step ** (-2 / 3))
        assert ema_decay(decay, step) == pytest.approx(d, abs=1e-15)
        got = average.module.state_dict()
        for k, v in model.state_dict().items():  # one step of the formula from the average before it
            expected = d * previous[k] + (1 - d) * v if v.is_floating_point() else v
            assert torch.allclose(got[k], expected, rtol=1e-6, atol=1e-6), (step, k)
        assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"]) or step == 1
        previous = {k: v.clone() for k, v in got.items()}
    assert average.steps == 39 and ema_decay(decay, 39) == decay  # the warm-up is over by then


@pytest.fixture(scope="module")
def ema_runs(tiny_competition, tmp_path_factory):
    """Two epochs with --model-ema and progressive resizing, pseudo-labels from epoch 1: straight
    through, and again resumed from the first epoch's checkpoint."""
    root = tmp_path_factory.mktemp("ema")
    args = ["--data", tiny_competition[0], "-e", 2, "--pl-epoch", 1, "--pl-size-func", "0.5", "--cv-number", 0,
            "--model-ema", 0.8, "--image-size-schedule", "16:0,24:1", *SMALL]
    assert run(*args, "--save", root / "straight" / "net") == 0
    (root / "resumed").mkdir()
    shutil.copy(root / "straight" / "net.0", root / "resumed" / "net.0")
    assert run("--data", tiny_competition[0], "--resume", root / "resumed" / "net.0", *SMALL) == 0
    return root


def test_a_resumed_ema_run_ends_with_the_same_weights(ema_runs):
    a = torch.load(ema_runs / "straight" / "net.1", weights_only=True)
    b = torch.load(ema_runs / "resumed" / "net.1", weights_only=True)
    assert a["pseudo_labels"] == b["pseudo_labels"]
    timeless = [[{k: v for k, v in h.items() if k != "seconds"} for h in c["history"]] for c in (a, b)]
    assert timeless[0] == timeless[1]  # the same losses, accuracies and rates
    assert a["model_ema"]["steps"] == b["model_ema"]["steps"] > 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["model_ema"]["weights"][key], b["model_ema"]["weights"][key]), key
    # the average is not the trained weights (it would be with a decay that never applies)
    assert any(not torch.equal(a["model"][k], a["model_ema"]["weights"][k]) for k in a["model"])


def test_validation_and_prediction_use_the_ema_weights(ema_runs, tiny_competition, caplog):
    """The accuracy logged for an epoch is that of its EMA weights: --mode val of the checkpoint (which
    takes the EMA weights by default) gives it again; --inference-weights raw predicts otherwise."""
    from cellpaint.modes.validate import validate

    ckpt = ema_runs / "straight" / "net.1"
    state = torch.load(ckpt, weights_only=True)
    common = ["--mode", "val", "--data", tiny_competition[0], "--load", ckpt, "--cv-number", 0, *SMALL]
    metrics = validate(main.parse_settings(list(map(str, common))), RunContext())
    assert metrics["acc"] == state["history"][-1]["acc"]
    for weights in ("auto", "ema", "raw"):
        assert run("--mode", "predict", "--data", tiny_competition[0], "--load", ckpt, "--cv-number", 0,
                   "--inference-weights", weights, "--pred-suffix", f"_{weights}", *SMALL) == 0
    out = {w: load_predictions(f"{ckpt}.output_{w}") for w in ("auto", "ema", "raw")}
    code = next(iter(out["auto"]["test"]))
    assert np.array_equal(out["auto"]["test"][code][0], out["ema"]["test"][code][0])
    assert not np.array_equal(out["auto"]["test"][code][0], out["raw"]["test"][code][0])


def test_ema_weights_asked_of_a_checkpoint_without_them(trained, tiny_competition, capsys):
    rc = run("--mode", "predict", "--data", tiny_competition[0], "--load", f"{trained}.1", "--inference-weights",
             "ema", "--pred-suffix", "_none", *SMALL)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "--inference-weights ema" in err[-1] and f"{trained}.1" in err[-1], err
    assert not (trained.parent / "net.1.output_none").exists()


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan", "inf"])
def test_a_decay_outside_0_1_is_refused(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_settings(["--save", str(tmp_path / "x"), "--model-ema", value])
    assert e.value.code == 2
    assert "must be a finite number in (0, 1)" in one_line_usage_error(capsys, "--model-ema")


def test_ema_weights_for_inference_need_ema_in_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main.parse_settings(["--save", str(tmp_path / "x"), "--inference-weights", "ema"])
    one_line_usage_error(capsys, "--inference-weights ema needs --model-ema")


# ------------------------------------------------------------------------------ same-plate batches


def test_group_batches_hold_one_group_in_equal_shares():
    groups = np.repeat([0, 1, 2, 3, 4], [29, 7, 3, 100, 16])
    for processes in (1, 2, 3):
        for batch in (2, 5, 8):
            batches = group_batches(groups, batch, processes, seed=11)
            again = group_batches(groups, batch, processes, seed=11)  # the seed alone decides: resume draws alike
            assert len(again) == len(batches) and all(np.array_equal(a, b) for a, b in zip(batches, again))
            for b in batches:  # one group, equal shares of at least 2 samples, at most -b each
                assert len(set(groups[b])) == 1 and len(b) % processes == 0
                assert 2 * processes <= len(b) <= batch * processes
            used = np.concatenate(batches)
            assert len(set(used)) == len(used)  # no site twice
            for g, size in enumerate(np.bincount(groups)):
                kept = int(np.isin(used, np.flatnonzero(groups == g)).sum())
                whole = size - size % processes  # at most processes - 1 left out ...
                if whole < 2 * processes:
                    assert kept == 0
                else:  # ... and with -b 2 an odd share count one more share
                    assert kept == whole - (processes if batch == 2 and whole // processes % 2 else 0)
                n_batches = sum(groups[b[0]] == g for b in batches)
                assert n_batches == -(-kept // (batch * processes))  # the fewest batches
    a = [b.tolist() for b in group_batches(groups, 8, 1, seed=1)]
    b = [b.tolist() for b in group_batches(groups, 8, 1, seed=2)]
    assert a != b  # another epoch (seed), another order


def test_the_processes_shares_of_a_step_come_from_one_plate():
    groups = np.repeat(np.arange(6), [40, 33, 9, 4, 61, 20])
    shares = [list(distributed.GroupBatchSampler(groups, distributed.World(r, 2, distributed=True), 5, 8))
              for r in range(2)]
    together = group_batches(groups, 8, 2, 5)
    assert len(shares[0]) == len(shares[1]) == len(together)
    for step, batch in enumerate(together):
        a, b = shares[0][step], shares[1][step]
        assert len(a) == len(b) and sorted(a + b) == sorted(batch.tolist())
        assert len(set(groups[a + b])) == 1


def training_plates(root, cv_number: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The plate and the experiment of each training site of an epoch without pseudo-labels (in the
    training dataset's row order)."""
    data = load_data(DataSettings(root=root, cv_number=cv_number))
    return domain_keys(data.subsets["train"], "plate"), domain_keys(data.subsets["train"], "experiment")


@pytest.mark.parametrize("by", ["plate", "experiment"])
def test_every_training_batch_comes_from_one_plate(by, tiny_competition, tmp_path):
    """One process: main.py under the probe, every batch of both epochs from one plate (experiment),
    every plate in the epoch."""
    record = probe(tmp_path / "probe", "--data", tiny_competition[0], "--save", tmp_path / "net", "-e", 2,
                   "--batch-sampling", by, *NO_ONEHOT, "--cv-number", 0, *SMALL, "-b", 8, processes=1)[0]
    plate, experiment = training_plates(tiny_competition[0])
    keys = plate if by == "plate" else experiment
    assert len(record["batches"]) > 10
    for batch in record["batches"]:
        assert len(set(keys[batch])) == 1 and len(batch) <= 8
    seen = {keys[i] for batch in record["batches"] for i in batch}
    assert seen == set(keys)


def test_every_global_batch_comes_from_one_plate_under_torchrun(tiny_competition, tmp_path):
    """Two processes (gloo): each step's two shares from the same plate, the same number of steps,
    and the EMA network both processes validate with is the one rank 0 saves."""
    records = probe(tmp_path / "probe", "--data", tiny_competition[0], "--save", tmp_path / "net", "-e", 1,
                    "--batch-sampling", "plate", *NO_ONEHOT, "--model-ema", 0.9, "--cv-number", 0, *SMALL, "-b", 4,
                    "--threads", 1, processes=PROCESSES)
    plate, _ = training_plates(tiny_competition[0])
    assert len(records[0]["batches"]) == len(records[1]["batches"]) > 5
    for a, b in zip(records[0]["batches"], records[1]["batches"]):
        assert len(a) == len(b) and not set(a) & set(b)
        assert len(set(plate[a + b])) == 1
    saved = torch.load(tmp_path / "net.0", weights_only=True)["model_ema"]["weights"]
    for rank in range(PROCESSES):
        state = records[rank]["inference_states"][0]
        assert all(torch.equal(state[k], saved[k]) for k in saved), rank


def test_same_plate_batches_with_the_cell_type_one_hot_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_settings(["--save", str(tmp_path / "x"), "--batch-sampling", "plate"])
    assert e.value.code == 2
    assert "--concat-cell-type false" in one_line_usage_error(capsys, "--batch-sampling plate")
    with pytest.raises(SystemExit):
        main.parse_settings(["--save", str(tmp_path / "x"), "--batch-sampling", "wells"])
    one_line_usage_error(capsys, "--batch-sampling")


# ------------------------------------------------------------------------------------------ AdaBN


def test_recomputed_statistics_are_those_of_the_batches_and_nothing_else():
    """The first backbone BatchNorm's statistics become the mean and (unbiased) variance of its
    input over the sites; the weights, the neck's BatchNorm statistics and the model given stay."""
    from model import CellClassifier

    torch.manual_seed(0)
    model = CellClassifier("smallcnn", 10, 2, embedding_size=16, pretrained="none", in_channels=6).train()
    model(torch.randn(16, 6, 12, 12), torch.eye(2)[torch.arange(16) % 2])  # statistics away from the defaults
    before = copy.deepcopy(model.state_dict())
    net = copy.deepcopy(model)
    x, cell = torch.randn(20, 6, 12, 12) * 3 + 1, torch.eye(2)[torch.zeros(20, dtype=torch.long)]
    adabn.recompute_statistics(net, [(x, cell)], torch.device("cpu"))
    first_conv, first_bn = net.backbone[0], net.backbone[1]
    with torch.no_grad():
        h = first_conv(x)
    assert torch.allclose(first_bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(first_bn.running_var, h.transpose(0, 1).reshape(h.shape[1], -1).var(dim=1), rtol=1e-4)
    after = net.state_dict()
    backbone_stats = {f"backbone.{n}.{b}" for n, m in net.backbone.named_modules()
                      if isinstance(m, nn.BatchNorm2d) for b in ("running_mean", "running_var", "num_batches_tracked")}
    for key, value in before.items():
        if key in backbone_stats:
            assert not torch.equal(after[key], value) or key.endswith("num_batches_tracked"), key
        else:
            assert torch.equal(after[key], value), key  # weights and the neck's statistics
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not net.training and not any(m.training for m in net.modules())


def test_adabn_infers_each_plate_with_its_own_statistics(trained, tiny_competition):
    """`infer` with --adabn plate: each validation plate's logits are those of the network whose
    backbone statistics were recomputed on all sites of that plate (and only those); the network
    passed in is unchanged, and without AdaBN the logits differ."""
    argv = ["--mode", "val", "--data", tiny_competition[0], "--load", f"{trained}.1", "--cv-number", 0, *SMALL]
    s, data, model, _ = model_for_inference(main.parse_settings(list(map(str, argv + ["--adabn", "plate"]))),
                                            RunContext())
    before = copy.deepcopy(model.state_dict())
    rows = data.subsets["val"]
    got = infer(s, RunContext(), model, make_dataset(s, data, rows), data=data)["logits"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    plain = infer(s.replace(inference={"adabn": "off"}), RunContext(), model, make_dataset(s, data, rows))["logits"]
    assert not np.allclose(got, plain, atol=1e-3)
    keys, table_keys = domain_keys(rows, "plate"), domain_keys(data.table, "plate")
    assert len(set(keys)) >= 4
    for key in set(keys):
        net = copy.deepcopy(model)
        sites = make_dataset(s, data, data.table[table_keys == key])
        adabn.recompute_statistics(net, make_loader(s, distributed.World(), sites), torch.device("cpu"))
        mine = np.flatnonzero(keys == key)
        with torch.inference_mode():
            expected = np.concatenate([net(dataset.prepare_batch(x, "cpu"), cell)["logits"].numpy() for x, cell, _, _
                                       in make_loader(s, distributed.World(), make_dataset(s, data, rows.iloc[mine]))])
        assert np.allclose(got[mine], expected, atol=1e-5), key


def test_adabn_prediction_under_torchrun_equals_one_process(trained, tiny_competition, tmp_path):
    """Two processes predict with --adabn experiment: each computes a domain's statistics on all of
    its sites and rank 0's are shared, so the file is the one-process file."""
    shutil.copy(f"{trained}.1", tmp_path / "net.1")
    common = ["--mode", "predict", "--data", tiny_competition[0], "--load", tmp_path / "net.1", "--cv-number", 0,
              "--adabn", "experiment", "--tta", 2, *SMALL, "--threads", 1]
    assert run(*common, "--pred-suffix", "_one") == 0
    torchrun(*common, "--pred-suffix", "_two")
    one, two = (load_predictions(tmp_path / f"net.1.output_{x}") for x in ("one", "two"))
    for part in ("val", "test"):
        assert one[part].keys() == two[part].keys()
        for code in one[part]:
            assert np.allclose(np.stack(one[part][code]), np.stack(two[part][code]), atol=1e-5), code


# -------------------------------------------------------------------------------------- balancing


def random_plates(rng, sizes, classes: int, scale: float = 3.0):
    logits = np.concatenate([rng.normal(size=(n, classes)) * scale for n in sizes])
    return plates.log_softmax(logits), np.repeat(np.arange(len(sizes)), sizes)


def test_sinkhorn_leaves_rows_and_columns_at_their_targets():
    """Rows sum to 1 and every class of a plate of n wells and c classes to n/c, within 1e-6, with the
    default rounds (complete plates, plates with missing wells, logits of several spreads)."""
    rng = np.random.default_rng(0)
    for classes, sizes, scale in ((10, (10, 7, 10), 3.0), (40, (40, 33), 5.0), (277, (277, 250), 5.0)):
        log_p, plate = random_plates(rng, sizes, classes, scale)
        balanced, error = plates.balance_plates(log_p, plate, "sinkhorn", make_submission.SINKHORN_ITERS)
        p = np.exp(balanced)
        assert np.abs(p.sum(axis=1) - 1).max() <= 1e-6
        for k, n in enumerate(sizes):
            assert np.abs(p[plate == k].sum(axis=0) - n / classes).max() <= 1e-6, (classes, n)
        assert error <= 1e-6
        # a few rounds are not enough: the check would see it
        _, early = plates.balance_plates(log_p, plate, "sinkhorn", 2)
        assert early > 1e-6


def test_column_balancing_gives_every_class_its_share():
    rng = np.random.default_rng(1)
    log_p, plate = random_plates(rng, (12, 9), 12)
    log_p[0, 3] = -np.inf  # not a candidate for one well: stays so
    balanced, _ = plates.balance_plates(log_p, plate, "columns")
    p = np.exp(balanced)
    for k, n in enumerate((12, 9)):
        assert np.allclose(p[plate == k].sum(axis=0), n / 12, atol=1e-12)
    assert balanced[0, 3] == -np.inf


def test_balancing_log_probabilities_leaves_a_complete_plates_assignment_alone():
    """What the docstring claims: on a plate with a well for every class, row and column constants
    shift every assignment's total equally, so the log-probability assignment is unchanged."""
    rng = np.random.default_rng(2)
    log_p, plate = random_plates(rng, (15, 15, 15), 15, 4.0)
    balanced, _ = plates.balance_plates(log_p, plate, "sinkhorn")
    assert np.array_equal(plates.assign_plates(log_p, plate), plates.assign_plates(balanced, plate))


def test_balance_is_its_own_stage_of_the_submission(trained, tiny_competition, tmp_path, capsys):
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", f"{trained}.1", "--cv-number", 0,
               "--pred-suffix", "_bal", *SMALL) == 0
    prediction = f"{trained}.1.output_bal"
    capsys.readouterr()
    assert make_submission.main(["--data", str(tiny_competition[0]), "-o", str(tmp_path / "plain.csv"),
                                 prediction]) == 0
    assert make_submission.main(["--data", str(tiny_competition[0]), "-o", str(tmp_path / "sub.csv"), "--balance",
                                 "sinkhorn,500", prediction]) == 0
    out = capsys.readouterr().out
    assert "balance: sinkhorn,500" in out
    report = json.loads((tmp_path / "sub.csv.json").read_text())
    names = [stage["stage"] for stage in report["stages"]]
    assert names[-3:] == ["groups (prob)", "balance (sinkhorn,500)", "assignment (logsoftmax)"]
    assert report["balance"]["largest_column_error"] <= 1e-6
    assert "balance" not in json.loads((tmp_path / "plain.csv.json").read_text())  # off: the report as before


@pytest.mark.parametrize("argv, flag", [(["--balance", "rows"], "--balance"), (["--balance", "sinkhorn,0"], "--balance"),
                                        (["--balance", "sinkhorn,-3"], "--balance"),
                                        (["--balance", "columns,5"], "--balance"),
                                        (["--balance", "sinkhorn", "--assign-scores", "logits"], "--balance"),
                                        (["--knn-center", "plate"], "--knn-center")])
def test_bad_submission_options_are_one_line_usage_errors(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_submission.main(["-o", str(tmp_path / "sub.csv"), *argv, str(tmp_path / "x.output")])
    assert e.value.code == 2
    one_line_usage_error(capsys, flag)
    assert not (tmp_path / "sub.csv").exists()


# ---------------------------------------------------------------------------------- plate-centred kNN


def test_centring_gives_each_plate_mean_zero():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(50, 8)) + rng.normal(size=(1, 8)) * 5).astype(np.float32)
    plate = rng.integers(0, 4, 50)
    centred = knn.center_by_group(x.copy(), plate)
    for p in range(4):
        assert np.abs(centred[plate == p].mean(axis=0)).max() < 1e-6
        assert np.allclose(centred[plate == p] - x[plate == p], -x[plate == p].mean(axis=0), atol=1e-5)


def test_knn_center_centres_every_plate_of_the_search(trained, tiny_competition, tmp_path, monkeypatch, capsys):
    """make_submission --knn --knn-center plate: the vectors searched are centred per (experiment,
    plate) of the reference, validation and test wells, then unit length again."""
    assert run("--mode", "predict", "--data", tiny_competition[0], "--load", f"{trained}.1", "--cv-number", 0,
               "--pred-suffix", "_knn", "--save-embeddings", *SMALL) == 0
    seen = []
    original = knn.center_by_group

    def recording(x, groups):
        out = original(x, groups)
        seen.append((out.copy(), np.asarray(groups)))
        return out

    monkeypatch.setattr(knn, "center_by_group", recording)
    assert make_submission.main(["--data", str(tiny_competition[0]), "-o", str(tmp_path / "sub.csv"), "--knn", "3",
                                 "--knn-center", "plate", f"{trained}.1.embeddings_knn"]) == 0
    assert "centred per plate" in capsys.readouterr().out
    (centred, groups), = seen
    report = json.loads((tmp_path / "sub.csv.json").read_text())
    n_wells = report["wells"]["val"] + report["wells"]["test"] + report["knn"]["reference_wells"]["val"]
    assert len(groups) == n_wells and len(set(groups)) == 10 * 4  # every plate of the 10 experiments
    for g in set(groups):
        assert np.abs(centred[groups == g].mean(axis=0)).max() < 1e-5
    assert report["knn"]["center"] == "plate"


# ----------------------------------------------------------------------------- progressive resizing


def test_size_schedule_reads_back_and_gives_each_epoch_its_size():
    schedule = SizeSchedule.parse("224:0,384:30,512:60")
    assert [schedule.size_at(e) for e in (0, 29, 30, 59, 60, 129)] == [224, 224, 384, 384, 512, 512]
    s = resolved_settings("--save", "x", "--backbone", "smallcnn", "--image-size-schedule", "224:0,384:30,512:60")
    assert settings_from_dict(settings_dict(s)).optim.image_size_schedule == schedule
    x = torch.rand(2, 6, 48, 40)
    assert resize_batch(x, 24).shape == (2, 6, 24, 20)
    assert resize_batch(x, 48) is x


def test_training_runs_at_the_scheduled_sizes_and_validates_at_the_datas(tiny_competition, tmp_path):
    from torch.nn.modules.module import register_module_forward_pre_hook
    from model import CellClassifier

    sizes = []

    def on_forward(module, args):
        if isinstance(module, CellClassifier):
            sizes.append((module.training, tuple(args[0].shape[-2:])))

    handle = register_module_forward_pre_hook(on_forward)
    try:
        assert run("--data", tiny_competition[0], "--save", tmp_path / "net", "-e", 3, "--cv-number", 0,
                   "--image-size-schedule", "12:0,18:1,24:2", *SMALL) == 0
    finally:
        handle.remove()
    train = [size for training, size in sizes if training]
    assert sorted(set(train)) == [(12, 12), (18, 18), (24, 24)]
    assert train == sorted(train)  # rising, epoch by epoch
    assert {size for training, size in sizes if not training} == {(24, 24)}


@pytest.mark.parametrize("schedule, epochs, says", [("24:0,12:2", 3, "sizes must rise"),
                                                    ("12:0,18:0", 3, "epochs must rise"),
                                                    ("12:1,24:2", 3, "start at epoch 0"),
                                                    ("12,24", 3, "is not SIZE:EPOCH"),
                                                    ("12:0,24:3", 3, "-e/--epochs 3")])
def test_bad_size_schedules_are_one_line_usage_errors(schedule, epochs, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_settings(["--save", str(tmp_path / "x"), "-e", str(epochs), "--image-size-schedule", schedule])
    assert e.value.code == 2
    assert says in one_line_usage_error(capsys, "--image-size-schedule")


def test_a_size_above_the_datas_is_refused(tiny_competition, tmp_path, capsys):
    rc = run("--data", tiny_competition[0], "--save", tmp_path / "net", "-e", 2, "--image-size-schedule",
             "24:0,48:1", *SMALL)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--image-size-schedule 24:0,48:1" in err[-1] and "24x24" in err[-1], err
    assert not (tmp_path / "net.0").exists()
