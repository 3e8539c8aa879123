"""Pretrained Fashion-MNIST test models shipped with symconvert (besides ``quickstart_digits``).

Both are trained by ``scripts/train_test_models.py`` on the Fashion-MNIST train split
(28x28 grey, normalised with the train-set mean/std) and load offline from
``symconvert/assets/`` with ``pretrained=True``:

* ``fashion_resnet``: ``CifarResNet`` widths (32, 32, 32), two basic blocks per stage,
  1 input channel: every 3x3 conv in the blocks is square (``channel``, ``quarter``, ...).
* ``fashion_vit``: a small ViT built from ``nn.TransformerEncoder`` (4x4 patches -> 49
  tokens, dim 64, 4 pre-norm layers, 4 heads, MLP 128, mean-pooled tokens). Its attention
  ``out_proj`` (64x64, ``channel``) is called functionally by ``nn.MultiheadAttention`` and
  its MLP linears (128x64, 64x128) suit ``block``: the case calibration must get right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from symconvert.models.cifar_resnet import CifarResNet
from symconvert.models.wrn import LinearHeadMixin

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
FASHION_MEAN = (0.2860,)
FASHION_STD = (0.3530,)

RESNET_ARGS: dict[str, Any] = {"widths": (32, 32, 32), "depths": (2, 2, 2), "in_chans": 1,
                               "num_classes": 10}
VIT_ARGS: dict[str, Any] = {"dim": 64, "depth": 4, "heads": 4, "mlp": 128, "patch": 4,
                            "img_size": 28, "in_chans": 1, "num_classes": 10}


class TinyViT(LinearHeadMixin, nn.Module):
    """Conv patch embedding + learned positions -> nn.TransformerEncoder -> mean pool -> fc."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128,
                 patch: int = 4, img_size: int = 28, in_chans: int = 1, num_classes: int = 10,
                 drop_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.head_hidden_size = dim
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        tokens = (img_size // patch) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=drop_rate, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.norm(self.encoder(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(1)
        return x if pre_logits else self.fc(x)


def _cfg(name: str, **kwargs: Any) -> dict[str, Any]:
    return {"num_classes": 10, "input_size": (1, 28, 28), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": FASHION_MEAN, "std": FASHION_STD,
            "classifier": "fc", "license": "mit", "file": str(ASSETS_DIR / f"{name}.safetensors"),
            "description": f"{name} trained on Fashion-MNIST (scripts/train_test_models.py)",
            **kwargs}


default_cfgs = generate_default_cfgs({
    "fashion_resnet": _cfg("fashion_resnet", first_conv="stem.conv"),
    "fashion_vit": _cfg("fashion_vit", first_conv="patch_embed"),
})


@register_model
def fashion_resnet(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CifarResNet (32, 32, 32) x (2, 2, 2) for 1x28x28 Fashion-MNIST."""
    return build_model_with_cfg(CifarResNet, "fashion_resnet", pretrained, **dict(RESNET_ARGS, **kwargs))


@register_model
def fashion_vit(pretrained: bool = False, **kwargs: Any) -> TinyViT:
    """TinyViT (dim 64, 4 layers, nn.TransformerEncoder) for 1x28x28 Fashion-MNIST."""
    return build_model_with_cfg(TinyViT, "fashion_vit", pretrained, **dict(VIT_ARGS, **kwargs))
