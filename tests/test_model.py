"""Tests for model.py: backbones, 6-channel stem, pretrained loading, neck/heads, losses (CPU)."""
from __future__ import annotations

import math
import os
import sys
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cellpaint.networks import backbones as B  # noqa: E402
import model as M  # noqa: E402

N_CLASSES, N_CELLS, EMB = 10, 4, 32


def _onehot(b: int = 2) -> torch.Tensor:
    return F.one_hot(torch.arange(b) % N_CELLS, N_CELLS).float()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions: one thread is far faster than two fighting a busy machine (OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may download: an empty torch hub dir and a downloader that fails like no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))

    def no_network(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


@pytest.mark.parametrize(
    "name", ["resnet18", "densenet121", "mem-densenet121", "efficientnet_b0", "pm-resnet18", "pm-squeezenet1_1"]
)
def test_families_forward_any_size(name: str) -> None:
    torch.manual_seed(0)
    net = M.CellClassifier(name, N_CLASSES, N_CELLS, embedding_size=EMB, in_channels=6)
    for size in (48, 64):
        out = net(torch.randn(2, 6, size, size), _onehot())
        assert out["embedding"].shape == (2, EMB)
        assert out["logits"].shape == out["cosine"].shape == (2, N_CLASSES)
        assert out["cosine"].abs().max() <= 1 + 1e-5
    if name.startswith("mem-"):
        assert all(m.memory_efficient for m in net.modules() if hasattr(m, "memory_efficient"))
        M.combined_loss(out, M.smooth_labels(torch.tensor([1, 2]), N_CLASSES, 0.1)).backward()
        assert net.backbone.conv0.weight.grad is not None


def test_build_backbone_feature_map_and_stem() -> None:
    feats, n = B.build_backbone("resnet18", in_channels=4)
    assert n == 512 and feats.conv1.in_channels == 4
    assert feats(torch.randn(1, 4, 40, 56)).shape == (1, 512, 2, 2)
    _, n = B.build_backbone("pm-dpn68", in_channels=6)  # classifier is a 1x1 conv there
    assert n == 832


def test_densenet161_default_builds() -> None:
    net = M.CellClassifier("densenet161", N_CLASSES, N_CELLS, embedding_size=EMB, in_channels=6).eval()
    assert net.backbone.conv0.in_channels == 6
    assert net.neck[0].num_features == 2208 + N_CELLS
    with torch.no_grad():
        assert net(torch.randn(1, 6, 32, 32), _onehot(1))["logits"].shape == (1, N_CLASSES)


def test_unknown_backbone_lists_supported() -> None:
    with pytest.raises(ValueError, match="densenet161.*mem-.*pm-"):
        B.build_backbone("nope", in_channels=6)
    with pytest.raises(ValueError):
        B.build_backbone("mem-resnet18", in_channels=6)
    with pytest.raises(ValueError):
        B.build_backbone("pm-vgg16", in_channels=6)
    assert "mem-densenet161" in B.supported_backbones() and "pm-se_resnext50_32x4d" in B.supported_backbones()
    for name in B.supported_backbones():
        assert B.is_supported_backbone(name), name
    assert not any(B.is_supported_backbone(n) for n in ("mem-resnet50", "pm-nope", "densenet", "resnet0"))


def test_concat_cell_type_and_head_hidden() -> None:
    net = M.CellClassifier("resnet18", N_CLASSES, N_CELLS, embedding_size=EMB, concat_cell_type=False,
                           head_hidden=[16, 8], bn_mom=0.1, in_channels=6)
    assert net.neck[0].num_features == 512
    out = net(torch.randn(2, 6, 48, 48), None)
    assert out["logits"].shape == (2, N_CLASSES)
    linears = [m for m in net.head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(EMB, 16), (16, 8), (8, N_CLASSES)]
    assert {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)} == {0.1}

    net = M.CellClassifier("resnet18", N_CLASSES, N_CELLS, embedding_size=EMB, in_channels=6)
    assert net.neck[0].num_features == 512 + N_CELLS
    assert {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)} == {0.05}
    with pytest.raises(ValueError, match="cell_onehot"):
        net(torch.randn(2, 6, 48, 48), None)
    net.eval()
    x, s = torch.randn(2, 6, 48, 48), _onehot()
    with torch.no_grad():
        out = net(x, s)  # inference logits: the softmax head of the embedding only (the 1st place's, not ArcFace)
        assert torch.allclose(net.head(net.embed(x, s)), out["logits"])


