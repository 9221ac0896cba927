"""User-facing errors. The CLI prints these as one clear message, never a traceback."""


class LLMSimError(Exception):
    """Base class for mistakes in user input (configs, traces, plans)."""


class ConfigError(LLMSimError):
    """A config value is wrong; the message names its YAML path and the allowed values."""


class TraceError(LLMSimError):
    """A trace row is malformed; the message names the file and the line."""


class PlanError(LLMSimError):
    """A parallel plan cannot run, e.g. the weights plus the minimum KV cache do not fit."""


class EngineAborted(PlanError):
    """The simulated engine stopped where the real one would (vLLM v0 with its CPU swap space full). ``at_s``: the
    simulated time, so that the earliest of several replicas' aborts is the one reported."""

    def __init__(self, message: str, at_s: float = float("nan")):
        super().__init__(message)
        self.at_s = at_s

    def __reduce__(self):  # pickled from a worker process with its time
        return type(self), (str(self), self.at_s)


def validation_error_loc(err: dict) -> tuple:
    """Where one of pydantic's errors points, as a path of keys: for an error a model raised about one of its keys
    (an unknown key, a boolean given for a number), through that key (``ctx["key"]``)."""
    key = (err.get("ctx") or {}).get("key")
    if key is not None and err["type"] in ("unknown_key", "bool_number"):
        return (*err["loc"], key)
    return tuple(err["loc"])
