"""Training state on disk and in memory: every global RNG (``rng_state``/``set_rng_state``),
atomic checkpoints (``atomic_torch_save``, ``load_checkpoint``), metrics.jsonl, and the
check that a resume continues the same run."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from symconvert.errors import TrainingError
from symconvert.io.files import atomic_write, atomic_write_text
from symconvert.train.config import FinetuneConfig, plain
from symconvert.train.distributed import Dist

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = "symconvert-train"
CHECKPOINT_VERSION = 1

# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"],
                         np_s["has_gauss"], np_s["cached_gaussian"]))
    py_s = state["python"]
    random.setstate((py_s["version"], tuple(int(v) for v in py_s["state"].tolist()),
                     py_s["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


# ----------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint, read with ``weights_only=True``; damage → ``TrainingError``."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no training checkpoint at {path}: nothing to resume. Run without "
                            "--resume to start, or point --out at the run to continue.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign object: all unusable
        raise TrainingError(
            f"training checkpoint {path} is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}). Delete it to start the "
            "run over, or restore a good copy."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a symconvert training checkpoint; delete it or "
                            "choose another --out.")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} has checkpoint version {ckpt.get('version')}; this "
                            f"symconvert reads version {CHECKPOINT_VERSION}.")
    missing = [k for k in ("model", "optimizer", "epoch", "step", "rng") if k not in ckpt]
    if missing:
        raise TrainingError(f"training checkpoint {path} lacks {', '.join(missing)}; it is "
                            "damaged. Delete it to start over.")
    return ckpt



def write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl atomically (a resumed run drops lines past its checkpoint)."""
    atomic_write_text(out / METRICS_NAME,
                      "".join(json.dumps(row, sort_keys=True) + "\n" for row in metrics))


def check_same_run(ckpt: dict[str, Any], config: FinetuneConfig, dist: Dist,
                    path: Path) -> None:
    saved = ckpt.get("config") or {}
    now = plain(config)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} → {now.get(k)!r}"
               for k in FinetuneConfig.trajectory() if k in saved and saved.get(k) != now.get(k)]
    if ckpt.get("world_size", 1) != dist.world_size:
        changed.append(f"processes {ckpt.get('world_size', 1)} → {dist.world_size}")
    if changed:
        raise TrainingError(
            f"--resume: {path} was written by a run with other settings ({'; '.join(changed)}). "
            "Resume with the original flags, or start a new run in another --out.")
