"""The CIFAR-10 ResNets of He et al. 2016 (§4.2), with the checkpoint names of the public
``pytorch_resnet_cifar10`` weights (Yerlan Idelbayev, BSD-2-Clause), so that real pretrained
weights load with ``--weights FILE.safetensors``.

Architecture: 6n+2 layers: a 3×3 stem conv 3→16 (``conv1``, ``bn1``), three stages
``layer1..3`` of n basic blocks (conv3×3-BN-ReLU-conv3×3-BN, + shortcut, ReLU) at 16, 32 and
64 channels, stride 2 in the first block of stages 2 and 3 with the parameter-free "option A"
shortcut (every other pixel, zero-padded channels), global average pooling and ``linear``
64→10. Inputs 32×32, normalised with ImageNet's mean/std (the weights were trained so).

Registered with timm: ``cifar_resnet20`` (269,722 parameters), ``cifar_resnet32`` (464,154),
``cifar_resnet44`` (658,586), ``cifar_resnet56`` (853,018), ``cifar_resnet110`` (1,727,962).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from symconvert.models.wrn import cifar10_cfg

__all__ = ["HeBlock", "HeCifarResNet"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HeBlock(nn.Module):
    """conv3×3(stride)-BN-ReLU-conv3×3-BN, + the option-A shortcut, ReLU."""

    def __init__(self, in_chs: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_chs) // 2 if (stride != 1 or in_chs != planes) else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.pad is not None:
            short = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class HeCifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2), timm head API (``linear`` is the classifier)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3,
                 **_: Any) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes, self.num_features = num_classes, 64
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        chs = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(HeBlock(chs, planes, 2 if (i > 0 and j == 0) else 1))
                chs = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.linear = nn.Linear(64, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


DEPTHS = {"cifar_resnet20": 20, "cifar_resnet32": 32, "cifar_resnet44": 44,
          "cifar_resnet56": 56, "cifar_resnet110": 110}

default_cfgs = generate_default_cfgs({
    name: cifar10_cfg("conv1", mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier="linear",
                      license="bsd-2-clause")
    for name in DEPTHS})


def _create(name: str, pretrained: bool, **kwargs: Any) -> HeCifarResNet:
    return build_model_with_cfg(HeCifarResNet, name, pretrained, depth=DEPTHS[name], **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> HeCifarResNet:
    """He et al.'s CIFAR ResNet-20: 269,722 parameters."""
    return _create("cifar_resnet20", pretrained, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> HeCifarResNet:
    """He et al.'s CIFAR ResNet-32: 464,154 parameters."""
    return _create("cifar_resnet32", pretrained, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs: Any) -> HeCifarResNet:
    """He et al.'s CIFAR ResNet-44: 658,586 parameters."""
    return _create("cifar_resnet44", pretrained, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs: Any) -> HeCifarResNet:
    """He et al.'s CIFAR ResNet-56: 853,018 parameters."""
    return _create("cifar_resnet56", pretrained, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs: Any) -> HeCifarResNet:
    """He et al.'s CIFAR ResNet-110: 1,727,962 parameters."""
    return _create("cifar_resnet110", pretrained, **kwargs)
