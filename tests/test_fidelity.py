"""The 1st-place recipe behaviour for behaviour: each default against a number worked out from the
original code's formulas (maciej-sypetkowski/kaggle-rcic-1st), never by importing it.

Our alternatives stay selectable (`--pl-duplicates refill`, `--zoom-interpolation bilinear`,
`--accumulation-mode mean`, `--stem-init rgb-copy`, `--mix-partners separate`,
`--data-normalization global-pooled`); each is checked to differ where it should.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

import dataset
from cellpaint.core.settings import ZOOM_MODES, AugmentSettings
from cellpaint.data import augment, metadata, pixel_stats
from cellpaint.data.folds import named_folds, split_subsets
from cellpaint.data.structure import Structure
from cellpaint.engine import inference, mixing
from cellpaint.engine.context import RunContext
from cellpaint.engine.data import load_data
from cellpaint.engine.epoch import train_one_epoch
from cellpaint.engine.setup import make_optimizer
from cellpaint.modes import pseudo_labels
from cellpaint.core.errors import UsageError
from model import CellClassifier, combined_loss
from tests.conftest import SMALL, resolved_settings, run


# ------------------------------------------------------------------- pseudo-label duplicates


def _one_plate(logits: list[list[float]]) -> tuple[pd.DataFrame, np.ndarray, Structure]:
    structure = Structure(4, np.arange(4), np.zeros(0, np.int64), (np.arange(4),), ("A",))
    wells = pd.DataFrame({"id_code": [f"E_1_W{i}" for i in range(len(logits))], "experiment": "E", "plate": 1})
    return wells, np.array(logits, dtype=np.float32), structure


def test_duplicate_class_on_a_plate_is_dropped_not_refilled():
    """Wells ranked by margin: W0 (class 0, margin 9), W1 (class 0, margin 8), W2 (class 1, 7).
    Asked for 2, the original takes W0 and W1, drops W1 (class 0 is taken) and adds only 1."""
    wells, logits, structure = _one_plate([[10, 1, 0, 0], [9, 1, 0, 0], [0, 8, 1, 0]])
    none = pd.DataFrame({"experiment": [], "plate": []})
    drop = pseudo_labels.select(wells, logits, structure, none, np.zeros(0, np.int64), count=2)
    assert drop == {"E_1_W0": 0}
    refill = pseudo_labels.select(wells, logits, structure, none, np.zeros(0, np.int64), count=2, duplicates="refill")
    assert refill == {"E_1_W0": 0, "E_1_W2": 1}
    assert pseudo_labels.select(wells, logits, structure, none, np.zeros(0, np.int64), count=3) == {"E_1_W0": 0, "E_1_W2": 1}
    with pytest.raises(ValueError, match="duplicate rule 'keep'"):
        pseudo_labels.select(wells, logits, structure, none, np.zeros(0, np.int64), count=2, duplicates="keep")


def test_training_run_labels_by_the_original_schedule(tiny_competition, tmp_path):
    """Every epoch's labelled count <= round(f((e - pl + 1) / (E - pl + 1)) * N), and with
    --pl-size-func x the first pseudo-labelling epoch already adds wells."""
    save = tmp_path / "pl"
    assert run("--data", tiny_competition[0], "--save", save, "-e", 3, "--pl-epoch", 1, "--pl-size-func", "x",
               "--cv-number", 0, *SMALL) == 0
    log = (tmp_path / "pl.log").read_text()
    found = re.findall(r"pseudo-labels at epoch (\d+): (\d+) added of (\d+) asked .*?, (\d+) of (\d+) wells", log)
    assert [int(f[0]) for f in found] == [1, 2]
    for epoch, added, asked, labelled, total in (map(int, f) for f in found):
        assert labelled <= round((epoch - 1 + 1) / (3 - 1 + 1) * total)
        assert added <= asked
    assert int(found[0][1]) > 0
    metrics = pd.read_csv(tmp_path / "pl.metrics.csv")
    assert metrics["pseudo_labels"].tolist()[1:] == [int(found[0][3]), int(found[1][3])]


# --------------------------------------------------------------------------------- zoom crop


def test_zoom_is_nearest_neighbour_indexing():
    """cv2.resize(INTER_NEAREST) of the crop: output pixel i takes crop pixel floor(i * crop / size)."""
    img = torch.randint(0, 256, (6, 48, 48), dtype=torch.uint8)
    for box in [(5, 7, 30, 30), (0, 0, 24, 24), (17, 1, 31, 31), (0, 12, 48, 36)]:
        top, left, ch, cw = box
        out = augment.zoom(img.float(), box)
        expected = torch.empty(6, 48, 48)
        for i in range(48):
            for j in range(48):
                expected[:, i, j] = img[:, top + (i * ch) // 48, left + (j * cw) // 48].float()
        assert torch.equal(out, expected), box
        assert torch.equal(augment.zoom(img, box), expected.to(torch.uint8))  # the same on uint8
    smooth = augment.zoom(img.float(), (5, 7, 30, 30), "bilinear")
    assert not torch.equal(smooth, augment.zoom(img.float(), (5, 7, 30, 30)))
    assert not set(smooth.unique().tolist()) <= set(img.float().unique().tolist())  # blended values


def test_zoom_box_edge_is_a_uniform_whole_number():
    """random.randint(round(512 * s), 512) in the original: every edge in [24, 48] for 48 px, s=0.5."""
    rng = np.random.default_rng(0)
    boxes = [augment.draw_zoom_box(rng, 48, 48, 0.5) for _ in range(4000)]
    edges = np.array([b[2] for b in boxes])
    assert all(b[2] == b[3] for b in boxes)
    assert set(edges.tolist()) == set(range(24, 49))
    # the mean of 4000 uniform edges has sd 7.2 / sqrt(4000) = 0.114: 0.3 failed for 7 of seeds 0-299,
    # 0.45 (about 4 sd) for none; a wrong range is caught by the set of edges above
    assert abs(edges.mean() - 36) < 0.45
    assert all(0 <= b[0] <= 48 - b[2] and 0 <= b[1] <= 48 - b[3] for b in boxes)


def test_training_batches_use_the_chosen_zoom(tiny_competition):
    data_dir = tiny_competition[0]
    table = metadata.load_table(data_dir)
    rows = table.head(8)
    for mode in ZOOM_MODES:
        aug = AugmentSettings(flips=False, min_scale=0.5, zoom_mode=mode)
        ds = dataset.SiteDataset(rows, ("HEPG2", "HUVEC", "RPE", "U2OS"), "sample", None, aug,
                                 rows["sirna"].to_numpy(), seed=1, output="uint8")
        raw = torch.utils.data.default_collate([ds[i][0] for i in range(len(ds))])
        x = augment.apply_geometry(raw["image"].float(), raw["geometry"], mode)
        allowed = [set(raw["image"][i].unique().tolist()) for i in range(len(ds))]
        copied = all(set(x[i].unique().tolist()) <= allowed[i] for i in range(len(ds)))
        assert copied == (mode == "nearest")


# -------------------------------------------------------------------- gradient accumulation


def _args(*extra: str):
    return resolved_settings("--save", "unused", "-l", "const,1e-3", "--wd", "1e-2", "--cutmix", "0",
                             "--metric-loss-coeff", "0.2", *SMALL, *extra)


def _net() -> CellClassifier:
    torch.manual_seed(0)
    return CellClassifier("smallcnn", 5, 2, embedding_size=16, in_channels=6)


def _batches(n: int) -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, 16, 16, generator=g), torch.eye(2)[torch.tensor([0, 1, 0, 1])],
             torch.arange(4), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def _epoch(s, loader):
    net = _net()
    opt = make_optimizer(s.optim, net)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_one_epoch(s, RunContext(), net, loader, opt, scaler, 0, 5, {"bad_steps": 0})
    return net


def _by_hand(loader, divide: int, step_after: set[int]):
    """Adam (coupled weight decay 1e-2, lr 1e-3): backward on every batch's loss / `divide`, a step
    after the listed batches (every batch runs forward, as in training: BatchNorm statistics)."""
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-2)
    net.train()
    opt.zero_grad()
    for i, (x, cell, _, y) in enumerate(loader):
        out = net(x, cell)
        (combined_loss(out, torch.nn.functional.one_hot(y, 5).float(), 0.2) / divide).backward()
        if i in step_after:
            opt.step()
            opt.zero_grad()
    return net


def _same(a, b) -> bool:
    return all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_accumulation_sums_gradients_and_drops_a_trailing_group():
    """The original called backward() on every batch's full loss and stepped every 2nd batch; the
    partial group left at the end of an epoch was zeroed before it stepped."""
    loader = _batches(5)
    summed = _epoch(_args("--gradient-accumulation", "2"), loader)
    assert _same(summed, _by_hand(loader, 1, {1, 3}))
    assert not _same(summed, _by_hand(loader, 2, {1, 3}))  # the mean is another update
    # ours: the loss divided by the group, the trailing group stepped too
    mean = _epoch(_args("--gradient-accumulation", "2", "--accumulation-mode", "mean"), loader)
    assert _same(mean, _by_hand(loader, 2, {1, 3, 4}))


# ---------------------------------------------------------------------------- mixup + cutmix


def test_mixup_and_cutmix_share_one_partner():
    """The original's draws: perm first, then mixup's per-sample λ, then cutmix's λ, column, row;
    targets t' = λ t + (1-λ) t[perm], then t'' = k t' + (1-k) t'[perm] with the same perm."""
    x = torch.randn(8, 6, 16, 16)
    cell, target = torch.eye(8), torch.eye(8)
    mixed_x, mixed_cell, mixed = mixing.mix_batch(x, cell, target, 0.4, 1.0, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    perm = rng.permutation(8)
    lam = torch.tensor(rng.beta(0.4, 0.4, 8), dtype=torch.float32)[:, None]
    cut = rng.beta(1.0, 1.0)
    cy, cx = rng.uniform(0, 16), rng.uniform(0, 16)
    side = np.sqrt(1 - cut) * 16
    r1, r2 = round(max(0, cy - side / 2)), round(min(16, cy + side / 2))
    c1, c2 = round(max(0, cx - side / 2)), round(min(16, cx + side / 2))
    assert r1 < r2 and c1 < c2
    kept = 1 - (r2 - r1) * (c2 - c1) / 256
    once = lam * target + (1 - lam) * target[perm]
    assert torch.allclose(mixed, kept * once + (1 - kept) * once[perm], atol=1e-6)
    assert torch.equal(mixed, mixed_cell)
    blended = lam[:, :, None, None] * x + (1 - lam[:, :, None, None]) * x[perm]
    assert torch.allclose(mixed_x[..., r1:r2, c1:c2], blended[perm][..., r1:r2, c1:c2], atol=1e-6)
    # each sample's classes: itself, its partner and its partner's partner, never more
    for i in range(8):
        assert set(np.flatnonzero(mixed[i].numpy() > 1e-7)) <= {i, perm[i], perm[perm[i]]}
    separate = mixing.mix_batch(x, cell, target, 0.4, 1.0, np.random.default_rng(3), "separate")[2]
    assert not torch.allclose(separate, mixed)
    with pytest.raises(ValueError, match="partner rule"):
        mixing.mix_batch(x, cell, target, 0.4, 1.0, np.random.default_rng(3), "one")


# ------------------------------------------------------------------------ global statistics


def test_global_statistics_are_means_over_experiments():
    """Experiment A (3 images): mean 10, std 2; B (1 image): mean 30, std 6. The original's global:
    mean of the experiment means 20 and of the stds 4; pooled over all pixels: mean 15 and
    std sqrt(mean(std² + mean²) - 15²) = sqrt((3·104 + 936)/4 - 225) = sqrt(87) per channel."""
    ids = ["A_1_a", "A_1_b", "A_1_c", "B_1_a"]
    table = pd.DataFrame({"id_code": ids, "site": 1, "experiment": ["A", "A", "A", "B"]})
    stats = pd.DataFrame([(i, 1, c, 10.0 if i[0] == "A" else 30.0, 2.0 if i[0] == "A" else 6.0)
                          for i in ids for c in range(1, 7)], columns=["id_code", "site", "channel", "mean", "std"])
    glob = pixel_stats.normalization_stats(table, "global", stats)
    assert glob.shape == (4, 2, 6)
    assert np.allclose(glob[:, 0], 20) and np.allclose(glob[:, 1], 4)
    pooled = pixel_stats.normalization_stats(table, "global-pooled", stats)
    assert np.allclose(pooled[:, 0], 15) and np.allclose(pooled[:, 1], np.sqrt(87))
    per_exp = pixel_stats.normalization_stats(table, "experiment", stats)
    assert np.allclose(per_exp[:3, 0], 10) and np.allclose(per_exp[3, 1], 6)
    # a subset (e.g. the test experiments) gets the whole data set's global statistics
    subset = pixel_stats.normalization_stats(table.tail(1), "global", stats, whole=table)
    assert np.allclose(subset, glob[:1])


# ------------------------------------------------------------------------------- TTA views


def test_tta_views_in_the_original_order():
    """View k: flip W if k&1, flip H if k&2, then transpose if k&4 (dataset.tta in the original)."""
    x = torch.randn(2, 6, 8, 8)

    def original(k):
        v = x
        if k & 1:
            v = v.flip(3)
        if k & 2:
            v = v.flip(2)
        if k & 4:
            v = v.transpose(2, 3)
        return v
    for n in range(1, 9):
        views = dataset.tta_views(x, n)
        assert len(views) == n and all(torch.equal(v, original(k)) for k, v in enumerate(views)), n


# -------------------------------------------------------------------- validation by name


def test_val_experiments_by_name(tiny_competition):
    table = metadata.load_table(tiny_competition[0])
    train = sorted(table.loc[table["split"] == "train", "experiment"].unique())
    folds = named_folds(table, [train[0], train[-1]])
    subsets = split_subsets(table, folds, 0)
    assert set(subsets["val"]["experiment"]) == {train[0], train[-1]}
    treated = subsets["train"][subsets["train"]["well_type"] == "treatment"]
    assert not set(treated["experiment"]) & {train[0], train[-1]}  # their controls may train
    with pytest.raises(UsageError, match="--val-experiments: NOPE-01 is not a train experiment"):
        named_folds(table, ["NOPE-01"])


def test_val_experiments_flag_runs_and_refuses_unknown_names(tiny_competition, tmp_path, capsys):
    table = metadata.load_table(tiny_competition[0])
    first = sorted(table.loc[table["split"] == "train", "experiment"].unique())[0]
    save = tmp_path / "named"
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, "--val-experiments", first, *SMALL) == 0
    assert f"val {len(table[(table['experiment'] == first) & (table['well_type'] == 'treatment')])}" \
        in (tmp_path / "named.log").read_text()
    capsys.readouterr()
    assert run("--data", tiny_competition[0], "--save", tmp_path / "bad", "-e", 1, "--val-experiments", "NOPE-9",
               *SMALL) == 2  # a flag that does not fit the data: usage
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "--val-experiments: NOPE-9 is not a train experiment" in errors[0]
    assert not (tmp_path / "bad.0").exists()


