"""The classifier on a backbone (cellpaint/networks/backbones.py): the embedding neck, the two heads and the losses.

Rebuilds the 1st-place RxRx1 model: CNN features -> adaptive average pool -> (cell-type one-hot)
-> BN/Linear/ReLU/BN/Linear/BN embedding -> softmax head + ArcFace cosine head, trained with
(1-c)*CE + c*ArcFace on dense (soft) targets so label smoothing, mixup and cutmix all act on targets.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cellpaint.networks.backbones import build_backbone


def _set_bn_momentum(module: nn.Module, momentum: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)):
            m.momentum = momentum


BOTTLENECK_BN = ("recomputed", "once")


def set_bottleneck_bn(backbone: nn.Module, momentum: float, rule: str = "recomputed") -> None:
    """How the running statistics of each DenseNet layer's bottleneck BatchNorm (`norm1`) move.

    The 1st place trained the memory-efficient DenseNet161, which recomputes each bottleneck in the
    backward pass, so `norm1` sees the same batch twice a step and its statistics move as one update
    with momentum 1 - (1 - m)² (0.0975 at m = 0.05). "recomputed" (the default) gives that movement
    to both variants: the plain net's `norm1` gets that momentum; the memory-efficient net keeps m.
    "once" gives both a single update with momentum m: the plain net keeps m, the memory-efficient
    one gets 1 - sqrt(1 - m), so that its two updates make one. Other backbones have no such layer.
    """
    if rule not in BOTTLENECK_BN:
        raise ValueError(f"unknown bottleneck BN rule {rule!r} (choose from {', '.join(BOTTLENECK_BN)})")
    for layer in backbone.modules():  # torchvision's dense layers: a bottleneck norm1 and the memory_efficient switch
        if hasattr(layer, "memory_efficient") and isinstance(getattr(layer, "norm1", None), nn.BatchNorm2d):
            twice = bool(layer.memory_efficient)  # checkpointed: recomputed, so updated twice a step
            if rule == "recomputed":
                layer.norm1.momentum = momentum if twice else 1 - (1 - momentum) ** 2
            else:
                layer.norm1.momentum = 1 - math.sqrt(1 - momentum) if twice else momentum


class ArcMarginHead(nn.Module):
    """Cosines between the L2-normalised embedding and L2-normalised class centres (no margin)."""

    def __init__(self, embedding_size: int, n_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_size))
        bound = 1.0 / math.sqrt(embedding_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, embedding: Tensor) -> Tensor:
        # float32 outside autocast: the margin acts near cos = 1, where fp16 steps are ~5e-4.
        with torch.autocast(device_type=embedding.device.type, enabled=False):
            return F.linear(F.normalize(embedding.float()), F.normalize(self.weight.float()))


HEADS = ("neck", "plain")


class CellClassifier(nn.Module):
    """Backbone -> pooled features (+ cell-type one-hot) -> embedding -> softmax and ArcFace heads.

    `head="plain"` (the 41st place) instead: backbone -> ReLU -> average pool -> Linear(F, E) ->
    BN -> ReLU -> Linear(E, classes); the embedding is the first Linear's output (before its
    BN); no cell-type one-hot, no hidden layers, no ArcFace head (forward has no "cosine").
    """

    def __init__(
        self,
        backbone: str,
        n_classes: int,
        n_cell_types: int,
        *,
        in_channels: int,
        embedding_size: int = 1024,
        head_hidden: list[int] | None = None,
        concat_cell_type: bool = True,
        bn_mom: float = 0.05,
        pretrained: str = "none",
        stem_init: str = "random",
        head: str = "neck",
        bottleneck_bn: str = "recomputed",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r} (choose from {', '.join(HEADS)})")
        if head == "plain" and (concat_cell_type or head_hidden):
            raise ValueError("the plain head takes no cell-type one-hot and no hidden layers")
        self.head_kind = head
        self.n_classes = n_classes
        self.n_cell_types = n_cell_types
        self.concat_cell_type = concat_cell_type
        self.in_channels = in_channels
        self.backbone, n_features = build_backbone(backbone, pretrained, in_channels=in_channels, stem_init=stem_init)
        if head == "plain":
            self._build_plain(n_features, embedding_size, n_classes)
            _set_bn_momentum(self, bn_mom)
            set_bottleneck_bn(self.backbone, bn_mom, bottleneck_bn)
            return
        n_in = n_features + (n_cell_types if concat_cell_type else 0)
        # Linear layers feeding a BatchNorm need no bias (the BN shift replaces it).
        self.neck = nn.Sequential(
            nn.BatchNorm1d(n_in),
            nn.Linear(n_in, embedding_size, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(embedding_size),
            nn.Linear(embedding_size, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        layers: list[nn.Module] = []
        width = embedding_size
        for hidden in head_hidden or []:
            layers += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.head = nn.Sequential(*layers)
        self.arc_head = ArcMarginHead(embedding_size, n_classes)
        # Like the 1st place, one momentum for every BatchNorm, the backbone's included (and the
        # dense layers' bottlenecks moving as its memory-efficient DenseNet's did).
        _set_bn_momentum(self, bn_mom)
        set_bottleneck_bn(self.backbone, bn_mom, bottleneck_bn)

    def _build_plain(self, n_features: int, embedding_size: int, n_classes: int) -> None:
        # the embedding layer apart from the rest, so that embed() can stop at its output
        self.neck = nn.Linear(n_features, embedding_size)
        self.head = nn.Sequential(nn.BatchNorm1d(embedding_size), nn.ReLU(inplace=True),
                                  nn.Linear(embedding_size, n_classes))
        self.arc_head = None

    def embed(self, x: Tensor, cell_onehot: Tensor | None = None) -> Tensor:
        """The embedding [B, embedding_size]."""
        features = self.backbone(x)
        if self.head_kind == "plain":  # torchvision DenseNets end at norm5: the ReLU their classifier had
            features = F.relu(features)
        feats = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)  # any image size
        if self.concat_cell_type:
            if cell_onehot is None or cell_onehot.shape != (x.shape[0], self.n_cell_types):
                got = None if cell_onehot is None else tuple(cell_onehot.shape)
                raise ValueError(f"cell_onehot must be [{x.shape[0]}, {self.n_cell_types}], got {got}")
            feats = torch.cat([feats, cell_onehot.to(feats.dtype)], dim=1)
        return self.neck(feats)

    def forward(self, x: Tensor, cell_onehot: Tensor | None = None) -> dict[str, Tensor]:
        embedding = self.embed(x, cell_onehot)
        out = {"embedding": embedding, "logits": self.head(embedding)}
        if self.arc_head is not None:
            out["cosine"] = self.arc_head(embedding)
        return out


def dense_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -(target * log_softmax(logits)).sum(1), in float32 even under autocast."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return -(target.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def arcface_loss(
    cosine: Tensor, target: Tensor, scale: float = 30.0, margin: float = 0.5, eps: float = 1e-6
) -> Tensor:
    """Additive angular margin loss on dense targets.

    Per class j: logit_j = s * (t_j * phi(cos θ_j) + (1 - t_j) * cos θ_j), then dense CE with t.
    For a one-hot t this is standard ArcFace (s·cos(θ_y + m) for the label, s·cos θ_j elsewhere);
    soft targets get a margin in proportion to their weight. phi(cos θ) = cos(θ + m) while θ + m <= π;
    beyond (cos θ <= cos(π - m)) cos(θ + m) would rise again, so phi = cos θ - m·sin(m) there
    (InsightFace's linear continuation, also used by the 1st place). cos is clamped to
    [-1+eps, 1-eps] so sin θ = sqrt(1 - cos²) has a finite gradient.
    """
    with torch.autocast(device_type=cosine.device.type, enabled=False):
        cos = cosine.float().clamp(-1.0 + eps, 1.0 - eps)
        target = target.float()
        sin = torch.sqrt(1.0 - cos * cos)
        phi = cos * math.cos(margin) - sin * math.sin(margin)
        phi = torch.where(cos > math.cos(math.pi - margin), phi, cos - margin * math.sin(margin))
        return dense_cross_entropy(scale * (target * phi + (1.0 - target) * cos), target)


def combined_loss(
    out: Mapping[str, Tensor],
    target: Tensor,
    metric_loss_coeff: float = 0.2,
    scale: float = 30.0,
    margin: float = 0.5,
    arcface_factor: float = 0.5,
) -> Tensor:
    """(1-c)·CE(out['logits']) + c·arcface_factor·ArcFace(out['cosine']), c = metric_loss_coeff.

    arcface_factor=0.5 reproduces the 1st place, whose ArcFace loss returned loss / 2;
    pass 1.0 for the plain weighted sum.
    """
    ce = dense_cross_entropy(out["logits"], target)
    arc = arcface_loss(out["cosine"], target, scale, margin)
    return (1.0 - metric_loss_coeff) * ce + metric_loss_coeff * arcface_factor * arc


def bce_with_logits(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy with logits, mean over batch and classes, in float32 under autocast:
    the 41st place's loss (torch's BCEWithLogitsLoss on one-hot targets)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())


LOSSES = ("ce", "bce")


def training_loss(out: Mapping[str, Tensor], target: Tensor, loss: str = "ce", metric_loss_coeff: float = 0.2,
                  classes: Tensor | None = None) -> Tensor:
    """The training objective: `combined_loss` ("ce", (1-c)·CE + c·ArcFace) or (1-c)·BCE + c·ArcFace
    ("bce"; c must be 0 without an ArcFace head). `classes` (indices) restricts logits, cosines and
    targets to those classes, e.g. the treatment classes as the 41st place's 1,108 outputs."""
    if classes is not None:
        out = {k: v[:, classes] if k in ("logits", "cosine") else v for k, v in out.items()}
        target = target[:, classes]
    if loss == "ce":  # without ArcFace (c = 0) the same value, and no cosines needed
        return combined_loss(out, target, metric_loss_coeff) if metric_loss_coeff else dense_cross_entropy(
            out["logits"], target)
    if loss != "bce":
        raise ValueError(f"unknown loss {loss!r} (choose from {', '.join(LOSSES)})")
    main = bce_with_logits(out["logits"], target)
    if metric_loss_coeff == 0:
        return main
    return (1.0 - metric_loss_coeff) * main + metric_loss_coeff * 0.5 * arcface_loss(out["cosine"], target)


def smooth_labels(labels: Tensor, n_classes: int, smoothing: float = 0.0) -> Tensor:
    """Dense targets [B, n_classes]: 1-smoothing on the label, smoothing/(n_classes-1) elsewhere."""
    if not 0.0 <= smoothing < 1.0 or n_classes < 2:
        raise ValueError(f"need 0 <= smoothing < 1 and n_classes >= 2, got {smoothing}, {n_classes}")
    target = torch.full((labels.shape[0], n_classes), smoothing / (n_classes - 1), device=labels.device)
    return target.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing)
