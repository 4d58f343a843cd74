"""agents.controller without a broker: reading the copied answers it compares."""

from __future__ import annotations

import numpy as np
import orjson

from agents.controller import _values
from pipeline import codec
from schemas.messages import Tensor


def test_copied_outputs_read_the_same_in_either_encoding() -> None:
    # A canary's copy of an answer is the answer as its request asked for it.
    probs = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    as_json, as_binary = (
        Tensor.model_validate_json(orjson.dumps(
            codec.encode("probabilities", probs, binary=binary),
            option=orjson.OPT_SERIALIZE_NUMPY))
        for binary in (False, True)
    )
    assert as_binary.parameters == {"content_type": "base64"}
    assert _values(as_json).tolist() == _values(as_binary).tolist() == probs.tolist()
    assert _values(as_binary).shape == (2, 2)
