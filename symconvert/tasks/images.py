"""The image data sources: in-memory datasets (digits, (fashion-)MNIST, CIFAR) held as one
tensor and transformed a batch at a time with tensor ops, and ``imagefolder:ROOT`` read with
PIL. Each registers itself with ``symconvert.tasks.data``'s registry; ``symconvert.tasks.data``
imports this module, so the sources are registered wherever data is used."""

from __future__ import annotations

import contextlib
import gzip
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset

from symconvert.errors import DataError, SymconvertWarning
from symconvert.models.sources import looks_offline
from symconvert.tasks.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DEFAULT_ROOT,
    DataSource,
    DataSpec,
    ImageConfig,
    LoaderOptions,
    Loaders,
    ShardedSampler,
    Splits,
    mix,
    register_data_source,
    resolve_image_config,
    stratified_subset,
)
from symconvert.tasks.image_datasets import (
    ImageTensors,
    TensorTransform,
    TransformedFolder,
    TransformedTensors,
)


class ImageSource(DataSource):
    """A classification source whose splits are datasets of images."""

    #: Random crop/flip for training when the user does not say: off for every source (in a
    #: short distilled recovery fine-tune it costs accuracy; README, "Fine-tuning a converted
    #: model"); --augment turns it on.
    default_augment: ClassVar[bool] = False
    flip_ok: ClassVar[bool] = True
    native_size: ClassVar[tuple[int, int] | None] = None
    native_chans: ClassVar[int] = 3

    def splits(self, root: Path | None, download: bool) -> Splits:
        raise NotImplementedError

    def loaders(self, spec: DataSpec, model: nn.Module | None, options: LoaderOptions) -> Loaders:
        splits = self.splits(spec.root, options.download)
        config = resolve_image_config(model, options.input_size, self.native_size,
                                      self.native_chans)
        augment = self.default_augment if options.augment is None else options.augment
        train_ds, eval_ds = self._transformed(splits, config, augment, options)
        eval_bs = options.eval_batch_size or max(options.batch_size, 64)
        eval_loader = DataLoader(
            eval_ds, batch_size=eval_bs, num_workers=options.workers,
            sampler=ShardedSampler(len(eval_ds), shuffle=False, rank=options.rank,
                                   world_size=options.world_size, drop_last=False),
            pin_memory=options.pin_memory, persistent_workers=False,
            # An own generator: iterating never draws from the global RNG, which the
            # training loop checkpoints and must find unchanged on resume.
            generator=torch.Generator().manual_seed(0),
        )
        train_loader = None
        if options.train:
            train_loader = DataLoader(
                train_ds, batch_size=_train_batch(spec, len(train_ds), options),
                num_workers=options.workers,
                sampler=ShardedSampler(len(train_ds), shuffle=True, seed=options.seed,
                                       rank=options.rank, world_size=options.world_size),
                drop_last=True, pin_memory=options.pin_memory,
                persistent_workers=False,  # workers must see set_epoch() each epoch
                generator=torch.Generator().manual_seed(mix(options.seed, 0, 0x10AD)),
            )
        return Loaders(spec=spec, train=train_loader, eval=eval_loader,
                       num_classes=splits.num_classes, eval_split=splits.eval_split,
                       image_config=config, classes=splits.classes,
                       n_train=len(train_ds), n_eval=len(eval_ds))

    def _transformed(self, splits: Splits, config: ImageConfig, augment: bool,
                     options: LoaderOptions) -> tuple[Dataset, Dataset]:
        train, test = splits.train, splits.eval
        if not isinstance(train, ImageTensors) or not isinstance(test, ImageTensors):
            raise NotImplementedError("override _transformed for non-tensor splits")
        train = train.subset(stratified_subset(train.targets.numpy(), options.subsample,
                                               options.seed))
        # The eval subset does not depend on --seed: the same n images for every run.
        test = test.subset(stratified_subset(test.targets.numpy(), options.subsample, 0))
        pad = max(1, round(min(train.images.shape[-2:]) / 8)) if augment else 0
        train_tf = TensorTransform(config, augment=augment, flip=augment and self.flip_ok, pad=pad)
        return (TransformedTensors(train, train_tf, options.seed),
                TransformedTensors(test, TensorTransform(config)))


def _train_batch(spec: DataSpec, n: int, options: LoaderOptions) -> int:
    """The train batch: ``options.batch_size``; a train split smaller than one batch (on
    every process) is used whole, as one smaller batch, with a warning (calibration on 3 or
    12 images is asked for; a model fitted to so few over-fits them)."""
    world = options.world_size
    if n >= options.batch_size * world:
        return options.batch_size
    if n < world:
        raise DataError(f"{spec.text}: the train split has {n} items, fewer than the {world} "
                        "processes that would share it; add data or run fewer processes.")
    batch = n // world
    per = f" per process ({world} processes)" if world > 1 else ""
    warnings.warn(
        f"{spec.text}: the train split has only {n} items, fewer than one batch of "
        f"{options.batch_size}{per}; they are used as one batch of {batch}. A model "
        "calibrated or fine-tuned on so few examples over-fits them: use more data where you "
        "can.", SymconvertWarning, stacklevel=3)
    return batch


