"""Model specs: the shapes that decide cost."""

from llmsim.models.spec import ModelSpec, load_model

__all__ = ["ModelSpec", "load_model"]
