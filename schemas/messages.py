"""InferenceRequest and InferenceResponse, as DESIGN.md fixes them.

Tensors follow the Open Inference Protocol v2: ``{name, shape, datatype, data}``
with ``data`` flat or nested in row-major order.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# The request parameter asking for numeric outputs as base64 buffers (KServe and
# Triton name their binary-output option the same).
BINARY_DATA_OUTPUT = "binary_data_output"

SCHEMA_VERSION = "1"

Datatype = Literal[
    "BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
]
DATATYPES: tuple[str, ...] = (
    "BOOL",
    "UINT8",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
)
Priority = Literal["high", "normal", "batch"]
Status = Literal["ok", "error", "expired", "rejected"]

# Model names become part of topic names, so they keep to Kafka's topic alphabet.
ModelName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
def _not_dots(name: str) -> str:
    if name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid Kafka topic name")
    return name


TopicName = Annotated[
    str,
    Field(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9._-]+$"),
    AfterValidator(_not_dots),
]


class Tensor(BaseModel):
    """One named tensor, in OIP v2 JSON form."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256, description="Input or output name.")
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        max_length=16, description="Dimensions, batch dimension first."
    )
    datatype: Datatype = Field(description="OIP v2 datatype.")
    data: list[Any] = Field(
        description="Values, flat or nested, row-major; strings for BYTES (UTF-8, or base64 "
        "when the tensor's parameters say content_type=base64). A numeric tensor with "
        "content_type=base64 holds one base64 string of its row-major little-endian buffer.",
    )
    parameters: dict[str, Any] | None = Field(default=None, description="Free-form tensor options.")


class InferenceRequest(BaseModel):
    """A request as producers write it to ``<prefix>.requests``."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        min_length=1,
        max_length=256,
        description="Caller-chosen id; echoed in the response and used as the record key.",
    )
    model: ModelName = Field(description="Registry name of the model to run.")
    version: str | None = Field(
        default=None,
        max_length=64,
        description="Model version; the registry's default when absent.",
    )
    priority: Priority = Field(default="normal", description="Lane: high, normal or batch.")
    timeout_ms: int | None = Field(
        default=None,
        gt=0,
        le=86_400_000,
        description="Deadline relative to the request record's timestamp.",
    )
    reply_to: TopicName | None = Field(
        default=None, description="Response topic; `<prefix>.responses` when absent."
    )
    inputs: list[Tensor] = Field(min_length=1, max_length=64, description="Input tensors.")
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="Free-form request options, passed through. `binary_data_output: true` "
        "asks for numeric outputs as base64 (each such output's data is one base64 string "
        "of its row-major little-endian buffer, its parameters say content_type=base64).",
    )

    @field_validator("parameters")
    @classmethod
    def _binary_data_output_is_a_flag(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        flag = (value or {}).get(BINARY_DATA_OUTPUT, False)
        if not isinstance(flag, bool):
            raise ValueError(f"{BINARY_DATA_OUTPUT} must be true or false, got {flag!r}")
        return value

    @property
    def binary_data_output(self) -> bool:
        """Whether the request asks for numeric outputs as base64 buffers."""
        return bool((self.parameters or {}).get(BINARY_DATA_OUTPUT, False))


class ErrorInfo(BaseModel):
    """Why a request did not succeed."""

    code: str = Field(
        description="INVALID_REQUEST, UNKNOWN_MODEL, INVALID_INPUT, DEADLINE_EXCEEDED, "
        "OVERLOADED or INTERNAL."
    )
    message: str = Field(description="Human-readable reason naming the key, value and limit.")


class Timing(BaseModel):
    """Where the request's time went, in milliseconds."""

    queue_ms: float = Field(description="From the request record's timestamp to the worker.")
    batch_wait_ms: float = Field(description="Waiting in the dynamic batcher for a batch to form.")
    compute_ms: float = Field(description="ONNX Runtime time of the batch this request ran in.")
    total_ms: float = Field(
        description="From the request record's timestamp to the response's production."
    )


class InferenceResponse(BaseModel):
    """A response as the pipeline writes it to the request's ``reply_to`` topic."""

    id: str = Field(description="The request's id; the record key.")
    model: str = Field(description="Model asked for (may be empty if the request was unreadable).")
    version: str | None = Field(default=None, description="Version that served (or was asked).")
    status: Status = Field(description="ok, error, expired or rejected.")
    outputs: list[Tensor] = Field(default_factory=list, description="Empty unless status is ok.")
    error: ErrorInfo | None = Field(default=None, description="Set unless status is ok.")
    timing: Timing | None = Field(default=None, description="Null for responses of the router.")
    batch_size: int = Field(default=0, ge=0, description="Members in the batch that served it.")
    cost_usd: float = Field(default=0.0, ge=0, description="This request's share of batch cost.")
    worker: str | None = Field(default=None, description="Process that produced the response.")
    execution_provider: str | None = Field(
        default=None, description="ONNX Runtime provider that computed it."
    )
