"""Run a sweep's points in parallel -- local processes by default, or a Ray cluster -- and resume after a crash.

A point is done when its folder holds ``summary.json`` and a ``config.yaml`` equal to the point's resolved config
(``run_experiment`` writes the config last), so an interrupted or crashed sweep reruns only what is missing or
changed. The resolved config includes the llmsim version and source digest (``llmsim.version``): a sweep resumed
after the code changed reruns every point.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import yaml

from llmsim.config import parse_config
from llmsim.errors import EngineAborted, LLMSimError
from llmsim.sweep.spec import Point


def point_dir(root: Path, point: Point) -> Path:
    """The point's results folder, absolute: its config.yaml records it, and a worker (a Ray task) may run in
    another working directory."""
    return Path(os.path.abspath(root / point.name))


def point_config(root: Path, point: Point) -> dict:
    """The point's resolved config as ``run_experiment`` writes it to ``config.yaml``."""
    from llmsim.run import resolved_config

    return resolved_config(point.config) | {"output_dir": str(point_dir(root, point))}


def done_summary(root: Path, point: Point) -> dict | None:
    """The summary of a point its folder already holds for the identical config; None where it must run (no
    result, another config, or files that no longer read: such a point runs again, as an unfinished one does)."""
    folder = point_dir(root, point)
    summary, config = folder / "summary.json", folder / "config.yaml"
    if not (summary.exists() and config.exists() and (folder / "requests.parquet").exists()):
        return None
    try:
        if yaml.safe_load(config.read_text(encoding="utf-8")) != point_config(root, point):
            return None
        done = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError):
        return None
    return done if isinstance(done, dict) else None


def run_point(config_json: dict, folder: str) -> dict:
    """One point in a worker process (or Ray task): returns the summary, or an ``error`` entry."""
    from llmsim.run import run_experiment

    try:
        cfg = parse_config(config_json, folder)
        _, summary = run_experiment(cfg, output_dir=Path(folder))
        return summary
    except LLMSimError as exc:  # a plan that does not fit is a result of the sweep, not a crash
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "error.txt").write_text(str(exc))
        # An engine that stopped under this load (its swap space full) missed the SLO here; the plan itself runs.
        return {"error": str(exc), **({"engine_aborted": True} if isinstance(exc, EngineAborted) else {})}


def _job(root: Path, point: Point) -> tuple[dict, str]:
    return point_config(root, point), str(point_dir(root, point))


@contextmanager
def folder_lock(root: Path):
    """One sweep or plan at a time in ``root``: a second one refuses instead of interleaving its writes. A lock
    left by a process that no longer runs (killed) is taken over."""
    root.mkdir(parents=True, exist_ok=True)
    lock = root / ".llmsim.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise LLMSimError(f"{root} is in use by another llmsim sweep or plan (process {pid}); wait for it "
                                  f"or use another output folder") from None
            lock.unlink(missing_ok=True)  # stale
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_points(root: Path, points: list[Point], executor: str = "local", workers: int | None = None,
               address: str | None = None, on_done: Callable[[Point, dict], None] | None = None) -> dict[int, dict]:
    """Summaries by point index; finished points are read back, not rerun. Holds ``root``'s lock."""
    with folder_lock(root):
        return execute_points(root, points, executor, workers, address, on_done)


def execute_points(root: Path, points: list[Point], executor: str, workers: int | None, address: str | None,
                   on_done: Callable[[Point, dict], None] | None) -> dict[int, dict]:
    """``run_points`` without taking the lock (for a caller that holds it across several calls)."""
    results: dict[int, dict] = {}
    todo = []
    for point in points:
        done = done_summary(root, point)
        if done is not None:
            results[point.index] = done
            if on_done:
                on_done(point, done)
        else:
            todo.append(point)
    if not todo:
        return results
    if executor == "ray":
        results.update(_run_ray(root, todo, address, on_done))
        return results
    # No more processes than points: with fork, the pool starts every worker at once (--workers 1000 had
    # forked a thousand processes for a sixteen-point sweep).
    workers = min(workers or max(1, (os.cpu_count() or 1)), len(todo))
    if workers == 1:
        for point in todo:
            results[point.index] = run_point(*_job(root, point))
            if on_done:
                on_done(point, results[point.index])
        return results
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(run_point, *_job(root, p)): p for p in todo}
        for future in as_completed(futures):
            point = futures[future]
            results[point.index] = future.result()
            if on_done:
                on_done(point, results[point.index])
    except KeyboardInterrupt:
        # Stop the workers now: queued points never start, running ones leave no config.yaml behind.
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        print(f"llmsim: {len(results)} of {len(points)} points finished in {root}", file=sys.stderr)
        raise
    pool.shutdown()
    return results


def start_executor(executor: str, workers: int | None, address: str | None) -> None:
    """Check the executor's options and start Ray (or reach its cluster) now, so that a cluster that cannot be
    reached is one error before any output folder is made (it had been Ray's ConnectionError traceback, an empty
    folder left behind). An option of the other executor is an error, not ignored."""
    if executor != "ray":
        if address is not None:
            raise LLMSimError(f"--address {address}: names a Ray cluster; it needs --executor ray")
        return
    if workers is not None:
        raise LLMSimError("--workers: the local executor's processes; with --executor ray the cluster places the "
                          "points")
    _ray_init(address)


def _ray_init(address: str | None):
    try:
        import ray
    except ImportError:
        raise LLMSimError("--executor ray needs Ray: pip install -e '.[ray]'") from None
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f" at --address {address}" if address else ""
        raise LLMSimError(f"--executor ray: cannot start or reach a Ray cluster{where}: {exc}") from None
    return ray


def _run_ray(root: Path, todo: list[Point], address: str | None, on_done) -> dict[int, dict]:
    ray = _ray_init(address)
    remote = ray.remote(run_point)
    refs = {remote.remote(*_job(root, p)): p for p in todo}
    results = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        point = refs[done[0]]
        results[point.index] = ray.get(done[0])
        if on_done:
            on_done(point, results[point.index])
    return results
