"""Message contract of inferline: pydantic models and their exported JSON Schemas."""

from schemas.messages import (
    DATATYPES,
    SCHEMA_VERSION,
    ErrorInfo,
    InferenceRequest,
    InferenceResponse,
    Priority,
    Status,
    Tensor,
    Timing,
)

__all__ = [
    "DATATYPES",
    "SCHEMA_VERSION",
    "ErrorInfo",
    "InferenceRequest",
    "InferenceResponse",
    "Priority",
    "Status",
    "Tensor",
    "Timing",
]
