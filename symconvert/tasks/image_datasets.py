"""Image datasets as tensors: ``ImageTensors`` (a whole data set in memory, transformed a
batch at a time with tensor ops: resize, channels, normalisation, seeded crop/flip) and
``TransformedFolder`` (``imagefolder:ROOT`` read with PIL). Every random draw is a function
of (seed, epoch, index), so resumed runs see the same batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from symconvert.errors import DataError
from symconvert.tasks.data import ImageConfig, mix, seeded_rng

# ITU-R 601 luma: how an RGB dataset becomes one channel for a grey model.
_LUMA = (0.299, 0.587, 0.114)

# --------------------------------------------------------------- in-memory images


class ImageTensors(Dataset):
    """Images held as one ``N×C×H×W`` tensor (uint8 0..255 or float 0..1) plus labels."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if images.ndim == 3:
            images = images.unsqueeze(1)
        self.images, self.targets = images, targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: np.ndarray | None) -> ImageTensors:
        if indices is None:
            return self
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensors(self.images[idx], self.targets[idx])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


@dataclass
class TensorTransform:
    """Batched tensor pipeline: [0,1] → channels → crop/flip (train) → resize → normalise."""

    config: ImageConfig
    augment: bool = False
    flip: bool = False
    pad: int = 0  # random-crop padding, in source pixels

    def __call__(self, images: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        x = convert_channels(x, self.config.in_chans)
        if self.augment and seeds is not None:
            x = self._augment(x, seeds)
        if tuple(x.shape[-2:]) != tuple(self.config.size):
            down = x.shape[-2] > self.config.size[0] or x.shape[-1] > self.config.size[1]
            mode = "bicubic" if self.config.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=self.config.size, mode=mode, align_corners=False,
                              antialias=down)
        mean = torch.tensor(self.config.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.config.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def _augment(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p), mode="constant", value=0.0) if p else x
        out = torch.empty_like(x)
        for i, seed in enumerate(seeds):
            gen = torch.Generator().manual_seed(seed)
            r = torch.randint(0, 2 * p + 1, (3,), generator=gen).tolist() if p else [0, 0, 0]
            crop = padded[i, :, r[0]:r[0] + h, r[1]:r[1] + w]
            if self.flip and bool(torch.rand((), generator=gen) < 0.5):
                crop = crop.flip(-1)
            out[i] = crop
        return out


def convert_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    c = x.shape[1]
    if c == in_chans:
        return x
    if c == 1:
        return x.expand(-1, in_chans, -1, -1)
    if c == 3 and in_chans == 1:
        return (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    raise DataError(f"the data has {c}-channel images but the model takes {in_chans} channels; "
                    "only grey→N and RGB→grey conversions are automatic.")


class TransformedTensors(Dataset):
    """``ImageTensors`` seen through a ``TensorTransform``; fetched a batch at a time."""

    def __init__(self, base: ImageTensors, transform: TensorTransform, seed: int = 0) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    @property
    def targets(self) -> torch.Tensor:
        return self.base.targets

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        # DataLoader calls this with a whole batch of indices: one vectorised transform.
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        seeds = [mix(self.seed, self.epoch, int(i)) for i in indices] \
            if self.transform.augment else None
        x = self.transform(self.base.images[idx], seeds)
        return list(zip(x.unbind(0), self.base.targets[idx].tolist(), strict=True))


# ------------------------------------------------------------------ image folders


class TransformedFolder(Dataset):
    """A torchvision ``ImageFolder`` with a per-image timm transform seeded by (epoch, index)."""

    def __init__(self, folder: Any, indices: np.ndarray | None, transform: Callable,
                 in_chans: int, seed: int = 0, random: bool = False) -> None:
        self.folder, self.transform, self.in_chans = folder, transform, in_chans
        self.indices = np.arange(len(folder.samples)) if indices is None else indices
        self.seed, self.epoch, self.random = seed, 0, random

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.folder.targets)[self.indices]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.folder.samples[int(self.indices[index])]
        try:
            with open(path, "rb") as fh:
                image = Image.open(fh)
                image = image.convert("L" if self.in_chans == 1 else "RGB")
        except Image.DecompressionBombError as exc:  # a header claiming ~10⁹ pixels
            raise DataError(f"imagefolder: image {path} is too large to decode ({exc}); it is "
                            "damaged or hostile. Remove it from the folder, or shrink it "
                            "if it is a real image.") from None
        except OSError as exc:
            raise DataError(f"imagefolder: cannot read image {path}: {exc}") from exc
        if self.random:
            with seeded_rng(mix(self.seed, self.epoch, int(index))):
                x = self.transform(image)
        else:
            x = self.transform(image)
        if x.shape[0] != self.in_chans:
            x = convert_channels(x.unsqueeze(0), self.in_chans).squeeze(0)
        return x, int(target)


# ------------------------------------------------------------------------ sources


__all__ = ["ImageTensors", "TensorTransform", "TransformedFolder", "TransformedTensors",
           "convert_channels"]
