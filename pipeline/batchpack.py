"""Packing a batch job's rows into multi-row requests, and splitting their answers.

Every request costs the job's client, the broker and the worker's intake and answer
a fixed amount on top of its rows (encoding, a record, a decode, a response), which
for a small model is most of a row's cost, and which the interactive traffic beside
a job pays for in CPU. A job therefore sends consecutive rows of the same inputs
(names, datatypes and per-row shapes) as one request of up to ``rows_per_request``
rows, the batch dimension first, and splits the answer back into one result per
row. Rows that cannot share a request (other shapes, say) go in one of their own.

Plain data handling, no I/O: :class:`~pipeline.batchjob.BatchJob` sends the packs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.batchio import BatchRow

# A row's tensors as row_tensors gives them: name, shape (batch of one first),
# datatype and flat data.
RowTensors = list[dict[str, Any]]
PackKey = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Pack:
    """Consecutive rows sent as one request; ``rows[i]`` is row ``i`` of its batch."""

    rows: tuple[BatchRow, ...]
    tensors: tuple[RowTensors, ...]

    @property
    def size(self) -> int:
        """Rows in the pack."""
        return len(self.rows)

    def alone(self) -> tuple[Pack, ...]:
        """Each of the pack's rows as a pack of its own."""
        return tuple(Pack((row,), (t,)) for row, t in zip(self.rows, self.tensors, strict=True))

    def request_id(self, job_id: str) -> str:
        """The pack's request id: its first row's id when alone, else job and position.

        A lone row keeps its own id, as a job that packs nothing sends it. A pack's id
        names the job and its first row's index, which are unique within the job and
        fit a request id whatever the rows' own ids are.
        """
        if self.size == 1:
            return self.rows[0].id
        return f"{job_id}.rows-{self.rows[0].index:08d}-{self.size}"

    def inputs(self) -> RowTensors:
        """The pack's input tensors: each row's tensors stacked on the batch dimension."""
        if self.size == 1:
            return self.tensors[0]
        merged: RowTensors = []
        for k, first in enumerate(self.tensors[0]):
            data: list[Any] = []
            for row in self.tensors:
                data.extend(row[k]["data"])
            merged.append({"name": first["name"], "datatype": first["datatype"],
                           "shape": [self.size, *_per_row(first["shape"])], "data": data})
        return merged


def pack_key(tensors: RowTensors) -> PackKey:
    """What rows must share to go in one request: each input's name, datatype, row shape."""
    return tuple((t["name"], t["datatype"], tuple(_per_row(t["shape"]))) for t in tensors)


def packs(rows: Iterable[tuple[BatchRow, RowTensors]], rows_per_request: int) -> Iterator[Pack]:
    """Consecutive rows of the same :func:`pack_key`, at most ``rows_per_request`` a pack.

    Packs keep the rows' order, so that answers come back roughly in input order.
    """
    if rows_per_request < 1:
        raise ValueError(f"rows_per_request must be at least 1, got {rows_per_request}")
    batch: list[BatchRow] = []
    tensors: list[RowTensors] = []
    key: PackKey | None = None
    for row, row_tensors in rows:
        this = pack_key(row_tensors)
        if batch and (this != key or len(batch) >= rows_per_request):
            yield Pack(tuple(batch), tuple(tensors))
            batch, tensors = [], []
        batch.append(row)
        tensors.append(row_tensors)
        key = this
    if batch:
        yield Pack(tuple(batch), tuple(tensors))


def split_outputs(outputs: Sequence[Mapping[str, Any]], rows: int) -> list[list[dict[str, Any]]]:
    """Each row's outputs, as a one-row request's answer would hold them.

    ``outputs`` are the pack's answer tensors (batch dimension first, of ``rows``);
    row ``i`` gets the ``i``-th slice of each, with a batch dimension of one.
    Raises ValueError when an output's batch dimension or data do not fit ``rows``.
    """
    split: list[list[dict[str, Any]]] = [[] for _ in range(rows)]
    for t in outputs:
        shape = list(t.get("shape") or [])
        data = t.get("data")
        # A numpy array (binary_data_output, decoded) is sliced as it is: no list of
        # numpy scalars, thousands of them for a pack's embeddings.
        data = data if isinstance(data, np.ndarray) else list(data or [])
        if not shape or shape[0] != rows:
            raise ValueError(f"output {t.get('name')!r} has shape {shape}, not {rows} rows first")
        per_row = math.prod(shape[1:])
        if per_row * rows != len(data):
            raise ValueError(f"output {t.get('name')!r} of shape {shape} holds {len(data)} "
                             f"values, not {per_row * rows}")
        for i in range(rows):
            split[i].append({"name": t.get("name"), "datatype": t.get("datatype"),
                             "shape": [1, *shape[1:]],
                             "data": data[i * per_row:(i + 1) * per_row]})
    return split


def _per_row(shape: Sequence[int]) -> list[int]:
    # row_tensors gives a scalar text the shape [1] and everything else [1, *dims].
    return list(shape[1:])
