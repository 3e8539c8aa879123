"""Wide residual networks for CIFAR, as in the symmetry paper's code.

Architecture (Zagoruyko & Komodakis 2016, "Wide Residual Networks", and the CIFAR code of
Hu, Zagoruyko & Komodakis 2019, github.com/hushell/deep-symmetry ``symmWideResNet/models``):

    stem conv3x3(in_chans -> 16) -> 3 groups of n blocks at widths 16k, 32k, 64k
    (stride 1, 2, 2) -> BN -> ReLU -> global average pool -> fc,   depth = 6n + 4.

* ``basic`` block (``resnet_basic.py``), pre-activation:
  x -> BN-ReLU -> conv3x3(stride) -> BN-ReLU -> [dropout] -> conv3x3 -> + shortcut(x),
  where the shortcut is a 1x1 conv (on the pre-activated input) when the shape changes.
  Every 3x3 conv is square (out == in) except the first conv of each group's first block.
* ``bottleneck`` block (``resnet_bottleneck.py``), pre-activation, mid = width / 4:
  x -> BN-ReLU -> conv1x1(in -> mid) -> BN-ReLU -> conv3x3(mid -> mid, stride) -> BN-ReLU
  -> [dropout] -> conv1x1(mid -> width) -> + shortcut(x). Every 3x3 conv is square, which is
  the one the paper symmetrises. As in the paper's code, ``depth`` still only sets
  n = (depth - 4) / 6 blocks per group (so the real number of layers is 9n + 4).

Convolutions have no bias; BN is affine; the head is ``fc`` (Linear with bias).
WRN-28-10 for CIFAR-10 has 36,479,194 parameters (the published "36.5M").
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


class LinearHeadMixin:
    """timm's head API for a model whose classifier is ``self.fc`` after global avg pooling."""

    def get_classifier(self) -> nn.Module:
        """The classification head (timm API)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh ``num_classes`` Linear (timm semantics; 0 removes it)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


__all__ = ["WideResNet", "WideBasicBlock", "WideBottleneckBlock", "CIFAR10_MEAN", "CIFAR10_STD",
           "cifar10_cfg", "init_weights"]

# The paper's code normalises with the CIFAR-10 training-set channel statistics
# (125.3, 123.0, 113.9) / 255 and (63.0, 62.1, 66.7) / 255.
CIFAR10_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _projection(in_chs: int, out_chs: int, stride: int) -> nn.Conv2d | None:
    """The 1x1 projection shortcut of a block whose shape changes (None: identity)."""
    if in_chs != out_chs or stride != 1:
        return nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
    return None


def init_weights(model: nn.Module, zero_linear_bias: bool = False) -> None:
    """Kaiming-normal (fan out) convolutions, BatchNorm weight 1 and bias 0, and with
    ``zero_linear_bias`` zero Linear biases: the CIFAR ResNets' initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif zero_linear_bias and isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class _PreActBlock(nn.Module):
    """A pre-activation block: BN-ReLU of the input (``bn1``, ``act``), the block's
    ``residual`` of it, plus the shortcut."""

    bn1: nn.BatchNorm2d
    act: nn.Module
    shortcut: nn.Module | None

    def residual(self, o: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act(self.bn1(x))
        # The projection shortcut reads the pre-activated input, as in the WRN code.
        shortcut = x if self.shortcut is None else self.shortcut(o)
        return self.residual(o) + shortcut


class WideBasicBlock(_PreActBlock):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride) -> BN-ReLU-[dropout]-conv3x3, + shortcut."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.shortcut = _projection(in_chs, out_chs, stride)
        self.act = nn.ReLU(inplace=True)

    def residual(self, o: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.drop(self.act(self.bn2(self.conv1(o)))))


