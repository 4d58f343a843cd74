"""Text inputs: UTF-8 checks and tokenization into the integer tensors a text model takes.

A model version whose registry entry says ``preprocess = "tokenize"`` declares a
BYTES input (one UTF-8 string per row) while its ONNX graph takes ``input_ids`` and
``attention_mask``. :class:`TextEncoder` bridges the two with the ``tokenizers``
library reading the model's own ``tokenizer.json``: truncation at the version's
``max_seq_len`` and padding to the longest text of the batch, so a batch of short
texts costs what short texts cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from pipeline.errors import InvalidInput, ModelLoadError

# The feeds a tokenized text model's graph takes, and their ONNX Runtime types.
FEEDS: dict[str, str] = {"input_ids": "tensor(int64)", "attention_mask": "tensor(int64)"}

# Real sentences of varied length (1 to ~60 tokens), for warming a text model up on
# the shapes it will meet rather than on empty strings.
WARMUP_TEXTS: tuple[str, ...] = (
    "Hello!",
    "How do I reset my password?",
    "The stock market fell sharply on Monday after the central bank's announcement.",
    "A man is playing a guitar on the corner of the street.",
    "Kafka topics carry requests to workers that batch them before running the model.",
    "ok",
    "Café au lait, s'il vous plaît.",
    "Photosynthesis converts light energy into chemical energy, which plants store as "
    "sugars; the oxygen we breathe is released as a by-product of splitting water "
    "molecules in the chloroplasts of leaves during the light-dependent reactions.",
    "What time does the train to Berlin leave tomorrow morning?",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "Please summarise the attached quarterly report in three bullet points.",
    "The cat sleeps on the warm windowsill.",
)


def check_utf8(name: str, array: npt.NDArray[Any]) -> None:
    """Raise :class:`InvalidInput` unless every element of ``array`` is UTF-8 text."""
    for i, item in enumerate(array.reshape(-1).tolist()):
        if isinstance(item, bytes | bytearray):
            try:
                bytes(item).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"input {name!r} element {i} is not valid UTF-8 text "
                    f"(byte {exc.start}: {exc.reason})",
                    name=name,
                ) from None
        elif not isinstance(item, str):
            raise InvalidInput(
                f"input {name!r} element {i} is {type(item).__name__}, expected UTF-8 text",
                name=name,
            )


def as_texts(array: npt.NDArray[Any]) -> list[str]:
    """The elements of a BYTES (object) or string array as Python strings."""
    return [
        bytes(x).decode("utf-8") if isinstance(x, bytes | bytearray) else str(x)
        for x in array.reshape(-1).tolist()
    ]


def sample_texts(n: int, *, offset: int = 0) -> npt.NDArray[np.object_]:
    """``n`` warmup sentences (cycling through :data:`WARMUP_TEXTS`) as a BYTES array."""
    out = np.empty(n, dtype=object)
    out[:] = [
        WARMUP_TEXTS[(offset + i) % len(WARMUP_TEXTS)].encode("utf-8") for i in range(n)
    ]
    return out


class TextEncoder:
    """Turns a batch of texts into ``input_ids`` and ``attention_mask`` (int64 [N, L]).

    ``L`` is the longest tokenized text of the batch, at most ``max_seq_len`` (the
    ``[CLS]`` and ``[SEP]`` tokens included). Not thread-safe in configuration, but
    :meth:`encode` may be called from the one thread that runs the model.
    """

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int) -> None:
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} must be >= 2 ([CLS] and [SEP])")
        self.max_seq_len = max_seq_len
        # The file's own truncation and fixed-length padding (128 for MiniLM) are
        # replaced: the registry's max_seq_len rules, and padding stops at the batch's
        # longest text.
        tokenizer.enable_truncation(max_length=max_seq_len)
        pad_id = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_padding(
            pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]", length=None
        )
        self._tok = tokenizer

    @classmethod
    def load(cls, path: Path, *, max_seq_len: int, sha256: str | None = None) -> TextEncoder:
        """Read ``tokenizer.json``, checking its digest when one is given.

        Raises :class:`ModelLoadError` when the file is missing, altered or unreadable.
        """
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(
                f"tokenizer file {str(path)!r} cannot be read: {exc}", path=str(path)
            ) from exc
        if sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256.lower():
                raise ModelLoadError(
                    f"tokenizer file {str(path)!r} has sha256 {actual}, but the registry "
                    f"expects {sha256}; rebuild or re-register it",
                    path=str(path),
                    expected=sha256,
                    actual=actual,
                )
        try:
            tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:
            raise ModelLoadError(
                f"tokenizer file {str(path)!r} is not a tokenizers JSON file: {exc}",
                path=str(path),
            ) from exc
        return cls(tokenizer, max_seq_len)

    def encode_texts(self, texts: Sequence[str]) -> dict[str, npt.NDArray[np.int64]]:
        """Token ids and attention mask of ``texts``, padded to the longest."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=True)
        n = len(encodings)
        width = len(encodings[0].ids) if n else 0
        ids = np.empty((n, width), dtype=np.int64)
        mask = np.empty((n, width), dtype=np.int64)
        for i, e in enumerate(encodings):
            ids[i] = e.ids
            mask[i] = e.attention_mask
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, array: npt.NDArray[Any]) -> dict[str, npt.NDArray[np.int64]]:
        """Like :meth:`encode_texts`, for a BYTES array of shape [N]."""
        return self.encode_texts(as_texts(array))

    def token_ids(self, text: str) -> list[int]:
        """The ids of one text, with special tokens and truncation, without padding."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)