@register_data_source
class DigitsSource(ImageSource):
    """scikit-learn's bundled 8×8 digits: 1437 train / 360 test, stratified with seed 0."""

    name = "digits"
    layout = "none (bundled with scikit-learn)"
    needs_root = False
    native_size = (8, 8)
    native_chans = 1
    flip_ok = False  # a mirrored 2 is not a 2
    example = "--data digits"

    def splits(self, root: Path | None, download: bool) -> Splits:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        images = bunch.images.astype(np.float32) / 16.0  # 0..16 grey levels → [0, 1]
        tr_x, te_x, tr_y, te_y = train_test_split(images, bunch.target, test_size=360,
                                                  stratify=bunch.target, random_state=0)
        return Splits(
            train=ImageTensors(torch.from_numpy(tr_x), torch.from_numpy(tr_y)),
            eval=ImageTensors(torch.from_numpy(te_x), torch.from_numpy(te_y)),
            num_classes=10, classes=[str(i) for i in range(10)],
        )


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_CACHE: dict[tuple[str, float, int], np.ndarray] = {}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzipped or not, as a numpy array; cached per file."""
    stat = path.stat()
    key = (str(path), stat.st_mtime, stat.st_size)
    if key in _IDX_CACHE:
        return _IDX_CACHE[key]
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        magic = int.from_bytes(data[0:4], "big")
        if magic >> 8 != 0x08 or not 1 <= magic & 0xFF <= 4:  # unsigned-byte tensors only
            raise ValueError(f"bad magic number {magic:#x}")
        ndim = magic & 0xFF
        shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        offset = 4 + 4 * ndim
        array = np.frombuffer(data, dtype=np.uint8, count=int(np.prod(shape)), offset=offset)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}. It should be an MNIST-format "
                        "idx file (optionally gzipped); re-download it.") from exc
    array = array.reshape(shape)
    _IDX_CACHE[key] = array
    return array


class IdxSource(ImageSource):
    """MNIST-format idx files (gzipped or not) in ROOT, ROOT/raw or torchvision's ROOT/<Cls>/raw."""

    native_size = (28, 28)
    native_chans = 1
    flip_ok = False
    torchvision_class: ClassVar[str] = "MNIST"
    classes: ClassVar[Sequence[str]] = tuple(str(i) for i in range(10))

    @property
    def layout(self) -> str:  # type: ignore[override]
        return ("ROOT/{train-images-idx3-ubyte,train-labels-idx1-ubyte,t10k-images-idx3-ubyte,"
                "t10k-labels-idx1-ubyte}[.gz] (also accepted under ROOT/raw/ or torchvision's "
                f"ROOT/{self.torchvision_class}/raw/)")

    def _find(self, root: Path, stem: str) -> Path | None:
        for folder in (root, root / "raw", root / self.torchvision_class / "raw"):
            for name in (stem + ".gz", stem):
                if (folder / name).is_file():
                    return folder / name
        return None

    def splits(self, root: Path | None, download: bool) -> Splits:
        assert root is not None
        if download:
            import torchvision.datasets as tvd

            with _fetching(self, root):
                getattr(tvd, self.torchvision_class)(str(root), train=True, download=True)
                getattr(tvd, self.torchvision_class)(str(root), train=False, download=True)
        if not root.is_dir():
            raise self.missing(root, "no such directory")
        arrays = {}
        for split, stems in _IDX_FILES.items():
            for stem, kind in zip(stems, ("images", "labels"), strict=True):
                path = self._find(root, stem)
                if path is None:
                    raise self.missing(root, f"{stem}[.gz] not found")
                arrays[split, kind] = read_idx(path)
        data = {}
        for split in _IDX_FILES:
            images, labels = arrays[split, "images"], arrays[split, "labels"]
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise self.missing(root, f"{split} images {images.shape} and labels "
                                   f"{labels.shape} do not match")
            data[split] = ImageTensors(torch.from_numpy(images.copy()),
                                       torch.from_numpy(labels.astype(np.int64)))
        num_classes = int(max(data["train"].targets.max(), data["test"].targets.max())) + 1
        return Splits(train=data["train"], eval=data["test"], num_classes=num_classes,
                      classes=list(self.classes)[:num_classes])


@register_data_source
class FashionMnistSource(IdxSource):
    name = "fashion-mnist"
    default_root = FASHION_MNIST_DEFAULT_ROOT
    torchvision_class = "FashionMNIST"
    classes = FASHION_MNIST_CLASSES
    example = "--data fashion-mnist (Debian package dataset-fashion-mnist)"


