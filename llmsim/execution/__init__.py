"""The execution model: a batch of scheduled tokens -> iteration time, FLOPs and bytes."""

from llmsim.execution.model import ExecutionModel, IterationCost, ParallelPlan

__all__ = ["ExecutionModel", "IterationCost", "ParallelPlan"]
