"""Workloads: lazy streams of requests from arrival processes and length distributions, or trace replay."""

from llmsim.workload.build import build_workload

__all__ = ["build_workload"]
