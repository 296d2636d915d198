"""The backbone factory: CNN feature extractors with a 6-channel stem, from torchvision,
pretrainedmodels (`pm-`), timm (`timm-`) or the small test CNN, with ImageNet or local weights.

`build_backbone(name, pretrained, in_channels, stem_init)` returns (features module, feature
count); model.py puts the neck and heads on top.
"""
from __future__ import annotations

import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
import torchvision
from torch import Tensor, nn

from cellpaint.core.errors import InputError
from cellpaint.networks.timm_weights import quiet_timm, timm_file_problem

_TV_PREFIXES = ("resnet", "resnext", "wide_resnet", "densenet", "efficientnet_")
# pretrainedmodels' VGG/AlexNet put their fully connected layers inside features(), so they only
# work at 224 px; every other model there is convolutional up to features().
_PM_EXCLUDED = re.compile(r"^(vgg|alexnet)")
# Submodules that only the ImageNet classifier uses; dropped so that every parameter we keep
# gets a gradient (DDP and the "all params train" test rely on it) and ignored in weight files.
_CLASSIFIER_NAMES = ("fc", "classifier", "last_linear", "last_conv", "AuxLogits")
# Old torchvision/pretrainedmodels DenseNet files name keys 'denselayer1.norm.1.weight';
# current modules expect 'denselayer1.norm1.weight' (same regex torchvision uses).
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class PretrainedUnavailable(InputError, RuntimeError):
    """Requested pretrained weights cannot be had: offline without a cache, or a bad local file."""


def _tv_names() -> list[str]:
    names = torchvision.models.list_models(module=torchvision.models)
    return sorted(n for n in names if n.startswith(_TV_PREFIXES))


def _pm_names() -> list[str]:
    import pretrainedmodels  # imported lazily: it is slow to import and only needed for pm- names

    return sorted(n for n in pretrainedmodels.model_names if not _PM_EXCLUDED.match(n))


def supported_backbones() -> list[str]:
    """All names `build_backbone` accepts, but for timm's: `timm-NAME` for any NAME in timm.list_models()
    (over a thousand, so they are checked by `is_supported_backbone` rather than listed)."""
    tv = _tv_names()
    mem = ["mem-" + n for n in tv if n.startswith("densenet")]
    return [SMALL_CNN] + tv + mem + ["pm-" + n for n in _pm_names()]


def is_supported_backbone(name: str) -> bool:
    """Whether `build_backbone` accepts `name`; imports pretrainedmodels only for a 'pm-' name, timm only
    for a 'timm-' one."""
    if name.startswith(TIMM_PREFIX):
        return _timm_known(name[len(TIMM_PREFIX):])
    if name.startswith("pm-"):
        return name[3:] in _pm_names()
    tv = _tv_names()
    return name == SMALL_CNN or name in tv or (name.startswith("mem-densenet") and name[4:] in tv)


SMALL_CNN = "smallcnn"


