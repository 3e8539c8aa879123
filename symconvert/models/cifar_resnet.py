"""A small CIFAR-style ResNet whose parameters sit almost all in square 3x3 convolutions.

Architecture: stem conv3x3(in_chans -> w0)-BN-ReLU -> stages of post-activation basic blocks
(conv3x3(stride)-BN-ReLU-conv3x3-BN, + shortcut, ReLU; the first block of every stage but the
first has stride 2, with a 1x1 conv + BN shortcut when the shape changes) -> global average
pool -> [dropout] -> fc. With equal stage widths every 3x3 conv in the blocks is square
(out == in), so ``channel`` symmetry, which keeps (n+1)/2n of a square conv, removes ~45 % of
the whole model.

Registered with timm:
* ``resnet_cifar_tiny``: widths (32, 32, 32), one block per stage: 59,114 parameters for
  3 input channels and 10 classes (58,538 for 1 channel), 93.5 % (94.5 %) of them in square
  3x3 convs.
* ``resnet_cifar_small``: widths (64, 64, 64), two blocks per stage: 454,858 parameters.
* ``quickstart_digits``: ``resnet_cifar_tiny`` for 1-channel 8x8 digits with the weights
  shipped in ``symconvert/assets/quickstart_digits.safetensors`` (trained by
  ``scripts/train_quickstart_model.py``); ``timm.create_model("quickstart_digits",
  pretrained=True)`` loads them from the package, offline.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from symconvert.models.wrn import LinearHeadMixin, cifar10_cfg, init_weights

__all__ = [
    "CifarResNet",
    "BasicBlock",
    "QUICKSTART_WEIGHTS",
    "QUICKSTART_METADATA",
    "QUICKSTART_MODEL_ARGS",
    "DIGITS_MEAN",
    "DIGITS_STD",
]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
QUICKSTART_WEIGHTS = ASSETS_DIR / "quickstart_digits.safetensors"
QUICKSTART_METADATA = ASSETS_DIR / "quickstart_digits.json"

# Mean / std over all pixels of the 1437 training images of scikit-learn's digits (fixed
# stratified split, seed 0), with pixel values 0..16 scaled to [0, 1]. Checked in the tests.
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3761,)

TINY_ARGS: dict[str, Any] = {"widths": (32, 32, 32), "depths": (1, 1, 1)}
SMALL_ARGS: dict[str, Any] = {"widths": (64, 64, 64), "depths": (2, 2, 2)}
# The quickstart classifier: resnet_cifar_tiny for 1-channel digits.
QUICKSTART_MODEL_ARGS: dict[str, Any] = {**TINY_ARGS, "in_chans": 1, "num_classes": 10}
QUICKSTART_INPUT_SIZE = (1, 8, 8)


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            # A 1x1 projection costs 1/9 of a 3x3 conv of the same width.
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_chs),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.act(y + self.shortcut(x))


class CifarResNet(LinearHeadMixin, nn.Module):
    """stem conv3x3-BN-ReLU -> stages of basic blocks (stride 2 after the first) -> pool -> fc."""

    def __init__(
        self,
        widths: Sequence[int] = (32, 32, 32),
        depths: Sequence[int] = (1, 1, 1),
        in_chans: int = 3,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        widths, depths = tuple(int(w) for w in widths), tuple(int(d) for d in depths)
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths {widths} and depths {depths} must be non-empty, same length")
        if global_pool != "avg":
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        self.widths, self.depths = widths, depths
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = widths[-1]

        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(widths[0]),
                act=nn.ReLU(inplace=True),
            )
        )
        stages = []
        in_chs = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [
                BasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1)
                for j in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map of the last stage, NCHW."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, dropout and (unless ``pre_logits``) the fc layer."""
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return cifar10_cfg("stem.conv", **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "resnet_cifar_tiny": _cfg(),
        "resnet_cifar_small": _cfg(),
        # timm's load_pretrained reads pretrained_cfg["file"] before any url/hub source, so
        # pretrained=True loads the packaged safetensors with no network access.
        "quickstart_digits": _cfg(
            file=str(QUICKSTART_WEIGHTS),
            input_size=QUICKSTART_INPUT_SIZE,
            pool_size=(2, 2),
            mean=DIGITS_MEAN,
            std=DIGITS_STD,
            license="mit",
            description="resnet_cifar_tiny trained on scikit-learn's 8x8 digits "
            "(scripts/train_quickstart_model.py)",
        ),
    }
)


def _create(
    variant: str, pretrained: bool, model_args: dict[str, Any], **kwargs: Any
) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, **dict(model_args, **kwargs))


@register_model
def resnet_cifar_tiny(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Widths (32, 32, 32), one basic block per stage: 59,114 parameters for 3x32x32 -> 10."""
    return _create("resnet_cifar_tiny", pretrained, TINY_ARGS, **kwargs)


@register_model
def resnet_cifar_small(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """Widths (64, 64, 64), two basic blocks per stage: 454,858 parameters for 3x32x32 -> 10."""
    return _create("resnet_cifar_small", pretrained, SMALL_ARGS, **kwargs)


@register_model
def quickstart_digits(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """``resnet_cifar_tiny`` for 1x8x8 digits; ``pretrained=True`` loads the packaged weights."""
    return _create("quickstart_digits", pretrained, TINY_ARGS, **kwargs)
