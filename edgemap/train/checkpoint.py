"""Resumable training state in ONE safetensors file (tensors) with its JSON in the metadata.

One file means one atomic ``os.replace``: a kill -9 mid-save leaves the previous state
intact. Nothing here unpickles: tensors come from safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from edgemap.errors import ResumeError
from edgemap.fsutil import atomic_path

STATE_FILE = "state/train_state.safetensors"
_META_KEY = "edgemap_state"


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"rng.torch": torch.get_rng_state()}, {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_state(run_path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, info: dict[str, Any]) -> Path:
    """Atomically write model + optimizer + RNG + ``info`` (JSON) to RUN_DIR/state/."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ot, ometa = _optimizer_tensors(opt)
    rt, rmeta = rng_state()
    tensors.update(ot)
    tensors.update(rt)
    meta = {"info": info, "optimizer": ometa, "rng": rmeta}
    dest = run_path / STATE_FILE
    with atomic_path(dest) as tmp:
        save_tensors(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
    return dest


_OS_ERROR = re.compile(r"os error (\d+)")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with its I/O failures as the OSError they are: a full disk was a SafetensorError
    traceback ("I/O error: No space left on device (os error 28)") instead of edgemap's one line, exit 74."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = _OS_ERROR.search(str(e))
        if code is None:
            raise
        n = int(code.group(1))
        raise OSError(n, os.strerror(n), str(path)) from e


def read_state(run_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load the state file; ResumeError when it is missing or corrupt."""
    path = run_path / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"{path}: no training state to resume from (was the run started with `edgemap finetune`?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise ResumeError(f"{path}: training state is corrupt ({type(e).__name__}: {e}); start a new run with another --out") from e
    return tensors, meta


def apply_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(msd, strict=True)
    _load_optimizer(opt, tensors, meta["optimizer"])
    restore_rng(tensors, meta["rng"])
