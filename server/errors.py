"""Domain exceptions. Each names the bad value; `server/api/errors.py` maps them to HTTP in one place."""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error loraplex raises on purpose."""


class ModelNotFoundError(LoraplexError):
    """The base model (or its GGUF package) is not on this machine."""


class BackendError(LoraplexError):
    """A compute backend, or a combination of backends and device, that cannot run here."""


class StartupError(LoraplexError):
    """A start-up setting that cannot be used (the process exits 2, naming it)."""


class StartupAdapterError(StartupError):
    """An adapter the operator named at start (--lora-modules) cannot be registered."""


class AdapterError(LoraplexError):
    """An adapter cannot be used. `field` names the config key or tensor at fault, when there is one."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AdapterConfigError(AdapterError):
    """adapter_config.json is malformed or asks for something loraplex refuses."""


class AdapterWeightsError(AdapterError):
    """adapter_model.safetensors is malformed, pickled, or does not fit the base model."""


class AdapterNotFoundError(LoraplexError):
    """No adapter (or base model id) of that name is registered. `param`: the request field that
    named it (`model`, or `adapters` for a part of a mix given there)."""

    def __init__(self, name: str, param: str = "model") -> None:
        super().__init__(f"The model '{name}' does not exist.")
        self.name = name
        self.param = param


class RequestError(LoraplexError):
    """A generation request is invalid (bad sampling parameter, prompt too long for the context)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class MixError(RequestError):
    """A per-request adapter mix that cannot be served: a bad spelling or weight, too many or
    repeated parts, a combined rank above the limit, a part that is not plain LoRA (400)."""


class QueueFullError(LoraplexError):
    """The engine inbox is full; the client should retry later."""


class EngineDeadError(LoraplexError):
    """The engine thread stopped; no request can be served."""


class DrainingError(LoraplexError):
    """The server is shutting down: `code` "draining" refuses a new request (it may be retried on
    another replica), "drain_timeout" ends one still running when the drain timeout expired."""

    def __init__(self, message: str, code: str = "draining") -> None:
        super().__init__(message)
        self.code = code
