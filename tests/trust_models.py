"""Small models for the trust/robustness tests, reachable as `py:trust_models:<function>`."""

from __future__ import annotations

import torch
from torch import nn


class TinyTransformer(nn.Module):
    """Linear in -> nn.TransformerEncoder (MultiheadAttention with a fused in_proj) -> head."""

    def __init__(self, num_classes: int = 4, d_model: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=32,
                                           dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 8]
        return self.head(self.encoder(self.embed(x)).mean(1))


def tiny_transformer(num_classes: int = 4) -> nn.Module:
    return TinyTransformer(num_classes)


class KVAttention(nn.Module):
    """MultiheadAttention with kdim/vdim != embed_dim: separate q/k/v_proj_weight."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=16, vdim=8, batch_first=True)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 8]
        keys = torch.cat([x, x.flip(-1)], dim=-1)
        out, _ = self.attn(x, keys, x, need_weights=False)
        return self.head(out.mean(1))


def kv_attention(num_classes: int = 3) -> nn.Module:
    return KVAttention(num_classes)


class BNNet(nn.Module):
    """Conv + BatchNorm: its state dict has num_batches_tracked buffers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def bn_net(num_classes: int = 10) -> nn.Module:
    return BNNet(num_classes)