def test_validation_scores_sites_by_default(tiny_competition, monkeypatch):
    """The original scored each validation site alone; `--val-unit well` sums a well's sites first.
    Planted: site 1 right with margin 2, site 2 wrong with margin 1 -> sites 0.5, wells 1.0."""
    s = resolved_settings("--data", tiny_competition[0], "--save", "unused", *SMALL)
    data = load_data(s.data, s.exec)
    rows = data.subsets["val"]
    n = data.structure.n_classes
    logits = np.zeros((len(rows), n), dtype=np.float32)
    for i, (site, label) in enumerate(zip(rows["site"], rows["sirna_true"])):
        logits[i, label] = 2.0 if site == 1 else 0.0
        if site != 1:
            logits[i, (label + 1) % len(data.structure.treatment_classes)] = 1.0
    monkeypatch.setattr(inference, "infer", lambda *a, **k: {"logits": logits})
    assert set(rows["site"]) == {1, 2}
    assert inference.evaluate(s, RunContext(), None, data)["acc"] == pytest.approx(0.5)
    s = s.replace(inference={"val_unit": "well"})
    assert inference.evaluate(s, RunContext(), None, data)["acc"] == pytest.approx(1.0)


# ------------------------------------------------------------------- the bottleneck's BN statistics


def _bn_buffers_after_a_step(backbone: str, rule: str) -> dict:
    torch.manual_seed(3)
    net = CellClassifier(backbone, 5, 2, embedding_size=16, bottleneck_bn=rule, in_channels=6)
    net.load_state_dict(_BASE.state_dict())
    net.train()
    x, cell = torch.randn(4, 6, 32, 32, generator=torch.Generator().manual_seed(4)), torch.eye(2)[[0, 1, 0, 1]]
    out = net(x, cell)
    (out["logits"].sum() + out["cosine"].sum()).backward()
    return {k: v for k, v in net.state_dict().items() if "running" in k}


