"""Replica schedulers (pure policy): given the queues and the KV cache, pick the next batch."""

from llmsim.schedulers.base import PrefillChunk, Scheduler, SchedulerOutput
from llmsim.schedulers.fcfs import FCFSScheduler
from llmsim.schedulers.sarathi import SarathiScheduler
from llmsim.schedulers.vllm_v1 import VLLMV1Scheduler

SCHEDULERS = {"vllm_v1": VLLMV1Scheduler, "fcfs": FCFSScheduler, "sarathi": SarathiScheduler}  # policies a YAML names; decode.py is DistServe-internal

__all__ = ["SCHEDULERS", "FCFSScheduler", "PrefillChunk", "SarathiScheduler", "Scheduler", "SchedulerOutput", "VLLMV1Scheduler"]