@register_data_source
class MnistSource(IdxSource):
    name = "mnist"
    example = "--data mnist:/data/mnist"


@contextlib.contextmanager
def _fetching(source: Any, root: Path) -> Iterator[None]:
    """``--download`` without network (or with a failing mirror): exit 2 naming what was
    tried and the way out, not torchvision's traceback."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not looks_offline(exc) \
                and "download" not in str(exc).lower():
            raise
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        tried = [ln.split()[1].rstrip(",") for ln in lines if ln.startswith("Tried ")]
        first = (lines[0] if lines else type(exc).__name__) + (
            f" (tried {', '.join(tried)})" if tried else "")
        raise DataError(
            f"--download: could not fetch {source.name} ({getattr(source, 'torchvision_class', '')}"
            f" via torchvision's mirrors) into {root}: {first}. Without network, download the "
            f"archive elsewhere and place it as {source.layout}, then drop --download."
        ) from None


class CifarSource(ImageSource):
    """torchvision's CIFAR python batches; held in memory; crop+flip augmentation with --augment."""

    native_size = (32, 32)
    torchvision_class: ClassVar[str] = "CIFAR10"
    folder: ClassVar[str] = "cifar-10-batches-py"

    @property
    def layout(self) -> str:  # type: ignore[override]
        return (f"ROOT/{self.folder}/ as extracted from torchvision's {self.torchvision_class} "
                "archive (pass --download to fetch it)")

    def splits(self, root: Path | None, download: bool) -> Splits:
        import torchvision.datasets as tvd

        assert root is not None
        if not download and not (root / self.folder).is_dir():
            raise self.missing(root / self.folder, "no such directory")
        cls = getattr(tvd, self.torchvision_class)
        try:
            with _fetching(self, root) if download else contextlib.nullcontext():
                train = cls(str(root), train=True, download=download)
                test = cls(str(root), train=False, download=download)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise self.missing(root / self.folder, str(exc)) from exc

        def tensors(ds: Any) -> ImageTensors:
            images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
            return ImageTensors(images.contiguous(), torch.as_tensor(ds.targets))

        return Splits(train=tensors(train), eval=tensors(test), num_classes=len(train.classes),
                      classes=list(train.classes))


@register_data_source
class Cifar10Source(CifarSource):
    name = "cifar10"
    example = "--data cifar10:/data/cifar"


@register_data_source
class Cifar100Source(CifarSource):
    name = "cifar100"
    torchvision_class = "CIFAR100"
    folder = "cifar-100-python"
    example = "--data cifar100:/data/cifar"


@register_data_source
class ImageFolderSource(ImageSource):
    """ImageNet layout: ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg, same class folders."""

    name = "imagefolder"
    layout = "ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE (the same CLASS folders in both)"
    example = "--data imagefolder:/data/imagenet"

    def splits(self, root: Path | None, download: bool) -> Splits:
        from torchvision.datasets import ImageFolder

        assert root is not None
        if not root.is_dir():
            raise self.missing(root, "no such directory")
        folders = {}
        for split in ("train", "val"):
            path = root / split
            if not path.is_dir():
                raise self.missing(path, "no such directory")
            try:
                folders[split] = ImageFolder(str(path))
            except (FileNotFoundError, RuntimeError) as exc:  # no class dirs / no images
                raise self.missing(path, str(exc).splitlines()[0]) from exc
        if folders["train"].classes != folders["val"].classes:
            raise self.missing(root, "train/ and val/ have different class folders")
        return Splits(train=folders["train"], eval=folders["val"],
                      num_classes=len(folders["train"].classes), eval_split="val",
                      classes=folders["train"].classes)

    def _transformed(self, splits: Splits, config: ImageConfig, augment: bool,
                     options: LoaderOptions) -> tuple[Dataset, Dataset]:
        common = dict(input_size=(config.in_chans, *config.size), mean=config.mean,
                      std=config.std, interpolation=config.interpolation)
        eval_tf = create_transform(**common, is_training=False, crop_pct=config.crop_pct)
        # Recovery fine-tuning, not training from scratch: milder crops, no colour jitter.
        train_tf = create_transform(**common, is_training=True, scale=(0.25, 1.0),
                                    color_jitter=None) if augment else eval_tf
        train_idx = stratified_subset(splits.train.targets, options.subsample, options.seed)
        eval_idx = stratified_subset(splits.eval.targets, options.subsample, 0)
        return (TransformedFolder(splits.train, train_idx, train_tf, config.in_chans,
                                  options.seed, random=augment),
                TransformedFolder(splits.eval, eval_idx, eval_tf, config.in_chans))


__all__ = [
    "Cifar10Source", "Cifar100Source", "CifarSource", "DigitsSource", "FashionMnistSource",
    "IdxSource", "ImageFolderSource", "ImageSource", "ImageTensors", "MnistSource",
    "TensorTransform", "TransformedFolder", "TransformedTensors", "read_idx",
]