_BASE = CellClassifier("densenet121", 5, 2, embedding_size=16, in_channels=6)


def test_bottleneck_statistics_move_as_in_the_memory_efficient_densenet():
    """The original trained the memory-efficient DenseNet161, whose recomputed bottlenecks update
    norm1 twice a step. By default the plain network's buffers after a step equal the
    memory-efficient network's; `once` makes both a single update at --bn-mom."""
    mem = _bn_buffers_after_a_step("mem-densenet121", "recomputed")
    plain = _bn_buffers_after_a_step("densenet121", "recomputed")
    assert mem.keys() == plain.keys() and all(torch.allclose(mem[k], plain[k], atol=1e-6) for k in mem)
    once_plain = _bn_buffers_after_a_step("densenet121", "once")
    once_mem = _bn_buffers_after_a_step("mem-densenet121", "once")
    assert all(torch.allclose(once_mem[k], once_plain[k], atol=1e-6) for k in once_plain)
    norm1 = [k for k in plain if ".norm1.running_mean" in k]
    assert len(norm1) == 58 and all(not torch.allclose(plain[k], once_plain[k]) for k in norm1)
    assert all(torch.equal(plain[k], once_plain[k]) for k in plain if ".norm1." not in k)  # nothing else changes
    net = CellClassifier("densenet121", 5, 2, embedding_size=16, bn_mom=0.05, in_channels=6)
    layer = net.backbone.denseblock1.denselayer1
    assert layer.norm1.momentum == pytest.approx(0.0975) and layer.norm2.momentum == 0.05
