"""The one exception hierarchy of inferline.

Every error the pipeline raises on purpose derives from :class:`InferlineError`.
Each carries the wire ``code`` used in error responses and DLQ headers, and a
``retriable`` flag: retriable errors are worth trying again later (a broker that
is down), the others are a property of the input or the configuration.
"""

from __future__ import annotations

from typing import Any


class InferlineError(Exception):
    """Root of every deliberate inferline error."""

    code: str = "INTERNAL"
    retriable: bool = False

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        return self.message


def as_inferline_error(exc: BaseException, what: str) -> InferlineError:
    """``exc`` itself if it is an InferlineError, else an INTERNAL error describing it.

    Agents use this so that one record that trips an unexpected exception gets an
    answer and a DLQ record, instead of failing (and replaying) its whole batch.
    """
    if isinstance(exc, InferlineError):
        return exc
    return InferlineError(f"unexpected {type(exc).__name__} while {what}: {exc}")


class InvalidRequest(InferlineError):
    """The record is not a well-formed InferenceRequest (bad JSON, missing field, bad type)."""

    code = "INVALID_REQUEST"


class UnknownModel(InferlineError):
    """The request names a model or version the registry does not have."""

    code = "UNKNOWN_MODEL"

    def __init__(self, model: str, version: str | None, known: list[str]) -> None:
        what = f"model {model!r}" if version is None else f"model {model!r} version {version!r}"
        super().__init__(
            f"{what} is not in the registry (known: {', '.join(sorted(known)) or 'none'})",
            model=model,
            version=version,
        )
        self.model = model
        self.version = version


class InvalidInput(InferlineError):
    """A tensor does not match its datatype, shape or the model's input spec."""

    code = "INVALID_INPUT"

    def __init__(self, message: str, *, name: str | None = None, **fields: Any) -> None:
        super().__init__(message, name=name, **fields)
        self.name = name


class DeadlineExceeded(InferlineError):
    """The request's deadline passed before it could be computed."""

    code = "DEADLINE_EXCEEDED"

    def __init__(self, request_id: str, timeout_ms: int, waited_ms: float) -> None:
        super().__init__(
            f"request {request_id!r} waited {waited_ms:.1f} ms, past its timeout_ms={timeout_ms}",
            request_id=request_id,
            timeout_ms=timeout_ms,
            waited_ms=waited_ms,
        )


class Overloaded(InferlineError):
    """Admission control refused the request; trying again later may work."""

    code = "OVERLOADED"
    retriable = True


class InferenceFailed(InferlineError):
    """ONNX Runtime raised while running a batch."""

    code = "INTERNAL"

    def __init__(self, model: str, version: str, batch_size: int, cause: BaseException) -> None:
        super().__init__(
            f"model {model!r} version {version!r} failed on a batch of {batch_size}: "
            f"{type(cause).__name__}: {cause}",
            model=model,
            version=version,
            batch_size=batch_size,
        )


class RegistryError(InferlineError):
    """The model registry file is missing, unreadable or inconsistent."""

    code = "REGISTRY"


class RolloutError(InferlineError):
    """A rollout command that does not fit the model's registry entry or deployment state."""

    code = "ROLLOUT"


class ModelLoadError(InferlineError):
    """A model file could not be loaded into ONNX Runtime."""

    code = "MODEL_LOAD"


class BrokerError(InferlineError):
    """The Kafka-protocol broker could not be started or reached."""

    code = "BROKER"
    retriable = True


class ClientTimeout(InferlineError):
    """A client waited longer than its timeout for a response."""

    code = "CLIENT_TIMEOUT"
    retriable = True

    def __init__(self, request_id: str, timeout_ms: float) -> None:
        super().__init__(
            f"no response for request {request_id!r} within timeout_ms={timeout_ms:g}",
            request_id=request_id,
            timeout_ms=timeout_ms,
        )
        self.request_id = request_id
