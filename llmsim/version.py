"""What code produced a result: the package version plus a digest of the sources and shipped data.

Results record it (``config.yaml``'s ``llmsim_version``) so that a sweep resumed after the code, a hardware
profile or the model catalog changed reruns its points instead of keeping results the current code would not
produce.
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
    """``<version>+src.<12 hex digits>`` over every module, the catalog and the hardware profiles."""
    digest = hashlib.sha256()
    files = sorted(PACKAGE_DIR.rglob("*.py")) + sorted(PACKAGE_DIR.rglob("*.yaml"))
    if PROFILES_DIR.is_dir():
        files += sorted(PROFILES_DIR.glob("*.yaml"))
    for path in files:
        digest.update(str(path.relative_to(PACKAGE_DIR.parent)).encode())
        digest.update(path.read_bytes())
    return f"{__version__}+src.{digest.hexdigest()[:12]}"
