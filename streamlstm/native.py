"""The package's C code, compiled on first use: the engine's fused step
(``fused_step.c``, :mod:`streamlstm.fused`) and the state store's key table
(``key_table.c``, :mod:`streamlstm.keyindex`), one shared library.

It is built with the system's C compiler (``$CC``, else ``cc``) into a cache folder
(``$STREAMLSTM_CACHE``, else ``~/.cache/streamlstm``), once per source version, in about
a second. Without a compiler, or if anything about building or loading fails,
:func:`load` says why in the log and returns None, and the callers run their Python
paths: the daemon never depends on a compiler. (A float16 state needs the compiler's
``_Float16``: GCC 12 or clang 15 on x86-64, any recent one on ARM.)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("fused_step.c", "key_table.c"))
# Built where it runs (-march=native: its vector units; the cache key names the CPU). No
# contraction of a * b + c beyond the explicit fmaf in the exponential's polynomial, so the
# statistics round as torch's do; -fno-trapping-math only lets the loops vectorise.
FLAGS: tuple[str, ...] = ("-O3", "-std=c99", "-shared", "-fPIC", "-march=native")
FLAGS += ("-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math")
_library: ctypes.CDLL | None = None
_failure: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("STREAMLSTM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "streamlstm"


def _cpu() -> str:
    """What ``-march=native`` builds for: a library built on another CPU (a shared home
    folder) is never loaded here."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc, $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, "-o", str(built), *map(str, SOURCES), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except OSError as exc:  # not the folder's fault: no temporary folder will help
            raise RuntimeError(f"cannot run {compiler}: {exc}") from exc
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")
        os.replace(built, target)  # atomic: a concurrent process sees all of it or none


def load() -> ctypes.CDLL | None:
    """The compiled library (built once per source version), or None if it cannot be
    built or loaded here (logged once; the callers then run their Python paths)."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    try:
        spec = b"".join(s.read_bytes() for s in SOURCES)
        spec += repr((FLAGS, platform.machine(), _cpu())).encode()
        name = f"streamlstm-{hashlib.sha256(spec).hexdigest()[:16]}.so"
        target = _cache_dir() / name
        if not target.exists():
            try:
                _build(target)
            except OSError:  # the cache folder cannot be written: a private temporary one
                target = Path(tempfile.mkdtemp(prefix="streamlstm-")) / name
                _build(target)
        _library = ctypes.CDLL(str(target))
    except Exception as exc:  # any failure: the Python paths, never a dead daemon
        _failure = f"{type(exc).__name__}: {exc}"
        log.warning("C kernels unavailable, running the plain Python paths: %s", _failure)
    return _library


def declare(lib: ctypes.CDLL, signatures: dict[str, str], returns: set[str]) -> None:
    """Set the argument types of ``lib``'s functions: per function a string of I (an
    int64) and P (an address); those in ``returns`` return an int64, the others nothing.
    Plain ints in: no ctypes object made per argument."""
    kinds = {"I": ctypes.c_int64, "P": ctypes.c_void_p}
    for name, args in signatures.items():
        function = getattr(lib, name)
        function.argtypes = [kinds[a] for a in args]
        function.restype = ctypes.c_int64 if name in returns else None
