"""The 41st-place recipe's options (plain head, BCE, learning-rate groups, its augmentations,
random TTA, its split) and the recipes' @args files."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import default_collate

import dataset
import main
import model as M
from cellpaint.core.schedule import LRSchedule
from cellpaint.core.settings import AugmentSettings, settings_dict
from cellpaint.data import augment, metadata, pixel_stats
from cellpaint.engine import inference
from cellpaint.engine.checkpoints import CHECKPOINT_FORMAT
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import load_data
from cellpaint.engine.setup import make_optimizer
from cellpaint.networks import backbones as B
from cellpaint.core.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
CELL_TYPES = ("HEPG2", "HUVEC", "RPE", "U2OS")
FORTY_FIRST = AugmentSettings(flips=True, transposes=False, prob=0.5, rescale=0.1, rotate=90,
                              rotate_border="reflect-101", brightness=0.2, contrast=0.2, bc_space="raw",
                              gamma_range=(0.8, 1.2))


# ------------------------------------------------------------------------------------ the model


def test_plain_head_layers_and_embedding_is_the_first_linear_output():
    torch.manual_seed(0)
    net = M.CellClassifier("smallcnn", 11, 4, embedding_size=16, concat_cell_type=False, head="plain", in_channels=6)
    assert isinstance(net.neck, nn.Linear) and (net.neck.in_features, net.neck.out_features) == (96, 16)
    assert [type(m) for m in net.head] == [nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert net.head[0].num_features == 16 and (net.head[2].in_features, net.head[2].out_features) == (16, 11)
    assert net.arc_head is None
    net.eval()
    x = torch.randn(3, 6, 24, 24)
    out = net(x)
    assert set(out) == {"embedding", "logits"}
    pooled = F.adaptive_avg_pool2d(F.relu(net.backbone(x)), 1).flatten(1)
    assert torch.allclose(out["embedding"], net.neck(pooled), atol=1e-6)  # before the BN
    assert torch.allclose(out["logits"], net.head[2](F.relu(net.head[0](out["embedding"]))), atol=1e-6)


def test_plain_head_refuses_cell_type_and_hidden_layers_and_main_names_the_flags(capsys):
    with pytest.raises(ValueError, match="plain head"):
        M.CellClassifier("smallcnn", 5, 4, concat_cell_type=True, head="plain", in_channels=6)
    with pytest.raises(SystemExit):
        main.parse_settings(["--save", "x", "--head", "plain", "--concat-cell-type", "true", "--head-hidden", "8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--concat-cell-type true" in err and "--head-hidden" in err
    s = main.parse_settings(["--save", "x", "--head", "plain"])
    assert (s.model.concat_cell_type, s.optim.metric_loss_coeff) == (False, 0.0)
    s = main.parse_settings(["--save", "x"])  # the 1st place's defaults unchanged
    assert (s.model.head, s.model.concat_cell_type, s.optim.metric_loss_coeff, s.optim.loss) == ("neck", True, 0.2, "ce")


def test_rgb_tile_stem_repeats_the_rgb_kernels_unscaled():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    old = net[0].weight.detach().clone()
    B._swap_stem(net, 6, from_rgb=True, tile=True)
    assert torch.equal(net[0].weight, torch.cat([old, old], 1))


def test_bce_loss_is_torch_bce_with_logits_on_one_hot_and_restricts_classes():
    torch.manual_seed(1)
    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 4, 1, 2])
    target = M.smooth_labels(labels, 7)
    want = nn.BCEWithLogitsLoss()(logits, F.one_hot(labels, 7).float())
    assert torch.allclose(M.training_loss({"logits": logits}, target, "bce", 0.0), want)
    classes = torch.tensor([0, 1, 2, 3, 4])  # e.g. the treatment classes: 5 and 6 left out
    want = nn.BCEWithLogitsLoss()(logits[:, :5], F.one_hot(labels, 5).float())
    assert torch.allclose(M.training_loss({"logits": logits}, target, "bce", 0.0, classes), want)
    # ce without ArcFace needs no cosines and equals the combined loss at c = 0
    out = {"logits": logits, "cosine": torch.rand(5, 7)}
    assert torch.allclose(M.training_loss({"logits": logits}, target, "ce", 0.0), M.combined_loss(out, target, 0.0))


# ----------------------------------------------------------------------------- learning rates


def test_lr_groups_set_each_group_at_its_multiplier():
    s = main.parse_settings(["--save", "x", "--lr", "const,1e-3", "--wd", "0", "--pretrained", "none",
                             "--lr-groups", "conv0,norm0=1/3,denseblock,transition,norm5=1/2"])
    net = M.CellClassifier("densenet121", 11, 4, embedding_size=16, concat_cell_type=False, head="plain", in_channels=6)
    opt = make_optimizer(s.optim, net)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"conv0,norm0": pytest.approx(1e-3 / 3), "denseblock,transition,norm5": 5e-4,
                   "neck and heads": 1e-3}  # every backbone parameter named: no "backbone" rest group
    assert all(g["weight_decay"] == 0 for g in opt.param_groups)
    stem = {id(p) for p in (*net.backbone.conv0.parameters(), *net.backbone.norm0.parameters())}
    assert {id(p) for p in opt.param_groups[0]["params"]} == stem
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_lr_groups_prefix_matching_nothing_is_an_error_and_default_groups_unchanged():
    s = main.parse_settings(["--save", "x", "--lr-groups", "conv0=0.5,dense_block=0.5"])
    net = M.CellClassifier("densenet121", 11, 4, embedding_size=16, concat_cell_type=False, head="plain", in_channels=6)
    with pytest.raises(UsageError, match="--lr-groups: no backbone parameter name starts with 'dense_block'"):
        make_optimizer(s.optim, net)
    s = main.parse_settings(["--save", "x", "--backbone-lr-mult", "0.1", "--lr", "const,1e-3"])
    assert [g["lr"] for g in make_optimizer(s.optim, net).param_groups] == [pytest.approx(1e-4), 1e-3]
    for bad in ("conv0", "conv0=x", "conv0=-1", "=1"):
        with pytest.raises(SystemExit):
            main.parse_settings(["--save", "x", "--lr-groups", bad])


# ------------------------------------------------------------------------------- augmentations


def _photometric(settings, n=200):
    return torch.stack([augment.draw_photometric(settings, np.random.default_rng((0, 0, i))) for i in range(n)])


def test_aug_prob_zero_is_identity_and_one_always_applies():
    never = _photometric(AugmentSettings(**{**FORTY_FIRST.__dict__, "prob": 0.0}))
    assert torch.equal(never, torch.tensor([0.0, 1, 1, 0, 1]).expand_as(never))
    always = _photometric(AugmentSettings(**{**FORTY_FIRST.__dict__, "prob": 1.0}))
    assert (always[:, 0] != 0).all() and (always[:, 1] != 1).all() and (always[:, 4] != 1).all()
    half = _photometric(FORTY_FIRST, 400)
    assert 0.4 < (half[:, 0] != 0).float().mean() < 0.6
    assert torch.equal(half[:, 2] != 1, half[:, 3] != 0)  # brightness and contrast share one coin
    x = torch.rand(2, 6, 16, 16) * 255
    photo = never[:2]
    assert torch.equal(augment.raw_photometric(x, photo, FORTY_FIRST), x)


def test_gamma_range_draws_the_inverse_of_a_uniform_gamma():
    gammas = _photometric(AugmentSettings(gamma_range=(0.8, 1.2)), 500)[:, 1]
    assert gammas.min() >= 1 / 1.2 - 1e-6 and gammas.max() <= 1 / 0.8 + 1e-6
    assert abs(float((1 / gammas).mean()) - 1.0) < 0.02  # 1/exponent is uniform on [0.8, 1.2]
    with pytest.raises(ValueError, match="--gamma-range and --gamma-aug"):
        AugmentSettings(gamma=0.2, gamma_range=(0.8, 1.2))


def test_reflect_borders_fold_coordinates_like_cv2():
    c = torch.tensor([-2.0, -1.0, -0.25, 0.0, 3.0, 4.0, 5.0])  # an image 4 pixels wide
    assert augment.reflect_coordinates(c, 4, "reflect-101").tolist() == [2.0, 1.0, 0.25, 0.0, 3.0, 2.0, 1.0]
    assert augment.reflect_coordinates(c, 4, "reflect").tolist() == [1.0, 0.0, 0.0, 0.0, 3.0, 3.0, 2.0]


def test_rotation_with_reflected_border_fills_the_corners_and_keeps_exact_turns():
    x = torch.rand(2, 3, 17, 17) + 1  # no zero pixels
    for border in ("reflect", "reflect-101"):
        turned = augment.rotate(x, torch.tensor([45.0, 180.0]), border)
        assert (turned[0] > 0.5).all()  # corners mirrored in, not zero
        assert torch.allclose(turned[1], x[1].flip(-1).flip(-2), atol=1e-4)
    assert (augment.rotate(x, torch.tensor([45.0, 0.0]))[0, :, 0, 0] == 0).all()  # zeros: the default


def test_hv_flips_never_transpose(tiny_competition):
    rows = metadata.load_table(tiny_competition[0]).iloc[:1]
    ds = dataset.SiteDataset(rows, CELL_TYPES, augment=AugmentSettings(transposes=False), output="uint8")
    ks = {ds._geometry(np.random.default_rng(i), (6, 24, 24))[0] for i in range(100)}
    assert ks == {0, 1, 2, 3}
    ds.augment = AugmentSettings()
    assert {ds._geometry(np.random.default_rng(i), (6, 24, 24))[0] for i in range(100)} == set(range(8))


def test_raw_brightness_contrast_formula():
    x = torch.rand(2, 6, 8, 8) * 200
    a, b = torch.tensor([1.2, 0.8]), torch.tensor([0.1, -0.2])
    got = augment.raw_brightness_contrast(x, a, b)
    for i in range(2):
        want = (x[i] * a[i] + b[i] * x[i].mean()).clamp(0, 255)
        assert torch.allclose(got[i], want, atol=1e-4)


def test_rescale_is_a_resolution_jitter_back_to_full_size():
    x = torch.rand(2, 6, 20, 20) * 255
    got = augment.rescale(x, torch.tensor([0.9, 1.0]))
    assert got.shape == x.shape and torch.equal(got[1], x[1]) and not torch.allclose(got[0], x[0])
    assert got.min() >= 0 and got.max() <= 255
    flat = torch.full((1, 6, 20, 20), 77.0)
    assert torch.allclose(augment.rescale(flat, torch.tensor([1.1])), flat, atol=1e-3)  # no zoom, no border


def test_uint8_path_equals_float_path_with_the_41st_augmentations(tiny_competition):
    table = metadata.load_table(tiny_competition[0])
    rows = table.iloc[::9].reset_index(drop=True)
    stats = pixel_stats.normalization_stats(rows, "global", pixel_stats.load_pixel_stats(tiny_competition[0], table, None))
    made = [dataset.SiteDataset(rows, CELL_TYPES, "global", stats, FORTY_FIRST, seed=7, output=out)
            for out in ("float", "uint8")]
    for ds in made:
        ds.set_epoch(2)
    want = torch.stack([made[0][i][0] for i in range(len(rows))])
    x = default_collate([made[1][i][0] for i in range(len(rows))])
    got = dataset.prepare_batch(x, "cpu", settings=FORTY_FIRST)
    assert torch.allclose(got, want, rtol=0, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, dataset.normalize(x["image"].float(), x["stats"]))


# ------------------------------------------------------------------------------ TTA and the split


def test_random_tta_averages_n_passes_of_the_training_augmentation(monkeypatch):
    seen = []

    def one_pass(s, ctx, model, ds, embeddings=False, settings=None):
        seen.append((ds.epoch, ds.augment, settings))
        return {"logits": np.full((2, 3), float(ds.epoch)), "embedding": np.full((2, 4), 2.0 * ds.epoch)}

    monkeypatch.setattr(inference, "infer_pass", one_pass)
    settings = main.parse_settings(["--save", "x", "--tta-random", "4", "--rotate-aug", "30"])
    ds = argparse.Namespace(augment=None, epoch=0)
    ds.set_epoch = lambda e: setattr(ds, "epoch", e)
    result = inference.infer(settings, RunContext(), None, ds, embeddings=True)
    assert [e for e, _, _ in seen] == [0, 1, 2, 3]
    assert all(a == settings.augment and s is a for _, a, s in seen)
    assert np.allclose(result["logits"], 1.5) and np.allclose(result["embedding"], 3.0)
    assert ds.augment is None and ds.epoch == 0  # the dataset is left as it was
    with pytest.raises(SystemExit):
        main.parse_settings(["--save", "x", "--tta-random", "4", "--tta", "8"])


def test_val_last_experiment_and_no_controls(tiny_competition):
    s = main.parse_settings(["--data", str(tiny_competition[0]), "--save", "x", "--val-last-experiment",
                             "--train-controls", "false", "--use-layout-leak", "false"])
    data = load_data(s.data)
    val = sorted(data.subsets["val"]["experiment"].unique())
    assert val == ["HEPG2-02", "HUVEC-02", "RPE-01", "U2OS-01"]
    assert (data.subsets["train"]["well_type"] == metadata.TREATMENT).all()
    assert not set(data.subsets["train"]["experiment"]) & set(val)
    with pytest.raises(SystemExit):
        main.parse_settings(["--save", "x", "--loss-classes", "treatment"])  # controls still trained


# ---------------------------------------------------------------------------------- @args files


def _recipe(monkeypatch, *argv):
    monkeypatch.chdir(ROOT)  # nested @files are relative to the working directory
    return main.parse_settings(list(argv))


def test_first_place_args_file(monkeypatch):
    s = _recipe(monkeypatch, "@recipes/1st-place.args", "--seed", "0", "--save", "results/dn161_0")
    assert (s.optim.epochs, s.pseudo.first_epoch, s.optim.lr, s.pseudo.size_func.text, s.data.cv_number) == (
        130, 90, LRSchedule.parse("cosine,1.5e-4,90,6e-5,150,0"), "0.6*x+0.4", -1)
    assert (s.model.backbone, s.model.head, s.optim.loss, s.data.batch_size, s.optim.gradient_accumulation) == (
        "auto", "neck", "ce", 24, 2)  # auto: densenet161 or its memory-efficient twin, same weights


def test_41st_place_args_files(monkeypatch, tmp_path):
    train = _recipe(monkeypatch, "@recipes/41st-place-train.args", "--save", "results/dn201")
    assert (train.model.backbone, train.model.stem_init, train.model.head, train.model.embedding_size,
            train.model.bn_mom) == ("densenet201", "rgb-tile", "plain", 512, 0.1)
    assert (train.optim.loss, train.optim.loss_classes, train.data.train_controls, train.optim.metric_loss_coeff) == (
        "bce", "treatment", False, 0.0)
    assert (train.optim.lr, train.optim.wd, train.optim.epochs, train.data.batch_size, train.optim.cutmix) == (
        LRSchedule.parse("const,1e-3"), 0, 75, 64, 0)
    assert train.optim.lr_groups.groups == ((("conv0", "norm0"), 1 / 3),
                                            (("denseblock", "transition", "norm5"), 0.5))
    aug = train.augment
    assert aug == FORTY_FIRST and (aug.min_scale, aug.scale_std, aug.bias_std) == (1.0, 0.0, 0.0)
    assert train.data.val_last_experiment and train.data.normalization == "global"
    # the general model's checkpoint, as the train file makes it (its architecture is what --load takes)
    general = tmp_path / "dn201.74"
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "settings": settings_dict(train)}, general)
    tune = _recipe(monkeypatch, "@recipes/41st-place-finetune.args", "--load", str(general),
                   "--finetune-cell-type", "HUVEC", "--save", "results/dn201_huvec")
    assert (tune.optim.epochs, tune.optim.start_epoch, tune.optim.lr_groups, tune.data.finetune_cell_type) == (
        20, 0, train.optim.lr_groups, "HUVEC")
    pred = _recipe(monkeypatch, "@recipes/41st-place-predict.args", "--load", str(general))
    assert (pred.run.mode, pred.inference.tta_random, pred.inference.tta, pred.inference.save_embeddings) == (
        "predict", 10, 1, True)
    assert pred.augment == FORTY_FIRST and pred.data.val_last_experiment


def test_wilds_args_files(monkeypatch, tiny_competition):
    """The standard file is a valid standard-track entry (nothing of val or test in training, no
    test-time views, no plate stages in what it reports); the transductive one is the 1st place whole."""
    from cellpaint.modes.wilds_eval import training_track

    table = metadata.load_table(tiny_competition[0])  # one with a layout coincidence: the leak flag matters
    standard = _recipe(monkeypatch, "@recipes/wilds-standard.args", "--save", "results/wilds_std")
    assert (standard.data.split, standard.data.all_controls_train, standard.data.use_layout_leak) == ("official", False, False)
    assert standard.pseudo.first_epoch is None and standard.inference.tta == 1 and standard.inference.tta_random == 0
    assert (standard.optim.epochs, standard.optim.lr) == (90, LRSchedule.parse("cosine,1.5e-4"))
    assert training_track({"settings": settings_dict(standard)}, table, "official") == ("standard", [])
    whole = _recipe(monkeypatch, "@recipes/wilds-transductive.args", "--save", "results/wilds_tr")
    first = _recipe(monkeypatch, "@recipes/1st-place.args", "--save", "results/dn161_0")
    assert (whole.data.split, whole.data.all_controls_train, whole.data.use_layout_leak) == ("official", True, True)
    assert (whole.optim.epochs, whole.pseudo.first_epoch, whole.optim.lr, whole.pseudo.size_func.text) == (
        first.optim.epochs, first.pseudo.first_epoch, first.optim.lr, first.pseudo.size_func.text)
    track, reasons = training_track({"settings": settings_dict(whole)}, table, "official")
    assert track == "non-standard" and len(reasons) == 3


def test_every_recipe_file_is_checked():
    checked = {"1st-place.args", "41st-place-common.args", "41st-place-train.args", "41st-place-finetune.args",
               "41st-place-predict.args", "wilds-standard.args", "wilds-transductive.args"}
    assert {p.name for p in (ROOT / "recipes").glob("*")} == checked
