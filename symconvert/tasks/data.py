"""``--data SPEC`` → train/eval loaders that feed a model what its pretrained config expects.

A spec is ``NAME`` or ``NAME:ROOT`` (``digits``, ``fashion-mnist[:ROOT]``, ``mnist:ROOT``,
``cifar10:ROOT``, ``cifar100:ROOT``, ``imagefolder:ROOT``). Each NAME is a ``DataSource`` in
one registry; adding a source (e.g. ``text:ROOT`` for language models) is one class with
``@register_data_source``.

Small datasets that fit in memory (digits, (fashion-)MNIST, CIFAR) are held as one tensor and
transformed a batch at a time with tensor ops (resize, channel conversion, normalisation,
optional crop/flip), because PIL per image is the bottleneck on a 2-core machine.
``imagefolder`` uses timm's ``create_transform`` per image. Every random choice of an
augmentation is a function of (seed, epoch, sample index), so a run gives the same batches
with any number of workers and after a resume.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from symconvert.checks import MAX_INPUT_SIZE, parse_input_size
from symconvert.errors import DataError
from symconvert.surgery.calibrate import register_data_resolver

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: registry key, root folder (if any) and the text given."""

    name: str
    root: Path | None
    text: str

    @property
    def source(self) -> DataSource:
        return DATA_SOURCES[self.name]


@dataclass
class Splits:
    """The raw (untransformed) train and eval datasets of a source."""

    train: Dataset
    eval: Dataset
    num_classes: int
    eval_split: str = "test"
    classes: Sequence[str] | None = None


@dataclass
class LoaderOptions:
    """How to batch a source; the CLI's data flags map one to one onto these fields."""

    batch_size: int = 64
    eval_batch_size: int | None = None
    workers: int = 0
    input_size: tuple[int, int] | None = None
    subsample: int | None = None
    seed: int = 0
    augment: bool | None = None  # None: the source's default
    download: bool = False
    rank: int = 0
    world_size: int = 1
    train: bool = True  # build the train loader too (evaluate needs only eval)
    pin_memory: bool = False
    bptt: int = 35  # language models: tokens per truncated-BPTT segment


@dataclass
class Loaders:
    """What training and evaluation consume."""

    spec: DataSpec
    train: DataLoader | None
    eval: DataLoader
    num_classes: int
    eval_split: str
    task: str = "classification"
    image_config: ImageConfig | None = None
    classes: Sequence[str] | None = None
    n_train: int = 0
    n_eval: int = 0
    meta: dict[str, Any] = field(default_factory=dict)  # task-specific (e.g. the corpus)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position the train loader at ``epoch``, skipping ``start_batch`` batches (resume)."""
        if self.train is None:
            return
        if not isinstance(self.train, DataLoader):  # a task's own loader positions itself
            self.train.set_epoch(epoch, start_batch)
            return
        sampler = self.train.sampler
        if isinstance(sampler, ShardedSampler):
            sampler.set_epoch(epoch, start=start_batch * (self.train.batch_size or 1))
            if self.train.generator is not None:  # worker seeds: a function of the epoch too
                self.train.generator.manual_seed(mix(sampler.seed, epoch, 0x10AD))
        dataset = self.train.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)


class DataSource:
    """One ``--data`` NAME. Subclass, set the class attributes and register it."""

    name: ClassVar[str]
    task: ClassVar[str] = "classification"
    #: Human description of the files expected under ROOT, quoted in every DataError.
    layout: ClassVar[str] = ""
    default_root: ClassVar[str | None] = None
    needs_root: ClassVar[bool] = True
    example: ClassVar[str] = ""

    def loaders(self, spec: DataSpec, model: nn.Module | None, options: LoaderOptions) -> Loaders:
        raise NotImplementedError

    def missing(self, path: Path | str, what: str = "") -> DataError:
        """The one error shape for absent or malformed data: the path, then the layout."""
        detail = f" ({what})" if what else ""
        return DataError(
            f"{self.name}: cannot read data at {path}{detail}. Expected layout: {self.layout}"
        )


DATA_SOURCES: dict[str, DataSource] = {}
#: the registered tasks by name (``symconvert.tasks.base.register_task`` fills it); held here
#: so that ``create_loaders`` has the data's task check the model before reading anything
TASKS: dict[str, Any] = {}


def register_data_source(cls: type[DataSource]) -> type[DataSource]:
    """Class decorator: make ``cls.name`` usable as ``--data NAME[:ROOT]``."""
    DATA_SOURCES[cls.name] = cls()
    return cls


def list_data_sources() -> list[DataSource]:
    return [DATA_SOURCES[k] for k in sorted(DATA_SOURCES)]


