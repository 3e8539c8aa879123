"""SPEC §6 ``--data``: the sources, their splits, the model's transforms, and bad input."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_train import FASHION_MNIST, one_thread
from torch import nn

from symconvert.errors import DataError, SymconvertWarning
from symconvert.tasks.data import (
    DATA_SOURCES,
    DataSource,
    Loaders,
    ShardedSampler,
    check_num_classes,
    create_loaders,
    parse_data_spec,
    parse_input_size,
    register_data_source,
    resolve_image_config,
    stratified_subset,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _grey_model(num_classes: int = 10, in_chans: int = 1, cfg: dict | None = None) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, num_classes))
    if cfg is not None:
        model.pretrained_cfg = cfg
    return model


def _batch(loaders: Loaders, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    loader = loaders.train if split == "train" else loaders.eval
    return next(iter(loader))


# ----------------------------------------------------------------------------- specs


def test_spec_parsing_names_roots_and_defaults():
    assert parse_data_spec("digits").root is None
    fm = parse_data_spec("fashion-mnist")
    assert fm.name == "fashion-mnist" and fm.root == Path("/usr/share/datasets/fashion-mnist")
    assert parse_data_spec("fashion-mnist:/x/fm").root == Path("/x/fm")
    assert parse_data_spec("CIFAR10:/data/c").name == "cifar10"
    assert parse_data_spec("imagefolder:/data/in").root == Path("/data/in")


@pytest.mark.parametrize("spec, needle", [
    ("mnist", "mnist:ROOT"),
    ("imagefolder", "ROOT/train/CLASS"),
    ("svhn:/x", "unknown --data source 'svhn'"),
])
def test_spec_errors_say_what_to_write(spec, needle):
    with pytest.raises(DataError) as err:
        parse_data_spec(spec)
    assert needle in str(err.value)


def test_input_size_forms():
    assert parse_input_size("224") == (224, 224)
    assert parse_input_size("160,128") == (160, 128)
    assert parse_input_size((3, 64, 48)) == (64, 48)
    assert parse_input_size(32) == (32, 32)
    for bad in ("a,b", "1,2,3,4", "0"):
        with pytest.raises(DataError, match="--input-size"):
            parse_input_size(bad)


def test_registry_takes_a_new_source_without_touching_the_loaders():
    """How ``text:ROOT`` will be added: one class, registered by its prefix."""

    class Echo(DataSource):
        name = "echo-test"
        task = "language-model"
        layout = "ROOT/{train,valid,test}.txt"

        def loaders(self, spec, model, options):
            return ("built", spec.root, options.batch_size)

    register_data_source(Echo)
    try:
        assert create_loaders("echo-test:/corpus", None, batch_size=7) == \
            ("built", Path("/corpus"), 7)
    finally:
        DATA_SOURCES.pop("echo-test")


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_1437_360():
    a = create_loaders("digits", None, batch_size=32)
    b = create_loaders("digits", None, batch_size=32)
    assert (a.n_train, a.n_eval, a.num_classes, a.eval_split) == (1437, 360, 10, "test")
    ta, tb = a.eval.dataset.targets, b.eval.dataset.targets
    assert torch.equal(ta, tb)  # the same 360 images every time (seed 0)
    counts = torch.bincount(ta, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    raw = a.train.dataset.base.images
    assert raw.dtype == torch.float32 and float(raw.min()) == 0.0 and float(raw.max()) == 1.0


def test_digits_native_size_for_a_model_without_config():
    loaders = create_loaders("digits", _grey_model(), batch_size=16)
    x, y = _batch(loaders)
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    assert loaders.image_config.from_model is False


def test_pretrained_cfg_on_a_plain_module_is_honoured():
    """A ``py:`` model with a timm-style pretrained_cfg dict: size and statistics from it,
    grey digits expanded to the 3 channels the first conv takes."""
    cfg = {"input_size": (3, 224, 224), "mean": (0.1, 0.2, 0.3), "std": (0.5, 0.25, 0.125),
           "interpolation": "bilinear", "crop_pct": 0.9}
    loaders = create_loaders("digits", _grey_model(in_chans=3, cfg=cfg), batch_size=4,
                             eval_batch_size=4, train=False)
    x, _ = _batch(loaders, "eval")
    assert x.shape == (4, 3, 224, 224)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    raw = x * std + mean
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5)  # the same grey image in each channel
    assert torch.allclose(raw[:, 0], raw[:, 2], atol=1e-5)
    assert raw.min() > -0.05 and raw.max() < 1.05


def test_input_size_overrides_the_config():
    cfg = {"input_size": (3, 224, 224)}
    model = _grey_model(in_chans=3, cfg=cfg)
    x, _ = _batch(create_loaders("digits", model, batch_size=4, input_size="32"))
    assert x.shape == (4, 3, 32, 32)
    x, _ = _batch(create_loaders("digits", model, batch_size=4, input_size="20,24"))
    assert x.shape == (4, 3, 20, 24)


def test_timm_model_with_one_input_channel_gets_grey_statistics():
    import timm

    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)
    config = resolve_image_config(model)
    # timm keeps the 3-channel ImageNet config; the weights take 1 channel.
    assert config.in_chans == 1 and config.size == (224, 224)
    assert config.mean == pytest.approx((np.mean((0.485, 0.456, 0.406)),))


def test_rgb_images_become_luma_for_a_grey_model():
    from symconvert.tasks.image_datasets import convert_channels as _convert_channels

    rgb = torch.zeros(1, 3, 2, 2)
    rgb[:, 1] = 1.0  # pure green
    grey = _convert_channels(rgb, 1)
    assert grey.shape == (1, 1, 2, 2) and torch.allclose(grey, torch.full_like(grey, 0.587))
    with pytest.raises(DataError, match="4 channels"):
        _convert_channels(rgb, 4)


def test_class_count_checked_against_the_head():
    loaders = create_loaders("digits", _grey_model(num_classes=5), batch_size=8)
    with pytest.raises(DataError, match="--num-classes 10") as err:
        check_num_classes(_grey_model(num_classes=5), loaders)
    assert "5 outputs" in str(err.value)
    check_num_classes(_grey_model(num_classes=10), loaders)  # matches: no error


# ---------------------------------------------------------------------- subsampling


def test_stratified_subset_keeps_proportions_and_is_deterministic():
    targets = np.array([0] * 600 + [1] * 300 + [2] * 100)
    idx = stratified_subset(targets, 100, seed=3)
    assert len(idx) == 100 and len(set(idx.tolist())) == 100
    assert np.bincount(targets[idx]).tolist() == [60, 30, 10]
    assert np.array_equal(idx, stratified_subset(targets, 100, seed=3))
    assert not np.array_equal(idx, stratified_subset(targets, 100, seed=4))
    assert stratified_subset(targets, 5000) is None  # nothing to drop


def test_subsample_applies_to_both_splits():
    loaders = create_loaders("digits", None, batch_size=10, subsample=100)
    assert (loaders.n_train, loaders.n_eval) == (100, 100)
    assert torch.bincount(loaders.train.dataset.targets).tolist() == [10] * 10


# ------------------------------------------------------------------ sampling, augment


@pytest.mark.parametrize("n, batch, world", [(103, 8, 2), (64, 4, 4), (50, 5, 3)])
def test_rank_batches_union_to_the_single_process_batch(n, batch, world):
    """What makes torchrun runs match single-process ones: the k-th global batch is the same."""
    single = list(ShardedSampler(n, shuffle=True, seed=5, world_size=1))
    sharded = [list(ShardedSampler(n, shuffle=True, seed=5, rank=r, world_size=world))
               for r in range(world)]
    steps = (n // world) // batch
    for k in range(steps):
        union = sorted(i for r in range(world) for i in sharded[r][k * batch:(k + 1) * batch])
        assert union == sorted(single[k * batch * world:(k + 1) * batch * world])


def test_sampler_resumes_mid_epoch_and_reshuffles_per_epoch():
    s = ShardedSampler(40, shuffle=True, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=13)
    assert list(s) == full[13:]
    s.set_epoch(3)
    assert list(s) != full and sorted(s) == sorted(full)


def test_augmentation_depends_on_seed_epoch_and_index_only():
    loaders = create_loaders("fashion-mnist", None, batch_size=8, augment=True, subsample=200)
    ds = loaders.train.dataset
    ds.set_epoch(0)
    a = torch.stack([x for x, _ in ds.__getitems__([3, 7, 11])])
    b = torch.stack([x for x, _ in ds.__getitems__([11, 3])])  # other batch, other order
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    ds.set_epoch(1)
    c = torch.stack([x for x, _ in ds.__getitems__([3, 7, 11])])
    assert not torch.equal(a, c)
    plain = create_loaders("fashion-mnist", None, batch_size=8, subsample=200).train.dataset
    assert not plain.transform.augment  # off by default for (fashion-)MNIST


# ----------------------------------------------------------------- fashion-mnist, idx


def test_fashion_mnist_from_the_debian_package():
    assert FASHION_MNIST.is_dir(), (
        f"{FASHION_MNIST} is missing: install Debian's dataset-fashion-mnist (.ci/run does)")
    loaders = create_loaders("fashion-mnist", None, batch_size=64)
    assert (loaders.n_train, loaders.n_eval, loaders.num_classes) == (60000, 10000, 10)
    assert loaders.classes[0] == "T-shirt/top"
    x, y = _batch(loaders)
    assert x.shape == (64, 1, 28, 28) and int(y.max()) < 10


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, n_train: int = 30, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_mnist_in_torchvision_layout(tmp_path):
    _fake_mnist(tmp_path)
    loaders = create_loaders(f"mnist:{tmp_path}", None, batch_size=5)
    assert (loaders.n_train, loaders.n_eval, loaders.num_classes) == (30, 20, 10)
    x, _ = _batch(loaders)
    assert x.shape == (5, 1, 28, 28)


def test_malformed_idx_file_names_the_file(tmp_path):
    _fake_mnist(tmp_path)
    bad = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x99\x01garbage"))
    with pytest.raises(DataError) as err:
        create_loaders(f"mnist:{tmp_path}", None, batch_size=5)
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("spec", ["mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder"])
def test_missing_root_names_path_and_layout(tmp_path, spec):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        create_loaders(f"{spec}:{root}", None, batch_size=4)
    message = str(err.value)
    assert str(root) in message and "Expected layout" in message


def test_mnist_with_files_missing(tmp_path):
    _fake_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        create_loaders(f"mnist:{tmp_path}", None, batch_size=4)


# -------------------------------------------------------------------- image folders


def _image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3,
                  splits=("train", "val"), mode: str = "RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                shape = (12, 10, 3) if mode == "RGB" else (12, 10)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    root / split / c / f"{i}.png")


def test_imagefolder_loads_with_timm_transforms(tmp_path):
    _image_folder(tmp_path)
    cfg = {"input_size": (3, 16, 16), "crop_pct": 1.0, "interpolation": "bilinear"}
    model = _grey_model(num_classes=2, in_chans=3, cfg=cfg)
    loaders = create_loaders(f"imagefolder:{tmp_path}", model, batch_size=2)
    assert (loaders.n_train, loaders.n_eval, loaders.eval_split) == (6, 6, "val")
    assert list(loaders.classes) == ["cat", "dog"]
    x, _ = _batch(loaders)
    assert x.shape == (2, 3, 16, 16)
    x, _ = _batch(loaders, "eval")
    assert x.shape == (6, 3, 16, 16)  # eval batches are at least 64: the whole val split
    check_num_classes(model, loaders)


def test_imagefolder_rgb_for_a_grey_model(tmp_path):
    _image_folder(tmp_path)
    model = _grey_model(num_classes=2, in_chans=1, cfg={"input_size": (1, 8, 8)})
    x, _ = _batch(create_loaders(f"imagefolder:{tmp_path}", model, batch_size=3), "eval")
    assert x.shape == (6, 1, 8, 8)


def test_imagefolder_augmentation_is_reproducible(tmp_path):
    _image_folder(tmp_path)
    model = _grey_model(num_classes=2, in_chans=3, cfg={"input_size": (3, 16, 16)})
    ds = create_loaders(f"imagefolder:{tmp_path}", model, batch_size=2, augment=True).train.dataset
    ds.set_epoch(4)
    state = torch.get_rng_state()
    first = ds[1][0]
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    assert torch.equal(first, ds[1][0])


@pytest.mark.parametrize("broken, needle", [
    ("no-val", "val"),
    ("empty-class", "train"),
    ("other-classes", "different class folders"),
])
def test_imagefolder_wrong_layout(tmp_path, broken, needle):
    if broken == "no-val":
        _image_folder(tmp_path, splits=("train",))
    elif broken == "empty-class":
        _image_folder(tmp_path)
        (tmp_path / "train" / "bird").mkdir()
        (tmp_path / "val" / "bird").mkdir()
    else:
        _image_folder(tmp_path, splits=("train",))
        _image_folder(tmp_path, classes=("cat", "cow"), splits=("val",))
    with pytest.raises(DataError) as err:
        create_loaders(f"imagefolder:{tmp_path}", None, batch_size=2)
    message = str(err.value)
    assert needle in message and "ROOT/train/CLASS/IMAGE" in message
    assert str(tmp_path) in message


def test_a_train_split_smaller_than_one_batch_is_one_batch_with_a_warning():
    """3 or 12 calibration images (issue 22): used whole, as one smaller batch, with a word
    about over-fitting; only fewer items than processes is an error."""
    with pytest.warns(SymconvertWarning, match="over-fits"):
        loaders = create_loaders("digits", None, batch_size=64, subsample=12)
    batches = list(loaders.train)
    assert [len(y) for _, y in batches] == [12]
    with pytest.warns(SymconvertWarning, match="per process"):
        loaders = create_loaders("digits", None, batch_size=64, subsample=3, world_size=2,
                                 rank=1)
    assert [len(y) for _, y in loaders.train] == [1]
    with pytest.raises(DataError, match="fewer than the 4 processes"):
        create_loaders("digits", None, batch_size=64, subsample=3, world_size=4)


def test_worker_processes_give_the_same_batches():
    """Augmentation seeds come from (seed, epoch, index), not from worker RNGs."""
    batches = {}
    for workers in (0, 2):
        loaders = create_loaders("fashion-mnist", None, batch_size=16, subsample=64,
                                 augment=True, workers=workers)
        loaders.set_epoch(1, start_batch=1)
        batches[workers] = [(x, y) for x, y in loaders.train]
    assert len(batches[0]) == 3  # 64 items, batch 16, resumed after the first batch
    for (xa, ya), (xb, yb) in zip(batches[0], batches[2], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
