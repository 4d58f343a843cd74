"""Writes ``*.schema.json`` next to this module; ``python -m schemas.export``."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.messages import SCHEMA_VERSION, InferenceRequest, InferenceResponse

HERE = Path(__file__).resolve().parent
MODELS: dict[str, type[BaseModel]] = {
    "inference_request": InferenceRequest,
    "inference_response": InferenceResponse,
}


def render() -> dict[str, str]:
    """Return file name -> JSON text for every exported schema."""
    out: dict[str, str] = {}
    for stem, model in MODELS.items():
        schema = model.model_json_schema()
        schema["$id"] = f"https://inferline.dev/schemas/v{SCHEMA_VERSION}/{stem}.schema.json"
        out[f"{stem}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main() -> None:
    """Write the schema files."""
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