def source_forms(task: str | None = None) -> str:
    """How the sources (of ``task``) are written: ``digits, fashion-mnist[:ROOT], mnist:ROOT``."""
    return ", ".join(
        s.name + (":ROOT" if s.needs_root and s.default_root is None else
                  "[:ROOT]" if s.default_root is not None else "")
        for s in list_data_sources() if task is None or s.task == task)


def parse_data_spec(spec: str | DataSpec) -> DataSpec:
    """``"fashion-mnist:/data/fm"`` → ``DataSpec("fashion-mnist", Path("/data/fm"), ...)``."""
    if isinstance(spec, DataSpec):
        return spec
    text = str(spec).strip()
    name, sep, root = text.partition(":")
    name = name.strip().lower()
    if name not in DATA_SOURCES:
        raise DataError(f"unknown --data source {name!r} in {text!r}. Known: {source_forms()}.")
    source = DATA_SOURCES[name]
    root_text = root.strip() if sep else ""
    if not root_text:
        if source.default_root is not None:
            root_text = source.default_root
        elif source.needs_root:
            raise DataError(
                f"--data {name} needs a root folder: --data {name}:ROOT, e.g. {source.example}. "
                f"Expected layout: {source.layout}"
            )
    return DataSpec(name=name, root=Path(root_text).expanduser() if root_text else None,
                    text=text)


def create_loaders(spec: str | DataSpec, model: nn.Module | None = None,
                   **options: Any) -> Loaders:
    """Train/eval loaders for ``spec`` with the transforms ``model`` expects.

    ``options`` are the fields of ``LoaderOptions`` (batch_size, workers, input_size, subsample,
    seed, augment, download, rank, world_size, train, ...). The data's task first checks that
    ``model`` can take this data (``Task.check_data``), before anything is read.
    """
    parsed = parse_data_spec(spec)
    if model is not None and parsed.source.task in TASKS:
        TASKS[parsed.source.task].check_data(model, parsed)
    opts = LoaderOptions(**options)
    if opts.input_size is not None:
        opts.input_size = parse_input_size(opts.input_size)
    return parsed.source.loaders(parsed, model, opts)




@register_data_resolver
def _calibration_loaders(data: Any, model: nn.Module | None, batch_size: int, seed: int
                         ) -> tuple[Any, str] | None:
    """Calibration data given as a ``--data`` spec or ``Loaders``: its train split (the eval
    split if it has none), no augmentation, seeded order."""
    if isinstance(data, (str, DataSpec)):
        data = create_loaders(data, model, batch_size=batch_size, augment=False, seed=seed,
                              subsample=None)
    if not isinstance(data, Loaders):
        return None
    return (data.train if data.train is not None else data.eval), data.spec.text


# ---------------------------------------------------------------------- model config


@dataclass(frozen=True)
class ImageConfig:
    """The input a model expects (from its timm ``pretrained_cfg`` where it has one)."""

    in_chans: int
    size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    from_model: bool = True  # False: the model has no pretrained config; native data size


def _pretrained_cfg(model: nn.Module) -> dict | None:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg:
            return cfg
    return None


def model_in_chans(model: nn.Module, cfg: dict | None = None) -> int | None:
    """Input channels of the first convolution (what the weights really take)."""
    first = (cfg or {}).get("first_conv")
    if isinstance(first, str):
        try:
            module = model.get_submodule(first)
            if hasattr(module, "in_channels"):
                return int(module.in_channels)
        except AttributeError:
            pass
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


