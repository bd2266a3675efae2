"""Checkpoints: ``checkpoints/step-NNNNNN.pt`` written atomically, ``latest`` and ``best`` pointers, loaded with
weights_only."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
from typing import Any

import numpy as np
import torch

from mbm.train.config import saved_settings

_NAME = re.compile(r"^step-(\d{6,})\.pt$")
BEST = "best"  # the pointer to the checkpoint of the best held-out evaluation, as ``latest`` to the newest


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}.pt"


def replace_atomic(path: str, write) -> None:
    """``write(f)`` to a temporary file next to ``path``, then rename it to ``path``. A write that fails
    leaves no partial file behind; one that failed for an OSError (a full disk) under another exception
    (torch.save's "[enforce fail at inline_container.cc]") is raised as that OSError, naming ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e.__cause__ or e.__context__
        if not isinstance(e, OSError) and isinstance(cause, OSError):
            raise OSError(cause.errno, cause.strerror, path) from e
        raise


def save_checkpoint(folder: str, step: int, state: dict[str, Any], keep: int, best: bool = False) -> str:
    """Write ``state`` as this step's checkpoint (temp file + rename), point ``latest`` at it (and ``best``,
    when it is the run's best so far), and prune old ones: the last ``keep`` stay, and the one ``best`` names."""
    os.makedirs(folder, exist_ok=True)
    name = checkpoint_name(step)
    path = os.path.join(folder, name)
    replace_atomic(path, lambda f: torch.save(state, f))
    replace_atomic(os.path.join(folder, "latest"), lambda f: f.write(name.encode() + b"\n"))
    if best:
        point_best(folder, step)
    kept = best_checkpoint(folder)
    for old in list_checkpoints(folder)[:-keep]:
        if kept is None or os.path.basename(kept) != checkpoint_name(old):
            os.remove(os.path.join(folder, checkpoint_name(old)))
    return path


def point_best(folder: str, step: int | None) -> None:
    """Point ``best`` at this step's checkpoint, or remove it (None)."""
    if step is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, BEST))
        return
    replace_atomic(os.path.join(folder, BEST), lambda f: f.write(checkpoint_name(step).encode() + b"\n"))


def best_checkpoint(folder: str) -> str | None:
    """The checkpoint ``best`` names (the best held-out evaluation so far, ``--best-by``); None when there is
    none, or it is gone."""
    try:
        with open(os.path.join(folder, BEST), encoding="utf-8") as f:
            name = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    path = os.path.join(folder, name)
    return path if _NAME.match(name) and os.path.isfile(path) else None


def list_checkpoints(folder: str) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, ascending."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(m[1]) for m in map(_NAME.match, os.listdir(folder)) if m)


def latest_checkpoint(folder: str) -> str | None:
    """The checkpoint ``latest`` names, or the highest step present; None when there is none."""
    pointer = os.path.join(folder, "latest")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8") as f:
            path = os.path.join(folder, f.read().strip())
        if os.path.isfile(path):
            return path
    steps = list_checkpoints(folder)
    return os.path.join(folder, checkpoint_name(steps[-1])) if steps else None


def load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint's state on the CPU; only tensors and plain containers are unpickled.

    Raises ``ValueError`` naming the file when it cannot be read (cut short, not a checkpoint)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise ValueError(f"checkpoint {path} ({size} bytes) cannot be read, it may be cut short or not a "
                         f"checkpoint: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not an mbm checkpoint")
    return state


def checkpoint_settings(state: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The run's settings a checkpoint's ``state`` holds (what a run folder that lost its config.json goes
    by); None for one saved before checkpoints held them."""
    settings = state.get("config")
    return saved_settings(settings, path) if isinstance(settings, dict) else None


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain lists (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