def _save_resnet18(path: str, wrap: str | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    sd = torchvision.models.resnet18().state_dict()
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({wrap: {"module." + k: v for k, v in sd.items()}} if wrap else sd, path)
    return sd


@pytest.mark.parametrize("name", ["resnet18", "pm-resnet18"])
def test_stem_from_rgb_weights_of_local_file(tmp_path, name: str) -> None:
    path = str(tmp_path / "r18.pth")
    sd = _save_resnet18(path)
    feats, _ = B.build_backbone(name, pretrained=path, stem_init="rgb-copy", in_channels=6)
    own = feats.state_dict()
    prefix = "model." if name.startswith("pm-") else ""
    expected = sd["conv1.weight"][:, [0, 1, 2, 0, 1, 2]] * 0.5
    assert torch.equal(own[prefix + "conv1.weight"], expected)
    others = [k for k in sd if not k.startswith(("conv1.", "fc."))]
    assert others and all(torch.equal(own[prefix + k], sd[k]) for k in others)
    assert not any(".fc." in k or "last_linear" in k for k in own)


def test_local_file_wrapped_and_old_densenet_keys(tmp_path) -> None:
    path = str(tmp_path / "wrapped.pth")
    sd = _save_resnet18(path, wrap="state_dict")
    net = M.CellClassifier("resnet18", N_CLASSES, N_CELLS, pretrained=path, in_channels=4, stem_init="rgb-copy")
    w = net.backbone.conv1.weight
    assert torch.equal(w, sd["conv1.weight"][:, [0, 1, 2, 0]] * 0.75)
    assert torch.equal(net.backbone.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])

    dn = torchvision.models.densenet121().state_dict()  # torchvision's own files use 'norm.1' names
    old = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v + 1 for k, v in dn.items()}
    torch.save({"model": old}, tmp_path / "dn.pth")
    feats, _ = B.build_backbone("densenet121", pretrained=str(tmp_path / "dn.pth"), in_channels=6)
    assert torch.equal(feats.denseblock1.denselayer1.conv2.weight, dn["features.denseblock1.denselayer1.conv2.weight"] + 1)


def test_local_file_errors_name_the_file(tmp_path) -> None:
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(B.PretrainedUnavailable, match="not found.*missing.pth"):
        B.build_backbone("resnet18", pretrained=missing, in_channels=6)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(B.PretrainedUnavailable, match="junk.pth") as err:
        B.build_backbone("resnet18", pretrained=str(junk), in_channels=6)
    assert "\n" not in str(err.value)
    other = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    with pytest.raises(B.PretrainedUnavailable, match="r34.pth does not fit backbone 'resnet18'"):
        B.build_backbone("resnet18", pretrained=str(other), in_channels=6)
    assert issubclass(B.PretrainedUnavailable, RuntimeError)


@pytest.mark.parametrize("name", ["resnet18", "pm-resnet18"])
def test_imagenet_offline_is_a_clear_error(name: str) -> None:
    with pytest.raises(B.PretrainedUnavailable) as err:
        B.build_backbone(name, pretrained="imagenet", in_channels=6)
    msg = str(err.value)
    assert "\n" not in msg and name in msg and "https://" in msg and "pretrained=PATH" in msg
    assert os.environ["TORCH_HOME"] in msg  # names the cache location it looked in


def test_imagenet_from_hub_cache() -> None:
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    ckpt_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(ckpt_dir)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, os.path.join(ckpt_dir, os.path.basename(url)))
    feats, _ = B.build_backbone("resnet18", pretrained="imagenet", stem_init="rgb-copy", in_channels=6)
    assert torch.equal(feats.conv1.weight, sd["conv1.weight"][:, [0, 1, 2, 0, 1, 2]] * 0.5)


@pytest.mark.parametrize("name", ["resnet18", "pm-resnet18"])
def test_stem_is_fresh_by_default_when_weights_load(tmp_path, name: str) -> None:
    """The 1st place replaced the stem with a new nn.Conv2d after loading ImageNet weights: the
    default stem is randomly initialised (kaiming-uniform bound 1/sqrt(fan_in)), the rest loaded."""
    path = str(tmp_path / "r18.pth")
    sd = _save_resnet18(path)
    torch.manual_seed(0)
    own = B.build_backbone(name, pretrained=path, in_channels=6)[0].state_dict()
    prefix = "model." if name.startswith("pm-") else ""
    stem = own[prefix + "conv1.weight"]
    assert stem.shape == (64, 6, 7, 7)
    assert not torch.equal(stem, sd["conv1.weight"][:, [0, 1, 2, 0, 1, 2]] * 0.5)
    bound = 1 / math.sqrt(6 * 7 * 7)
    assert stem.abs().max() <= bound and stem.abs().max() > 0.9 * bound  # uniform(-bound, bound)
    assert abs(float(stem.std()) - bound / math.sqrt(3)) < 0.05 * bound
    assert all(torch.equal(own[prefix + k], sd[k]) for k in sd if not k.startswith(("conv1.", "fc.")))
    torch.manual_seed(0)
    assert torch.equal(B.build_backbone(name, pretrained=path, in_channels=6)[0].state_dict()[prefix + "conv1.weight"], stem)
    with pytest.raises(ValueError, match="stem initialisation 'copy'"):
        B.build_backbone(name, pretrained=path, stem_init="copy", in_channels=6)


