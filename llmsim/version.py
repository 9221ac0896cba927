"""What produced a result: the package version plus a digest of the sources and shipped data, and digests of the
user's files a run read.

Results record them (``config.yaml``'s ``llmsim_version`` and ``input_digests``) so that a sweep resumed after the
code, a hardware profile, the model catalog or an input file changed reruns its points instead of keeping results
the current code and inputs would not produce.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from llmsim import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
PROFILES_DIR = PACKAGE_DIR.parent / "hardware_profiles"


@lru_cache(maxsize=1)
def code_version() -> str:
    """``<version>+src.<12 hex digits>`` over every module, the catalog and the hardware profiles (the engines' CPU
    overhead profiles in ``cpu_overhead/`` among them: they had been left out, so a refitted one kept a resumed
    sweep's results)."""
    return _digest(PACKAGE_DIR, PROFILES_DIR)


def _digest(package_dir: Path, profiles_dir: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(package_dir.rglob("*.py")) + sorted(package_dir.rglob("*.yaml"))
    if profiles_dir.is_dir():
        files += sorted(profiles_dir.rglob("*.yaml"))
    for path in files:
        digest.update(str(path.relative_to(package_dir.parent)).encode())
        digest.update(path.read_bytes())
    return f"{__version__}+src.{digest.hexdigest()[:12]}"


def file_digest(path: Path) -> str:
    """``sha256:<16 hex digits>`` of a file's bytes, computed once per version of the file (its size and
    modification time) in a process: a resumed sweep checks every point's inputs."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()[:16]
