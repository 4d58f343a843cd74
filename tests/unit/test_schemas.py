"""schemas: the exported JSON Schema files and the request model's rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import SCHEMA_VERSION, InferenceRequest, InferenceResponse
from schemas.export import HERE, MODELS, render


def _req(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "r-1",
        "model": "digits",
        "inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}],
    }
    body.update(overrides)
    return body


def test_committed_schema_files_are_up_to_date() -> None:
    rendered = render()
    assert sorted(rendered) == sorted(f"{stem}.schema.json" for stem in MODELS)
    for name, text in rendered.items():
        path = HERE / name
        assert path.is_file(), f"{path} is missing; run `python -m schemas.export`"
        assert path.read_text() == text, (
            f"{path} is stale (it differs from the pydantic models); run `python -m schemas.export`"
        )


def test_no_stray_schema_files() -> None:
    committed = {p.name for p in HERE.glob("*.schema.json")}
    assert committed == set(render()), "run `python -m schemas.export` and remove stale files"


def test_rendered_schemas_carry_their_id_and_describe_the_models() -> None:
    rendered = render()
    request = json.loads(rendered["inference_request.schema.json"])
    response = json.loads(rendered["inference_response.schema.json"])
    assert request["$id"] == (
        f"https://inferline.dev/schemas/v{SCHEMA_VERSION}/inference_request.schema.json"
    )
    assert response["$id"].endswith(f"/v{SCHEMA_VERSION}/inference_response.schema.json")
    assert set(request["required"]) == {"id", "model", "inputs"}
    assert request["properties"]["priority"]["default"] == "normal"
    assert request["additionalProperties"] is False
    assert set(response["required"]) == {"id", "model", "status"}


def test_request_defaults() -> None:
    req = InferenceRequest.model_validate(_req())
    assert req.priority == "normal"
    assert req.version is None
    assert req.timeout_ms is None
    assert req.reply_to is None
    assert req.parameters is None
    assert req.inputs[0].parameters is None


@pytest.mark.parametrize("priority", ["high", "normal", "batch"])
def test_request_priorities(priority: str) -> None:
    assert InferenceRequest.model_validate(_req(priority=priority)).priority == priority


def _rejects(field: str, **overrides: Any) -> None:
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(_req(**overrides))
    locs = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert any(loc == field or loc.startswith(field + ".") for loc in locs), locs


@pytest.mark.parametrize("model", ["digits.v1", "a/b", "", "x" * 65, "sp ace", "caf\u00e9"])
def test_request_rejects_bad_model_names(model: str) -> None:
    _rejects("model", model=model)


@pytest.mark.parametrize("model", ["digits", "mini-lm_2", "A", "x" * 64])
def test_request_accepts_good_model_names(model: str) -> None:
    assert InferenceRequest.model_validate(_req(model=model)).model == model


@pytest.mark.parametrize("timeout_ms", [0, -1, 86_400_001])
def test_request_rejects_bad_timeout(timeout_ms: int) -> None:
    _rejects("timeout_ms", timeout_ms=timeout_ms)


def test_request_accepts_timeout_bounds() -> None:
    assert InferenceRequest.model_validate(_req(timeout_ms=1)).timeout_ms == 1
    assert InferenceRequest.model_validate(_req(timeout_ms=86_400_000)).timeout_ms == 86_400_000


@pytest.mark.parametrize("reply_to", ["a b", "a/b", "x:y", "", "t" * 250, "caf\u00e9"])
def test_request_rejects_bad_reply_to(reply_to: str) -> None:
    _rejects("reply_to", reply_to=reply_to)


def test_request_accepts_topic_names() -> None:
    req = InferenceRequest.model_validate(_req(reply_to="team-a.replies_v2"))
    assert req.reply_to == "team-a.replies_v2"


def test_request_rejects_empty_inputs() -> None:
    _rejects("inputs", inputs=[])


def test_request_rejects_missing_and_extra_fields() -> None:
    body = _req()
    del body["id"]
    with pytest.raises(ValidationError, match="id"):
        InferenceRequest.model_validate(body)
    _rejects("extra", extra=1)
    _rejects("id", id="")
    _rejects("id", id="i" * 257)
    _rejects("priority", priority="urgent")


@pytest.mark.parametrize(
    "tensor",
    [
        {"name": "", "shape": [1], "datatype": "FP32", "data": [1]},
        {"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]},
        {"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]},
        {"name": "x", "shape": [1], "datatype": "FP32"},
        {"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "extra": 1},
        {"name": "x", "shape": [1] * 17, "datatype": "FP32", "data": [1]},
    ],
    ids=["empty-name", "negative-dim", "bad-datatype", "no-data", "extra-key", "17-dims"],
)
def test_request_rejects_bad_tensors(tensor: dict[str, Any]) -> None:
    _rejects("inputs.0", inputs=[tensor])


def test_response_defaults_and_statuses() -> None:
    resp = InferenceResponse.model_validate({"id": "r", "model": "m", "status": "expired"})
    assert resp.outputs == []
    assert resp.error is None
    assert resp.timing is None
    assert resp.batch_size == 0
    assert resp.cost_usd == 0.0
    with pytest.raises(ValidationError):
        InferenceResponse.model_validate({"id": "r", "model": "m", "status": "done"})
    with pytest.raises(ValidationError):
        InferenceResponse.model_validate(
            {"id": "r", "model": "m", "status": "ok", "cost_usd": -1.0}
        )


def test_binary_data_output_is_a_flag() -> None:
    assert InferenceRequest.model_validate(_req()).binary_data_output is False
    asked = InferenceRequest.model_validate(_req(parameters={"binary_data_output": True}))
    assert asked.binary_data_output is True
    other = InferenceRequest.model_validate(_req(parameters={"job_id": "j"}))
    assert other.binary_data_output is False
    for value in ("yes", 1, None):
        with pytest.raises(ValidationError, match=f"binary_data_output must be true or false, "
                                                  f"got {value!r}"):
            InferenceRequest.model_validate(_req(parameters={"binary_data_output": value}))
