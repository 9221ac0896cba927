"""User-facing errors. The CLI prints these as one clear message, never a traceback."""


class LLMSimError(Exception):
    """Base class for mistakes in user input (configs, traces, plans)."""


class ConfigError(LLMSimError):
    """A config value is wrong; the message names its YAML path and the allowed values."""


class TraceError(LLMSimError):
    """A trace row is malformed; the message names the file and the line."""


class PlanError(LLMSimError):
    """A parallel plan cannot run, e.g. the weights plus the minimum KV cache do not fit."""