class WideBottleneckBlock(_PreActBlock):
    """Pre-activation bottleneck: conv1x1(in->w/4) -> conv3x3(w/4->w/4, stride) -> conv1x1(w/4->w)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        if out_chs % 4:
            raise ValueError(f"bottleneck width must be a multiple of 4, got {out_chs}")
        mid = out_chs // 4
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv3 = nn.Conv2d(mid, out_chs, 1, bias=False)
        self.shortcut = _projection(in_chs, out_chs, stride)
        self.act = nn.ReLU(inplace=True)

    def residual(self, o: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act(self.bn2(self.conv1(o))))
        return self.conv3(self.drop(self.act(self.bn3(y))))


_BLOCKS: dict[str, type[nn.Module]] = {"basic": WideBasicBlock, "bottleneck": WideBottleneckBlock}


class WideResNet(LinearHeadMixin, nn.Module):
    """WRN-depth-k for CIFAR: stem conv3x3 -> 3 groups (16k, 32k, 64k) -> BN-ReLU -> pool -> fc."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        block: str = "basic",
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        stem_width: int = 16,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        if global_pool != "avg":
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        block_cls = _BLOCKS[block]

        self.depth = depth
        self.widen_factor = widen_factor
        self.block = block
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = widths[-1]

        self.stem = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        groups = []
        in_chs = stem_width
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [
                block_cls(in_chs if j == 0 else width, width, stride if j == 0 else 1, drop_rate)
                for j in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
            in_chs = width
        self.groups = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.act = nn.ReLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self, zero_linear_bias=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before the final BN-ReLU-pool, NCHW."""
        return self.groups(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final BN-ReLU, global average pool, and (unless ``pre_logits``) the fc layer."""
        x = self.global_pool(self.act(self.bn(x))).flatten(1)
        return x if pre_logits else self.fc(x)


def cifar10_cfg(first_conv: str, **kwargs: Any) -> dict[str, Any]:
    """timm's pretrained config of a CIFAR-10 model here (3x32x32, CIFAR-10 statistics, head
    ``fc``); ``kwargs`` add or override keys."""
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": first_conv,
        "classifier": "fc",
        **kwargs,
    }


_PAPER = {"paper_ids": "arXiv:1605.07146", "origin_url": "https://github.com/hushell/deep-symmetry"}
_BOTTLENECK_PAPER = {**_PAPER, "paper_ids": "arXiv:1812.11027"}

# The registered variants: name -> (docstring, WideResNet arguments, config keys). No weights
# are shipped (no url/file): these are architectures to train or to load --weights into.
_VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "wrn_16_4": ("WRN-16-4 (basic blocks, n=2), 2.75 M parameters for CIFAR-10.",
                 {"depth": 16, "widen_factor": 4}, _PAPER),
    "wrn_16_8": ("WRN-16-8 (basic blocks, n=2), 11.0 M parameters for CIFAR-10.",
                 {"depth": 16, "widen_factor": 8}, _PAPER),
    "wrn_28_10": ("WRN-28-10 (basic blocks, n=4), 36,479,194 parameters for CIFAR-10 "
                  "(published: 36.5 M).", {"depth": 28, "widen_factor": 10}, _PAPER),
    "wrn_40_4": ("WRN-40-4 (basic blocks, n=6), 8.9 M parameters for CIFAR-10.",
                 {"depth": 40, "widen_factor": 4}, _PAPER),
    "wrn_bottleneck_16_4": (
        "The paper code's bottleneck WRN exactly as its README trains it (--depth 16 --width 4).",
        {"depth": 16, "widen_factor": 4, "block": "bottleneck"}, _BOTTLENECK_PAPER),
    "wrn_bottleneck_28_10": (
        "The paper code's bottleneck WRN at the WRN-28-10 setting (n=4 blocks/group, widths x10).",
        {"depth": 28, "widen_factor": 10, "block": "bottleneck"}, _BOTTLENECK_PAPER),
}

default_cfgs = generate_default_cfgs(
    {name: cifar10_cfg("stem", **cfg) for name, (_, _, cfg) in _VARIANTS.items()})


def _register(variant: str, doc: str, args: dict[str, Any]) -> Any:
    """``timm.create_model(variant)``: a WideResNet of ``args`` (keywords override them)."""

    def factory(pretrained: bool = False, **kwargs: Any) -> WideResNet:
        return build_model_with_cfg(WideResNet, variant, pretrained, **dict(args, **kwargs))

    factory.__name__ = factory.__qualname__ = variant
    factory.__doc__ = doc
    return register_model(factory)


# wrn_16_4, wrn_16_8, wrn_28_10, wrn_40_4, wrn_bottleneck_16_4, wrn_bottleneck_28_10
for _name, (_doc, _args, _) in _VARIANTS.items():
    globals()[_name] = _register(_name, _doc, _args)