def _fit_channels(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    # e.g. an ImageNet config on a 1-channel model: the grey image's statistic is the average.
    return (float(np.mean(values)),) * in_chans


def resolve_image_config(model: nn.Module | None, input_size: tuple[int, int] | None = None,
                         native_size: tuple[int, int] | None = None,
                         native_chans: int = 3) -> ImageConfig:
    """What to feed ``model``: timm's ``resolve_data_config`` when the model carries a
    ``pretrained_cfg`` (timm models, or a dict set on a ``py:`` model); else the data's
    native size with ImageNet statistics. ``input_size`` overrides the size either way."""
    cfg = _pretrained_cfg(model) if model is not None else None
    library = (getattr(model, "symconvert_source", None) or {}).get("library")
    if cfg is not None or library == "torchvision":
        # torchvision models carry no config but are trained with timm's defaults (224, ImageNet).
        data_cfg = resolve_data_config(model=model) if cfg is not None else \
            resolve_data_config(pretrained_cfg={"input_size": (3, 224, 224)})
        in_chans = (model_in_chans(model, cfg) if model is not None else None) \
            or int(data_cfg["input_size"][0])
        size = tuple(int(s) for s in data_cfg["input_size"][1:])
        return ImageConfig(
            in_chans=in_chans, size=input_size or size,  # type: ignore[arg-type]
            mean=_fit_channels(data_cfg["mean"], in_chans),
            std=_fit_channels(data_cfg["std"], in_chans),
            interpolation=str(data_cfg.get("interpolation", "bilinear")),
            crop_pct=float(data_cfg.get("crop_pct", 1.0)), from_model=True,
        )
    in_chans = (model_in_chans(model) if model is not None else None) or native_chans
    return ImageConfig(
        in_chans=in_chans, size=input_size or native_size or (224, 224),
        mean=_fit_channels(IMAGENET_MEAN, in_chans), std=_fit_channels(IMAGENET_STD, in_chans),
        from_model=False,
    )


@torch.no_grad()
def model_num_outputs(model: nn.Module, image_config: ImageConfig | None = None) -> int | None:
    """Width of the classifier head: timm's ``num_classes``, the last Linear, or a probe."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Linear):
            return head.out_features
    if image_config is not None:
        # A forward pass answers for any architecture; one tiny input, in eval mode.
        was_training = model.training
        model.eval()
        try:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            out = model(torch.zeros(1, image_config.in_chans, *image_config.size, device=device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            return int(out.shape[-1])
        except Exception:  # an unusual model: fall back to the last Linear below
            pass
        finally:
            model.train(was_training)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def check_num_classes(model: nn.Module, loaders: Loaders) -> None:
    """A head that does not match the data's classes is a user error, not a crash later."""
    outputs = model_num_outputs(model, loaders.image_config)
    if outputs is not None and outputs != loaders.num_classes:
        raise DataError(
            f"the model's classifier head has {outputs} outputs but --data {loaders.spec.text} "
            f"has {loaders.num_classes} classes. Fine-tune with --num-classes "
            f"{loaders.num_classes} to replace the head, or evaluate a model trained on "
            "these classes."
        )


# ------------------------------------------------------------------ sampling helpers


def stratified_subset(targets: Sequence[int] | np.ndarray, limit: int | None,
                      seed: int = 0) -> np.ndarray | None:
    """Indices of at most ``limit`` items keeping class proportions; deterministic in seed.

    Each item's key is its quantile inside its own class (in a seeded random order), so taking
    the smallest keys takes every class in proportion. ``None`` when no subsampling is needed.
    """
    targets = np.asarray(targets)
    n = len(targets)
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise DataError(f"--subsample {limit}: expected a positive number of items per split")
    order = np.random.default_rng(seed).permutation(n)
    key = np.empty(n, dtype=np.float64)
    for cls in np.unique(targets):
        members = order[targets[order] == cls]  # this class, in random order
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    chosen = np.lexsort((np.argsort(order), key))[:limit]
    return np.sort(chosen)


class ShardedSampler(Sampler[int]):
    """Epoch-seeded shuffle split across ranks, resumable at any item.

    Rank r takes items r, r+W, r+2W, ... of one permutation, so the union of every rank's
    k-th batch is exactly the k-th batch of a single process with W times the batch size: DDP
    and single-process runs see the same data. ``drop_last`` trims the permutation to a
    multiple of W so that every rank runs the same number of steps.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix(self.seed, self.epoch, 0x5A3D))
            perm = torch.randperm(self.n, generator=gen).tolist()
        else:
            perm = list(range(self.n))
        if self.drop_last:
            perm = perm[: (self.n // self.world_size) * self.world_size]
        return perm[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


def mix(*values: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch and Python RNGs for one item, restoring the caller's streams afterwards."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)



def describe(loaders: Loaders) -> dict[str, Any]:
    """A small JSON-able summary for logs and metadata."""
    cfg = loaders.image_config
    return {
        "data": loaders.spec.text, "num_classes": loaders.num_classes,
        "train_items": loaders.n_train, "eval_items": loaders.n_eval,
        "eval_split": loaders.eval_split,
        **({"input": [cfg.in_chans, *cfg.size]} if cfg is not None else {}),
    }


__all__ = [
    "DATA_SOURCES", "MAX_INPUT_SIZE", "TASKS", "DataSource", "DataSpec", "ImageConfig", "LoaderOptions",
    "Loaders", "ShardedSampler", "Splits", "check_num_classes", "create_loaders", "describe",
    "list_data_sources", "mix", "model_num_outputs", "parse_data_spec", "parse_input_size",
    "register_data_source", "resolve_image_config", "seeded_rng", "source_forms",
    "stratified_subset",
]