def small_cnn(in_channels: int, widths: tuple[int, ...] = (24, 48, 96)) -> tuple[nn.Module, int]:
    """A plain 3-stage CNN for CPU demos and tests on small synthetic images.

    ImageNet backbones stride by 4 in their stem, which leaves almost nothing of a 48 px image;
    this one keeps full resolution in its first stage and costs a few MFLOPs per image.
    """
    layers: list[nn.Module] = []
    width_in = in_channels
    for width in widths:
        for i in range(2):
            layers += [nn.Conv2d(width_in if i == 0 else width, width, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.MaxPool2d(2))
        width_in = width
    return nn.Sequential(*layers[:-1]), widths[-1]  # the neck pools: no last max-pool


def _unsupported(name: str) -> ValueError:
    tv = _tv_names()
    return ValueError(
        f"unknown backbone {name!r}; supported: torchvision {', '.join(tv)}; "
        f"'mem-' + a densenet (memory-efficient); 'pm-' + a pretrainedmodels model "
        f"({', '.join(_pm_names())}; VGG/AlexNet excluded as they need 224 px); "
        f"'{TIMM_PREFIX}' + any timm model (timm.list_models())"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _build_imagenet(name: str, url: str, build: Callable[[], nn.Module]) -> nn.Module:
    """Call `build()` (which fetches `url` through the torch hub cache) with a clear offline error."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    try:
        return build()
    except Exception as err:  # URLError, HTTPError, a corrupt cache file, a hash mismatch ...
        raise PretrainedUnavailable(
            f"ImageNet weights for {name!r} unavailable: tried the torch hub cache {cached} and "
            f"downloading {url} ({_first_line(err)}); copy the file there (or set TORCH_HOME) "
            f"or pass a local state-dict file as pretrained=PATH"
        ) from err


def _build_3ch(name: str, pretrained: str) -> tuple[str, nn.Module]:
    """The full 3-channel ImageNet model (classifier included), with ImageNet weights if asked."""
    imagenet = pretrained == "imagenet"
    if name.startswith("pm-"):
        base = name[3:]
        if base not in _pm_names():
            raise _unsupported(name)
        import pretrainedmodels

        factory = pretrainedmodels.__dict__[base]

        def build(weights: str | None) -> nn.Module:
            with warnings.catch_warnings():  # pm calls torchvision with the deprecated pretrained=
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)  # inceptionv3's init notice
                return factory(num_classes=1000, pretrained=weights)

        if not imagenet:
            return "pm", build(None)
        settings = pretrainedmodels.pretrained_settings[base]
        if "imagenet" not in settings:
            raise PretrainedUnavailable(f"pretrainedmodels has no 'imagenet' weights for {base!r}")
        return "pm", _build_imagenet(name, settings["imagenet"]["url"], lambda: build("imagenet"))

    mem = name.startswith("mem-")
    base = name[4:] if mem else name
    if base not in _tv_names() or (mem and not base.startswith("densenet")):
        raise _unsupported(name)
    # memory_efficient=True checkpoints each dense layer's bottleneck: recomputed in backward.
    kwargs = {"memory_efficient": True} if mem else {}
    if not imagenet:
        return "tv", torchvision.models.get_model(base, weights=None, **kwargs)
    weights = torchvision.models.get_model_weights(base).DEFAULT
    return "tv", _build_imagenet(
        name, weights.url, lambda: torchvision.models.get_model(base, weights=weights, **kwargs)
    )


def _is_classifier_key(key: str) -> bool:
    return key.split(".", 1)[0] in _CLASSIFIER_NAMES


def _load_local(model: nn.Module, path: str, name: str) -> None:
    """Load a local 3-channel backbone state dict into `model`, ignoring classifier keys."""
    if not os.path.isfile(path):
        raise PretrainedUnavailable(f"pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedUnavailable(
            f"pretrained weights file {path} is not a loadable state dict ({_first_line(err)})"
        ) from err
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedUnavailable(f"pretrained weights file {path} holds no state dict of tensors")
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        key = key[7:] if key.startswith("module.") else key  # saved from DataParallel/DDP
        match = _OLD_DENSENET_KEY.match(key)
        key = match.group(1) + match.group(2) if match else key
        if isinstance(value, Tensor) and not _is_classifier_key(key):
            state[key] = value
    own = {k: v for k, v in model.state_dict().items() if not _is_classifier_key(k)}
    # Old files lack BatchNorm's num_batches_tracked; BatchNorm fills it in itself.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise PretrainedUnavailable(
            f"pretrained weights file {path} does not fit backbone {name!r}: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(shapes)} of another shape {shapes[:3]}"
        )
    model.load_state_dict(state, strict=False)


STEM_INITS = ("random", "rgb-copy", "rgb-tile")


def _swap_stem(model: nn.Module, in_channels: int, from_rgb: bool, tile: bool = False) -> None:
    """Replace the (only) 3-channel input convolution with an `in_channels` one, in place.

    `from_rgb` False: a freshly initialised conv (nn.Conv2d's default), as the 1st place did even
    with ImageNet weights; True: started from the RGB kernels (below), scaled by 3/in_channels,
    or unscaled with `tile` (the 41st place's concatenation of the RGB kernels, cat((w, w)))."""
    path, old = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3),
        (None, None),
    )
    if old is None:
        raise ValueError(f"no 3-channel input convolution found in {type(model).__name__}")
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
        old.groups, old.bias is not None, old.padding_mode,
    )
    if from_rgb:
        # Channel i reuses the RGB kernel i % 3; scaling by 3/in_channels keeps the summed response
        # (hence the activation scale the pretrained layers expect) the same as for an RGB image.
        with torch.no_grad():
            index = torch.arange(in_channels) % 3
            new.weight.copy_(old.weight[:, index] * (1.0 if tile else 3.0 / in_channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    parent_name, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


class _PretrainedModelsFeatures(nn.Module):
    """A pretrainedmodels network cut at features(); logits() pools a fixed 7x7, we pool adaptively."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.features(x)


def build_backbone(name: str, pretrained: str = "none", *, in_channels: int,
                   stem_init: str = "random") -> tuple[nn.Module, int]:
    """Feature extractor [B,in_channels,H,W] -> [B,F,h,w] for any H, W, and its F.

    `pretrained`: 'none' (random init), 'imagenet' (torch hub cache or download), or a PATH to a
    local 3-channel state dict. Failures to get or fit weights raise PretrainedUnavailable.
    `stem_init`: the new `in_channels` input conv with pretrained weights: 'random' (the 1st
    place), 'rgb-copy' (from the RGB kernels, scaled) or 'rgb-tile' (the RGB kernels repeated,
    unscaled: the 41st place); without pretrained weights it is always random.
    """
    if stem_init not in STEM_INITS:
        raise ValueError(f"unknown stem initialisation {stem_init!r} (choose from {', '.join(STEM_INITS)})")
    if name.startswith(TIMM_PREFIX):
        return build_timm_backbone(name[len(TIMM_PREFIX):], pretrained, in_channels=in_channels, stem_init=stem_init)
    if name == SMALL_CNN:
        if pretrained != "none":
            raise PretrainedUnavailable(f"{SMALL_CNN} has no pretrained weights: use --pretrained none")
        return small_cnn(in_channels)
    kind, model = _build_3ch(name, pretrained)
    if pretrained not in ("none", "imagenet"):
        _load_local(model, pretrained, name)  # before the stem swap, so rgb-copy starts from its RGB stem
    _swap_stem(model, in_channels, from_rgb=pretrained != "none" and stem_init != "random",
               tile=stem_init == "rgb-tile")

    if kind == "pm":
        # The classifier is last_linear (a Linear, or a 1x1 conv in DPNs), or last_conv in SqueezeNets.
        head = getattr(model, "last_linear", None) or model.last_conv
        n_features = head.in_features if isinstance(head, nn.Linear) else head.in_channels
        for attr in ("last_linear", "last_conv", "AuxLogits"):
            if isinstance(getattr(model, attr, None), nn.Module):
                setattr(model, attr, None)
        if hasattr(model, "aux_logits"):  # inceptionv3 runs AuxLogits inside features() otherwise
            model.aux_logits = False
        return _PretrainedModelsFeatures(model), n_features

    if isinstance(model, torchvision.models.ResNet):
        # Named like torchvision's so state-dict keys stay recognisable.
        parts = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        features = nn.Sequential(OrderedDict((p, getattr(model, p)) for p in parts))
        return features, model.fc.in_features
    if isinstance(model, torchvision.models.DenseNet):
        # Ends at norm5 without the ReLU torchvision applies before its classifier: the 1st place
        # pooled norm5's output directly, and the neck starts with a BatchNorm anyway.
        return model.features, model.classifier.in_features
    # EfficientNet (v1 and v2): features ends with a conv+BN+SiLU block.
    assert isinstance(model, torchvision.models.EfficientNet), type(model)
    return model.features, model.classifier[-1].in_features


# ----------------------------------------------------------------------------------------- timm

TIMM_PREFIX = "timm-"


def _timm_known(name: str) -> bool:
    import timm  # imported lazily: a second or more to import, and only needed for timm- names

    return bool(name) and timm.is_model(name)  # accepts a pretrained tag too: 'convnext_atto.d2_in1k'


class _TimmFeatures(nn.Module):
    """A timm model built with num_classes=0: its forward is its own pooled pre-logits features [B, F].

    Returned as [B, F, 1, 1] so that the neck's adaptive average pool (an identity here) serves it like
    any other backbone. The model's own pooling is kept, not forward_features + our pool: for CNNs it is
    the same global average, but it is also what is right for models whose features are not an NCHW
    map (ViT tokens pooled by the class token, Swin's NHWC maps) and it runs the layers timm puts after
    the pool (ConvNeXt's head norm, MobileNetV3's conv head), so every parameter gets a gradient.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        feats = self.model(x)
        return feats.reshape(feats.shape[0], -1, 1, 1)


def _timm_weights_hint(name: str) -> str:
    """Where timm looks for `name`'s ImageNet weights (Hugging Face hub id and its cache folder)."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        folder = os.path.join(constants.HF_HUB_CACHE, "models--" + hub_id.split("@")[0].replace("/", "--"))
        return f"the Hugging Face cache {folder} and downloading {hub_id}"
    url = getattr(cfg, "url", None)
    return f"downloading {url}" if url else "timm's weight sources"


def build_timm_backbone(name: str, pretrained: str = "none", *, in_channels: int,
                        stem_init: str = "random") -> tuple[nn.Module, int]:
    """Any timm model with an `in_channels` stem, as [B,in_channels,H,W] -> [B,F,1,1], and its F.

    `pretrained`: 'none', 'imagenet' (timm's own weights, through the Hugging Face cache or a download)
    or a PATH to a 3-channel state dict (.safetensors, or a torch file loaded with weights_only). With
    weights, timm adapts the stem (the RGB kernels repeated over the channels and scaled by
    3/in_channels: our 'rgb-copy') and drops the classifier; `stem_init` 'random' then re-draws the
    stem (the module timm's pretrained_cfg names as first_conv) and 'rgb-tile' undoes the scaling.
    """
    if not _timm_known(name):
        raise _unsupported(TIMM_PREFIX + name)
    import timm

    kwargs: dict = {"in_chans": in_channels, "num_classes": 0}
    if pretrained == "imagenet":
        if not timm.is_model_pretrained(name):
            raise PretrainedUnavailable(f"timm has no pretrained weights for {name!r}: use --pretrained none")
        kwargs["pretrained"] = True
    elif pretrained != "none":
        if not os.path.isfile(pretrained):
            raise PretrainedUnavailable(f"pretrained weights file not found: {pretrained}")
        # timm loads the file (weights_only; EMA/'state_dict'/'model' wrappers and 'module.' prefixes
        # unwrapped), runs the model's own key filter, adapts the stem and drops the classifier
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(pretrained)})

    # Transformers with position embeddings (ViT, DeiT, ...) are built for one image size: these
    # options let them take any (48 px tests, 512 px data, 0.9 crops for TTA) by resizing the embeddings
    # and padding to whole patches. Models that do not know an option refuse it with a TypeError naming
    # it; the next set is tried then (CNNs take any size anyway).
    options = ({"dynamic_img_size": True, "dynamic_img_pad": True}, {"dynamic_img_size": True}, {})
    for extra in options:
        try:
            with quiet_timm(pretrained not in ("none", "imagenet")):
                model = timm.create_model(name, **kwargs, **extra)
            break
        except Exception as err:  # offline, a missing cache entry, a file of another model ...
            if isinstance(err, TypeError) and any(option in str(err) for option in extra):
                continue
            if pretrained == "none":
                raise  # nothing to fetch or fit: a bug, shown as one
            raise PretrainedUnavailable(_timm_load_error(name, pretrained, err)) from err
    problem = timm_file_problem(model, name, pretrained) if pretrained not in ("none", "imagenet") else None
    if problem:
        raise PretrainedUnavailable(problem)
    if pretrained != "none" and stem_init != "rgb-copy":
        stem = model.get_submodule(model.pretrained_cfg["first_conv"])
        if stem_init == "random":
            stem.reset_parameters()
        else:
            with torch.no_grad():
                stem.weight.mul_(in_channels / 3)
    n_features = getattr(model, "head_hidden_size", None) or model.num_features
    return _TimmFeatures(model), int(n_features)


def _timm_load_error(name: str, pretrained: str, err: BaseException) -> str:
    if pretrained == "imagenet":
        return (f"ImageNet weights for '{TIMM_PREFIX}{name}' unavailable: tried {_timm_weights_hint(name)} "
                f"({_first_line(err)}); pass a local state-dict file as --pretrained PATH "
                f"(or HF_HUB_CACHE to a copied cache), or --pretrained none")
    return (f"pretrained weights file {pretrained} does not fit timm backbone {name!r} "
            f"({_first_line(err)})")
