"""Model checkpoints: written atomically, checked on load, the last N kept.

A checkpoint is one ``ckpt-<version>.pt`` file holding the weights, the architecture,
the settings it was trained under (JSON), the model version and a few metrics. It is
written to a temporary file in the same directory, fsynced, renamed into place and
the directory fsynced, so a crash leaves either the old set or the new file, never a
torn one. Loading uses ``torch.load(weights_only=True)`` (no code runs from the file)
and recomputes a SHA-256 over the weights and metadata, so a file that was truncated
or flipped is refused with a :class:`CheckpointError`, as is one whose architecture
differs from what the caller expects. The same bytes, with the same checks, are the
value of a model-topic record (:func:`encode_checkpoint`, :func:`decode_checkpoint`):
the daemon's trainer publishes adopted weights that way to every member.

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
import io
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
ARCHITECTURE_MISMATCH = "architecture does not match the configured model"
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
#: Temporary files of :func:`write_atomic`: ``.ckpt-<writer pid>-<random>.tmp`` (older
#: releases wrote ``.ckpt-<random>.tmp``, without the pid); ``.snap-`` for local state.
_TEMP = re.compile(r"^\.(?:ckpt|snap)-(?:(\d+)-)?[^/]*\.tmp$")
#: A temporary file this old is left over by a writer that died, whoever wrote it.
STALE_TEMP_SECONDS = 600.0
#: ...and one whose writer pid is gone, once this old (a live writer renames it at once;
#: the margin covers a writer in another pid namespace that shares the folder).
DEAD_WRITER_TEMP_SECONDS = 60.0


def architecture(model: Any, settings: Any) -> dict[str, Any]:
    """What a checkpoint must match to be served: the network's shape and its inputs."""
    return {**model.describe(), "inputs": settings.model.inputs}


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says which file and why."""


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint (``path`` is None when it came as bytes)."""

    path: Path | None
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


def encode_checkpoint(
    state_dict: dict[str, torch.Tensor],
    architecture: dict[str, Any],
    version: int,
    config: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> bytes:
    """A checkpoint as bytes: a file's content, or a model-topic record's value."""
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
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


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
    data = encode_checkpoint(state_dict, architecture, version, config, metrics)
    target = write_atomic(checkpoint_path(folder, version), data)
    for _, old in list_checkpoints(folder)[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()
    remove_stale_temp_files(folder)
    return target


def write_atomic(target: Path, data: bytes | memoryview, prefix: str = ".ckpt") -> Path:
    """Write ``target`` whole or not at all: a temporary file in the same folder
    (``<prefix>-<pid>-*.tmp``), fsynced, renamed into place, the folder fsynced."""
    folder = target.parent
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}-{os.getpid()}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; other readers (replay, run) need it
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(directory: str | Path, now: float | None = None) -> list[Path]:
    """Delete temporary files left by checkpoint writers that died before renaming them
    (e.g. killed mid-write): those older than ``STALE_TEMP_SECONDS``, or older than
    ``DEAD_WRITER_TEMP_SECONDS`` when the pid in their name is gone. Returns them."""
    folder = Path(directory)
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMP.match(path.name)
        if match is None:
            continue
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue  # renamed or removed meanwhile
        pid = match.group(1)
        dead_writer = pid is not None and int(pid) != os.getpid() and not _pid_alive(int(pid))
        if age > STALE_TEMP_SECONDS or (dead_writer and age > DEAD_WRITER_TEMP_SECONDS):
            try:
                path.unlink()
            except OSError as exc:
                log.warning("cannot remove stale checkpoint temp file %s: %s", path, exc)
                continue
            log.info("removed stale checkpoint temp file %s (%.0fs old)", path, age)
            removed.append(path)
    return removed


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
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable ({exc})") from None
    ckpt = decode_checkpoint(data, expect, where=f"checkpoint {path}")
    ckpt.path = path
    return ckpt


def decode_checkpoint(
    data: bytes,
    expect: dict[str, Any] | None = None,
    where: str = "checkpoint",
    hint: str = "change the model settings or point training.checkpoint_dir elsewhere",
) -> Checkpoint:
    """Verify and load checkpoint bytes (a file's or a model record's); ``where`` names
    them in the :class:`CheckpointError` that a torn, flipped or foreign payload raises,
    ``hint`` says what to do about an architecture mismatch."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{where}: unreadable or corrupt ({exc})") from None
    required = ("format", "version", "architecture", "config", "metrics", "created")
    if not isinstance(payload, dict) or any(k not in payload for k in (*required, "sha256")):
        raise CheckpointError(f"{where}: not a streamlstm checkpoint")
    if payload["format"] != FORMAT:
        raise CheckpointError(f"{where}: format {payload['format']}, expected {FORMAT}")
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{where}: no weights")
    meta = {k: payload[k] for k in required}
    if _digest(state_dict, meta) != payload["sha256"]:
        raise CheckpointError(f"{where}: integrity check failed (SHA-256 mismatch)")
    arch = payload["architecture"]
    if expect is not None and arch != dict(expect):
        diff = ", ".join(
            f"{k}={arch.get(k)!r} (config: {expect.get(k)!r})"
            for k in sorted(set(arch) | set(expect))
            if arch.get(k) != expect.get(k)
        )
        raise CheckpointError(f"{where}: {ARCHITECTURE_MISMATCH}: {diff}; {hint}")
    return Checkpoint(
        path=None,
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
    architecture mismatch is raised, since it means the configuration is wrong. Temporary
    files of writers that died are removed (:func:`remove_stale_temp_files`).
    """
    remove_stale_temp_files(directory)
    for _, path in list_checkpoints(directory):
        try:
            return load_checkpoint(path, expect)
        except CheckpointError as exc:
            if ARCHITECTURE_MISMATCH in str(exc):
                raise
            log.warning("skipping %s", exc)
    return None
