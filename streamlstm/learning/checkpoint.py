"""Model checkpoints: written atomically, checked on load, the last N kept.

A checkpoint is one ``ckpt-<version>.pt`` file holding the weights, the architecture,
the settings it was trained under (JSON), the model version and a few metrics. It is
written to a temporary file in the same directory, fsynced, renamed into place and
the directory fsynced, so a crash leaves either the old set or the new file, never a
torn one. Loading uses ``torch.load(weights_only=True)`` (no code runs from the file)
and recomputes a SHA-256 over the weights and metadata, so a file that was truncated
or flipped is refused with a :class:`CheckpointError`, as is one whose architecture
differs from what the caller expects.

>>> import tempfile
>>> from streamlstm.model import RecurrentModel
>>> model = RecurrentModel(3, 8, 1)
>>> folder = tempfile.mkdtemp()
>>> path = save_checkpoint(folder, model.state_dict(), model.describe(), version=4)
>>> ckpt = load_checkpoint(path, expect=model.describe())
>>> ckpt.version, path.name
(4, 'ckpt-00000004.pt')
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


def architecture(model: Any, settings: Any) -> dict[str, Any]:
    """What a checkpoint must match to be served: the network's shape and its inputs."""
    return {**model.describe(), "inputs": settings.model.inputs}


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says which file and why."""


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    version: int
    architecture: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    created: float = 0.0


def _digest(state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def checkpoint_path(directory: str | Path, version: int) -> Path:
    return Path(directory) / f"ckpt-{version:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(version, path)`` of checkpoint files in ``directory``, newest first."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(
    directory: str | Path,
    state_dict: dict[str, torch.Tensor],
    architecture: dict[str, Any],
    version: int,
    config: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    keep: int = 3,
) -> Path:
    """Write ``ckpt-<version>.pt`` atomically and delete all but the newest ``keep``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    meta = {
        "format": FORMAT,
        "version": int(version),
        "architecture": dict(architecture),
        "config": json.dumps(config or {}, sort_keys=True, default=str),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "created": time.time(),
    }
    payload = {**meta, "state_dict": weights, "sha256": _digest(weights, meta)}
    target = checkpoint_path(folder, version)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other readers (replay, run) need it
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    for _, old in list_checkpoints(folder)[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()
    return target


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None) -> Checkpoint:
    """Load and verify one checkpoint; ``expect`` is the architecture it must have."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable or corrupt ({exc})") from None
    required = ("format", "version", "architecture", "config", "metrics", "created")
    if not isinstance(payload, dict) or any(k not in payload for k in (*required, "sha256")):
        raise CheckpointError(f"checkpoint {path}: not a streamlstm checkpoint")
    if payload["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {payload['format']}, expected {FORMAT}")
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {path}: no weights")
    meta = {k: payload[k] for k in required}
    if _digest(state_dict, meta) != payload["sha256"]:
        raise CheckpointError(f"checkpoint {path}: integrity check failed (SHA-256 mismatch)")
    arch = payload["architecture"]
    if expect is not None and arch != dict(expect):
        diff = ", ".join(
            f"{k}={arch.get(k)!r} (config: {expect.get(k)!r})"
            for k in sorted(set(arch) | set(expect))
            if arch.get(k) != expect.get(k)
        )
        raise CheckpointError(
            f"checkpoint {path}: architecture does not match the configured model: {diff}; "
            "change the model settings or point training.checkpoint_dir elsewhere"
        )
    return Checkpoint(
        path=path,
        version=int(payload["version"]),
        architecture=arch,
        state_dict=state_dict,
        config=json.loads(payload["config"]),
        metrics=payload["metrics"],
        created=float(payload["created"]),
    )


def latest_checkpoint(
    directory: str | Path, expect: dict[str, Any] | None = None
) -> Checkpoint | None:
    """The newest valid checkpoint in ``directory`` (None if there is none).

    Corrupt files are skipped with a warning (an older one is still good); an
    architecture mismatch is raised, since it means the configuration is wrong.
    """
    for _, path in list_checkpoints(directory):
        try:
            return load_checkpoint(path, expect)
        except CheckpointError as exc:
            if "architecture does not match" in str(exc):
                raise
            log.warning("skipping %s", exc)
    return None
