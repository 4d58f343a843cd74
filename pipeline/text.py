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


# Planning sub-batches: the cost of running n rows padded to L tokens, in token units.
# Per token, attention grows with L (4 L d multiply-adds against ~9 d^2 for the
# projections and feed-forward at d = 384, so L / 2300 of them); each extra ORT run
# costs about as much as a few dozen tokens.
_ATTENTION_TOKENS = 2300.0
_RUN_OVERHEAD_TOKENS = 48.0


def _padded_cost(rows: int, width: int) -> float:
    return rows * width * (1.0 + width / _ATTENTION_TOKENS) + _RUN_OVERHEAD_TOKENS


def plan_chunks(lengths: Sequence[int]) -> list[list[int]]:
    """Split a batch into sub-batches of similar length, to waste little on padding.

    Rows are sorted by token count and cut into contiguous groups that minimise the
    padded cost (rows x longest, plus a fixed cost per run): a batch of short texts
    stays one run, while one long text among short ones gets its own run instead of
    padding every short one to its length. Returns row indices per sub-batch, in
    order of length, each in the rows' original order (so a batch kept whole is just
    ``range(n)``); exact dynamic programming, O(n^2) for n rows (n <= a few hundred).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    if n <= 1:
        return [order] if order else []
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[order[j - 1]]  # the longest of rows i..j-1 (sorted)
        for i in range(j):
            cost = best[i] + _padded_cost(j - i, width)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return chunks[::-1]


class TextEncoder:
    """Turns texts into ``input_ids`` and ``attention_mask`` (int64 [N, L]).

    ``L`` is the longest tokenized text of a (sub-)batch, at most ``max_seq_len``
    (the ``[CLS]`` and ``[SEP]`` tokens included). Meant to be used from the one
    thread that runs the model.
    """

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int) -> None:
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} must be >= 2 ([CLS] and [SEP])")
        self.max_seq_len = max_seq_len
        # The file's own truncation and fixed-length padding (128 for MiniLM) are
        # replaced: the registry's max_seq_len rules, and padding is done here, per
        # sub-batch, to its longest text.
        tokenizer.enable_truncation(max_length=max_seq_len)
        tokenizer.no_padding()
        pad_id = tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else pad_id
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

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included, truncated, unpadded."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]

    def pad(self, ids: Sequence[Sequence[int]]) -> dict[str, npt.NDArray[np.int64]]:
        """``input_ids`` and ``attention_mask`` of ``ids``, padded to the longest."""
        width = max((len(row) for row in ids), default=0)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def encode_texts(self, texts: Sequence[str]) -> dict[str, npt.NDArray[np.int64]]:
        """Token ids and attention mask of ``texts`` as one batch, padded to the longest."""
        return self.pad(self.tokenize(texts))

    def encode(self, array: npt.NDArray[Any]) -> dict[str, npt.NDArray[np.int64]]:
        """Like :meth:`encode_texts`, for a BYTES array of shape [N]."""
        return self.encode_texts(as_texts(array))

    def encode_chunks(
        self, array: npt.NDArray[Any]
    ) -> list[tuple[list[int], dict[str, npt.NDArray[np.int64]]]]:
        """A BYTES array [N] as sub-batches of similar length (see :func:`plan_chunks`).

        Returns ``(row indices, feeds)`` per sub-batch; every row is in exactly one.
        """
        ids = self.tokenize(as_texts(array))
        return [
            (rows, self.pad([ids[i] for i in rows]))
            for rows in plan_chunks([len(x) for x in ids])
        ]

    def token_ids(self, text: str) -> list[int]:
        """The ids of one text, with special tokens and truncation, without padding."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)
