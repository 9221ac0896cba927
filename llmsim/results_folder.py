"""Write a results folder complete or absent, never mixed."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from llmsim.errors import ConfigError


def write_folder(out: Path, files: dict[str, Callable[[Path], None]], marker: str, stale: Iterable[str] = (),
                 setting: str = "output_dir") -> None:
    """Write each of ``files`` (name -> a function writing that file at the path it is given) into ``out``.
    Each is written beside its place under a temporary name (ending in its own, so that writers which read the
    format from the suffix still do) and renamed into place once all are written. ``marker`` is the file that
    says the folder is done (what a resumed sweep checks, or a script reads): it is removed first and renamed
    last, so a writer killed half-way leaves the folder without it. ``stale``: files an earlier run may have left
    that this one does not write, removed too. A failed write (a disk that filled up) is a ``ConfigError``
    naming ``setting``, what the user chose the folder with."""
    try:
        _write(out, files, marker, stale)
    except OSError as exc:
        raise ConfigError(f"{setting}: writing the results to {out} failed: {exc.strerror}") from None


def _write(out: Path, files: dict[str, Callable[[Path], None]], marker: str, stale: Iterable[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / marker).unlink(missing_ok=True)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    staged: dict[str, Path] = {}
    try:
        for name, write in files.items():
            tmp = staged[name] = out / f".tmp-{os.getpid()}-{name}"
            write(tmp)
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    for name in sorted(staged, key=lambda n: n == marker):  # the marker last
        os.replace(staged[name], out / name)


def first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet: what creating ``path`` creates."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


@contextmanager
def removed_if_left_empty(out: Path, made: Path | None) -> Iterator[None]:
    """Work meant for ``out``, a folder created for it from ``made`` (``first_missing`` before; None: it existed):
    if the work fails or is interrupted, the folders created for it go again while empty, so a run stopped by a
    bad input or Ctrl-C leaves no empty results folder behind."""
    try:
        yield
    except BaseException:
        if made is not None:
            for folder in (out, *out.parents):
                try:
                    folder.rmdir()
                except OSError:  # not empty (or gone): leave it and its parents
                    break
                if folder == made:
                    break
        raise
