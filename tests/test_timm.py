"""timm backbones (`--backbone timm-NAME`) on the CPU with random weights: five families build with a
6-channel stem, feed the neck, train a step and predict; local weight files and the offline message."""
from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cellpaint.networks import backbones as B  # noqa: E402
import model as M  # noqa: E402
from tests.conftest import SMALL, run  # noqa: E402

timm = pytest.importorskip("timm")  # a requirement; the skip only spares a half-installed venv a traceback

N_CLASSES, N_CELLS, EMB = 10, 4, 32

# one small variant per family: ConvNeXt, EfficientNetV2, RegNet, NFNet (NF-RegNet), ViT
FAMILIES = {"convnext_atto": 320, "tf_efficientnetv2_b0": 1280, "regnetx_002": 368, "nf_regnet_b0": 960,
            "vit_tiny_patch16_224": 192}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a shared 2-core machine: one thread is faster
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may download: an empty Hugging Face cache, and the hub in offline mode (it then only
    looks in the cache, as it does when the network is down, without minutes of retries)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _onehot(b: int) -> torch.Tensor:
    return F.one_hot(torch.arange(b) % N_CELLS, N_CELLS).float()


@pytest.mark.parametrize("name", FAMILIES)
def test_family_builds_trains_a_step_and_predicts(name: str) -> None:
    torch.manual_seed(0)
    net = M.CellClassifier(B.TIMM_PREFIX + name, N_CLASSES, N_CELLS, embedding_size=EMB, in_channels=6)
    # the neck takes the model's pooled width (plus the cell-type one-hot)
    assert net.neck[0].num_features == FAMILIES[name] + N_CELLS
    stems = [m for m in net.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 6]
    assert len(stems) == 1 and not any(m.in_channels == 3 for m in net.backbone.modules()
                                       if isinstance(m, torch.nn.Conv2d))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, cell, target = torch.randn(4, 6, 48, 48), _onehot(4), M.smooth_labels(torch.tensor([0, 1, 2, 3]), N_CLASSES)
    for step in range(2):  # two: RegNet zero-initialises each block's last BN gamma, so its branch
        opt.zero_grad()     # gets gradients only once that gamma has moved
        M.combined_loss(net(x, cell), target).backward()
        # every parameter is in the graph (DDP relies on it): no unused timm head layer
        unused = [n for n, p in net.named_parameters() if p.grad is None]
        assert not unused, unused[:5]
        opt.step()
    unchanged = [n for n, p in net.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged[:5]
    net.eval()
    with torch.no_grad():
        for size in (48, 40):  # any image size, also one that is not a whole number of ViT patches
            logits = net(torch.randn(2, 6, size, size), _onehot(2))["logits"]
            assert logits.shape == (2, N_CLASSES) and torch.isfinite(logits).all()


def test_names_are_checked_without_listing_them() -> None:
    assert B.is_supported_backbone("timm-convnext_atto") and B.is_supported_backbone("timm-convnext_atto.d2_in1k")
    assert not B.is_supported_backbone("timm-nope") and not B.is_supported_backbone("timm-")
    with pytest.raises(ValueError, match="timm-"):
        B.build_backbone("timm-nope", in_channels=6)
    assert not any(n.startswith("timm-") for n in B.supported_backbones())  # 1,000+ names: checked, not listed


def test_imagenet_offline_is_one_line_naming_cache_and_file_option() -> None:
    from huggingface_hub import constants

    with pytest.raises(B.PretrainedUnavailable) as err:
        B.build_backbone("timm-convnext_atto", pretrained="imagenet", in_channels=6)
    msg = str(err.value)
    assert "\n" not in msg and "timm-convnext_atto" in msg and "--pretrained PATH" in msg
    assert os.path.join(constants.HF_HUB_CACHE, "models--timm--convnext_atto.d2_in1k") in msg
    with pytest.raises(B.PretrainedUnavailable, match="no pretrained weights.*--pretrained none"):
        B.build_backbone("timm-nf_regnet_b0", pretrained="imagenet", in_channels=6)


def test_local_weights_file_adapts_the_stem(tmp_path) -> None:
    torch.manual_seed(1)
    rgb = timm.create_model("regnetx_002").state_dict()  # 3 channels, ImageNet classifier included
    rgb = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in rgb.items()}
    path = tmp_path / "regnet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in rgb.items()}}, path)  # a DDP training file
    feats, n = B.build_backbone("timm-regnetx_002", pretrained=str(path), stem_init="rgb-copy", in_channels=6)
    own = feats.model.state_dict()
    # timm's stem adaptation: the RGB kernels repeated over the 6 channels, scaled by 3/6
    tiled = rgb["stem.conv.weight"][:, [0, 1, 2, 0, 1, 2]]
    assert torch.allclose(own["stem.conv.weight"], tiled * 0.5)
    assert torch.equal(own["s4.b1.conv3.conv.weight"], rgb["s4.b1.conv3.conv.weight"])
    assert not any(k.startswith("head.fc") for k in own) and n == 368
    unscaled = B.build_backbone("timm-regnetx_002", pretrained=str(path), stem_init="rgb-tile", in_channels=6)[0]
    assert torch.allclose(unscaled.model.state_dict()["stem.conv.weight"], tiled)
    # the default, as the 1st place for its DenseNet: a freshly drawn stem, everything else loaded
    fresh = B.build_backbone("timm-regnetx_002", pretrained=str(path), in_channels=6)[0].model.state_dict()
    assert not torch.allclose(fresh["stem.conv.weight"], tiled * 0.5)
    assert fresh["stem.conv.weight"].abs().max() <= 1 / (6 * 3 * 3) ** 0.5
    assert torch.equal(fresh["s4.b1.conv3.conv.weight"], rgb["s4.b1.conv3.conv.weight"])

    torch.save(timm.create_model("regnetx_004").state_dict(), tmp_path / "other.pth")
    with pytest.raises(B.PretrainedUnavailable, match="other.pth does not fit timm backbone 'regnetx_002'") as err:
        B.build_backbone("timm-regnetx_002", pretrained=str(tmp_path / "other.pth"), in_channels=6)
    assert "\n" not in str(err.value)
    with pytest.raises(B.PretrainedUnavailable, match="not found"):
        B.build_backbone("timm-regnetx_002", pretrained=str(tmp_path / "missing.pth"), in_channels=6)


def test_trainer_trains_and_predicts_with_a_timm_backbone(tiny_competition, tmp_path) -> None:
    """main.py end to end: the checkpoint records the timm backbone, and predict rebuilds it from there."""
    save = tmp_path / "net"
    argv = [a if a != "smallcnn" else "timm-regnetx_002" for a in SMALL]
    assert run("--data", tiny_competition[0], "--save", save, "-e", 1, "--cv-number", 0, *argv) == 0
    state = torch.load(f"{save}.0", weights_only=True)
    assert state["settings"]["model"]["backbone"] == "timm-regnetx_002"
    assert any(k.startswith("backbone.model.stem.conv") for k in state["model"])
    # --backbone left at its default: the checkpoint's own backbone is used
    rest = [a for i, a in enumerate(SMALL) if a != "--backbone" and (i == 0 or SMALL[i - 1] != "--backbone")]
    assert run("--data", tiny_competition[0], "--mode", "predict", "--load", f"{save}.0", "--tta", 2, *rest) == 0
    with open(f"{save}.0.output", "rb") as f:
        output = pickle.load(f)
    vectors = [v for sites in output["test"].values() for v in sites]
    assert vectors and all(v.shape == (state["n_classes"],) for v in vectors)