def test_dense_cross_entropy_matches_cross_entropy() -> None:
    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    target = F.one_hot(labels, 7).float()
    assert torch.allclose(M.dense_cross_entropy(logits, target), F.cross_entropy(logits, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert M.dense_cross_entropy(logits.bfloat16(), target).dtype == torch.float32


def _hand_arcface(cos_row: list[float], target_row: list[float], s: float, m: float) -> float:
    logits = []
    for c, t in zip(cos_row, target_row):
        theta = math.acos(c)
        phi = math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)
        logits.append(s * (t * phi + (1 - t) * c))
    log_z = math.log(sum(math.exp(v) for v in logits))
    return -sum(t * (v - log_z) for v, t in zip(logits, target_row))


def test_arcface_loss_by_hand() -> None:
    s, m = 30.0, 0.5
    cos = [[0.8, 0.1, -0.3], [-0.2, -0.95, 0.4], [0.3, 0.5, 0.0]]  # row 2: θ_y + m > π branch
    target = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.7, 0.3]]  # last row soft
    expected = sum(_hand_arcface(c, t, s, m) for c, t in zip(cos, target)) / 3
    got = M.arcface_loss(torch.tensor(cos), torch.tensor(target), scale=s, margin=m)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # one-hot rows: standard ArcFace, i.e. cross-entropy on s*cos with the label's cos replaced
    c0 = torch.tensor([cos[0]])
    ref = F.cross_entropy(s * torch.tensor([[math.cos(math.acos(0.8) + m), 0.1, -0.3]]), torch.tensor([0]))
    assert M.arcface_loss(c0, torch.tensor([target[0]])).item() == pytest.approx(ref.item(), rel=1e-5)
    grad_in = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], requires_grad=True)  # clamped: finite gradients
    M.arcface_loss(grad_in, torch.tensor([[1.0, 0.0], [1.0, 0.0]])).backward()
    assert torch.isfinite(grad_in.grad).all()


def test_smooth_labels_and_combined_loss() -> None:
    t = M.smooth_labels(torch.tensor([2, 0]), 5, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert t[0, 2].item() == pytest.approx(0.9) and t[0, 0].item() == pytest.approx(0.025)
    assert torch.equal(M.smooth_labels(torch.tensor([1]), 3, 0.0), torch.tensor([[0.0, 1.0, 0.0]]))
    out = {"logits": torch.randn(2, 5), "cosine": torch.rand(2, 5) * 2 - 1}
    ce, arc = M.dense_cross_entropy(out["logits"], t), M.arcface_loss(out["cosine"], t)
    got = M.combined_loss(out, t, metric_loss_coeff=0.2, arcface_factor=1.0)
    assert got.item() == pytest.approx((0.8 * ce + 0.2 * arc).item(), rel=1e-6)
    got = M.combined_loss(out, t, metric_loss_coeff=0.3)  # default halves ArcFace, like the 1st place
    assert got.item() == pytest.approx((0.7 * ce + 0.3 * 0.5 * arc).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["resnet18", "pm-squeezenet1_1"])
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    net = M.CellClassifier(name, N_CLASSES, N_CELLS, embedding_size=EMB, head_hidden=[16], in_channels=6)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    out = net(torch.randn(4, 6, 48, 48), _onehot(4))
    M.combined_loss(out, M.smooth_labels(torch.tensor([0, 1, 2, 3]), N_CLASSES, 0.1)).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_channels_last_matches() -> None:
    torch.manual_seed(0)
    net = M.CellClassifier("efficientnet_b0", N_CLASSES, N_CELLS, embedding_size=EMB, in_channels=6).eval()
    x, s = torch.randn(2, 6, 48, 48), _onehot()
    with torch.no_grad():
        ref = net(x, s)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.to(memory_format=torch.channels_last), s)
    for key in ("embedding", "logits", "cosine"):
        assert torch.allclose(out[key], ref[key], atol=1e-4)


def test_small_cnn_for_cpu_demos():
    from cellpaint.networks.backbones import SMALL_CNN, PretrainedUnavailable, build_backbone, supported_backbones
    features, width = build_backbone(SMALL_CNN, in_channels=6)
    assert SMALL_CNN in supported_backbones()
    assert features(torch.zeros(2, 6, 48, 48)).shape == (2, width, 12, 12)
    with pytest.raises(PretrainedUnavailable, match="--pretrained none"):
        build_backbone(SMALL_CNN, pretrained="imagenet", in_channels=6)
