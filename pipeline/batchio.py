"""Files of a batch job: input rows in, result records out, in input order.

Input (JSON Lines, ``.jsonl``/``.ndjson``/``.json``, or Parquet, ``.parquet``/``.pq``):
one request's inputs per row, in one of three forms.

- ``{"id": "a1", "inputs": {"input": [64 numbers]}}``: inputs by name;
- ``{"id": "a1", "input": [64 numbers]}``: a column per input (every key but ``id``);
- ``[64 numbers]`` or ``"a text"`` (JSON Lines only): the value of the model's only input.

``id`` is optional; a row without one gets :func:`derive_row_id` of the job id and
its index (its position among the non-blank rows, from 0), so that a rerun derives
the same ids. A row's value is one item of the batch: the worker gets a tensor of
shape ``[1, *value's shape]`` (``[1]`` for a text or a number).

Output (JSON Lines or Parquet, by extension): one record per input row, in input
order, with ``index``, ``id``, ``job_id``, ``status``, ``outputs`` (``{name: value}``
without the batch dimension, so a label is a number and an embedding a list),
``error`` (``{code, message}`` or null), ``model``, ``version``, ``cost_usd`` and
``latency_ms``. Records are appended to a JSON Lines journal as the completed prefix
grows: the output itself for JSON Lines, ``<output>.partial.jsonl`` for Parquet,
converted to Parquet when the job ends. A rerun reads both to skip the ids done.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.errors import InvalidRequest
from pipeline.registry import TensorSpec

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
JOURNAL_SUFFIX = ".partial.jsonl"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_ROW_ID_CHARS = 256
_PARQUET_ROWS_PER_READ = 4096


@dataclass(frozen=True)
class BatchRow:
    """One input row: its position, its id, and its inputs or why it has none."""

    index: int
    id: str
    inputs: dict[str, Any] | None = None
    error: tuple[str, str] | None = None


def file_format(path: Path) -> str:
    """``"jsonl"`` or ``"parquet"`` from the file's extension; InvalidRequest otherwise."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise InvalidRequest(
        f"cannot tell the format of {str(path)!r} from its extension {suffix!r} "
        f"(JSON Lines: {', '.join(JSONL_SUFFIXES)}; Parquet: {', '.join(PARQUET_SUFFIXES)})"
    )


def default_job_id(input_path: Path, model: str) -> str:
    """A job id that is the same for every run on the same input file and model."""
    digest = hashlib.sha256(f"{input_path.resolve()}\0{model}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", input_path.stem).strip("-.")[:40] or "job"
    return f"{stem}-{digest}"


def check_job_id(job_id: str) -> str:
    """``job_id`` if it is usable as a file name, a record key and an id prefix."""
    if not JOB_ID_RE.match(job_id):
        raise InvalidRequest(
            f"job id {job_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-'",
            job_id=job_id,
        )
    return job_id


def derive_row_id(job_id: str, index: int) -> str:
    """The id of a row that has none: stable across reruns of the same job."""
    return f"{job_id}-{index:08d}"


# --------------------------------------------------------------------------- input


def count_rows(path: Path) -> int:
    """Rows in an input file (blank JSON Lines lines do not count)."""
    if file_format(path) == "parquet":
        pq = _pyarrow_parquet()
        return int(pq.ParquetFile(path).metadata.num_rows)
    count = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                count += 1
    return count


def read_rows(
    path: Path, job_id: str, input_names: Iterable[str] | None = None
) -> Iterator[BatchRow]:
    """The rows of ``path`` in order; a malformed row comes with its error, not raised.

    ``input_names`` (the model's inputs, when known) resolves bare values and
    rejects columns the model does not have.
    """
    names = list(input_names) if input_names is not None else None
    if file_format(path) == "parquet":
        objects: Iterator[tuple[Any, str | None]] = _parquet_objects(path)
    else:
        objects = _jsonl_objects(path)
    for index, (obj, parse_error) in enumerate(objects):
        if parse_error is not None:
            yield BatchRow(index, derive_row_id(job_id, index), error=(
                "INVALID_REQUEST", parse_error))
            continue
        yield _row(index, obj, job_id, names)


def _jsonl_objects(path: Path) -> Iterator[tuple[Any, str | None]]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield orjson.loads(line), None
            except orjson.JSONDecodeError as exc:
                yield None, f"line {lineno} of {path.name} is not JSON: {exc}"


def _parquet_objects(path: Path) -> Iterator[tuple[Any, str | None]]:
    pq = _pyarrow_parquet()
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_ROWS_PER_READ):
        for obj in batch.to_pylist():
            yield obj, None


def _row(index: int, obj: Any, job_id: str, names: list[str] | None) -> BatchRow:
    fallback_id = derive_row_id(job_id, index)
    if not isinstance(obj, dict):
        if names is not None and len(names) == 1:
            return BatchRow(index, fallback_id, {names[0]: obj})
        what = f"the model's inputs are {names}" if names else "the model's inputs are not known"
        return BatchRow(index, fallback_id, error=(
            "INVALID_REQUEST",
            f"row {index} is a bare {type(obj).__name__}, which needs a model with exactly "
            f"one input ({what}); write {{\"inputs\": {{name: value}}}} instead",
        ))
    raw_id = obj.get("id")
    if raw_id is None:
        row_id = fallback_id
    elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool) and str(raw_id):
        row_id = str(raw_id)
    else:
        return BatchRow(index, fallback_id, error=(
            "INVALID_REQUEST", f"row {index}: id {raw_id!r} is not a non-empty string or integer"))
    if len(row_id) > MAX_ROW_ID_CHARS:
        return BatchRow(index, fallback_id, error=(
            "INVALID_REQUEST",
            f"row {index}: id is {len(row_id)} characters, over the limit {MAX_ROW_ID_CHARS}"))
    if "inputs" in obj and (names is None or "inputs" not in names):
        inputs = obj["inputs"]
        if not isinstance(inputs, dict) or not inputs:
            return BatchRow(index, row_id, error=(
                "INVALID_REQUEST", f"row {index}: 'inputs' must be a non-empty object of "
                f"input name to value, got {type(inputs).__name__}"))
    else:
        inputs = {k: v for k, v in obj.items() if k != "id"}
        if not inputs:
            return BatchRow(index, row_id, error=(
                "INVALID_REQUEST", f"row {index} has no inputs (only an id)"))
    if names is not None:
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            return BatchRow(index, row_id, error=(
                "INVALID_REQUEST",
                f"row {index}: {unknown} are not inputs of the model (inputs: {names})"))
    return BatchRow(index, row_id, dict(inputs))


def row_tensors(
    inputs: Mapping[str, Any], specs: Mapping[str, TensorSpec] | None = None
) -> list[dict[str, Any]]:
    """OIP tensors of one row: each value becomes a batch of one.

    The datatype comes from the model's spec when known; otherwise text is BYTES,
    booleans BOOL and numbers FP32. Shapes are the value's own (the pipeline checks
    them against the model), so a row of the wrong length gets the pipeline's error.
    """
    tensors: list[dict[str, Any]] = []
    for name, value in inputs.items():
        spec = specs.get(name) if specs is not None else None
        datatype = spec.datatype if spec is not None else _guess_datatype(value)
        if datatype == "BYTES":
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in items):
                raise InvalidRequest(f"input {name!r} is BYTES: give text, got {value!r:.80}",
                                     name=name)
            tensors.append({"name": name, "shape": [1, len(items)] if isinstance(value, list)
                            else [1], "datatype": "BYTES", "data": items})
            continue
        try:
            arr = np.asarray(value, dtype=np.float64 if datatype.startswith("FP") else None)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"input {name!r} is not a rectangular array of numbers: {exc}",
                                 name=name) from exc
        if arr.dtype.kind not in "biuf":
            raise InvalidRequest(f"input {name!r} holds {arr.dtype} values, not numbers",
                                 name=name)
        data = arr.reshape(-1).tolist()
        tensors.append({"name": name, "shape": [1, *arr.shape], "datatype": datatype,
                        "data": data})
    return tensors


def _guess_datatype(value: Any) -> str:
    probe = value
    while isinstance(probe, list) and probe:
        probe = probe[0]
    if isinstance(probe, str):
        return "BYTES"
    if isinstance(probe, bool):
        return "BOOL"
    return "FP32"


def output_value(tensor: Mapping[str, Any]) -> Any:
    """One response output without its batch dimension of one (a scalar for shape [1])."""
    shape = list(tensor.get("shape") or [])
    data = tensor.get("data")
    if isinstance(data, np.ndarray):  # decoded from base64 (binary_data_output)
        if shape and shape[0] == 1:
            return data.reshape(shape[1:]) if len(shape) > 1 else data.reshape(-1)[0]
        return data
    data = data or []
    if shape and shape[0] == 1:
        if len(shape) == 1:
            return data[0] if data else None
        if len(shape) == 2 and not (data and isinstance(data[0], list)):
            return list(data)  # already the row's one dimension: no reshaping to do
        flat = np.asarray(data, dtype=object if tensor.get("datatype") == "BYTES" else None)
        return flat.reshape(-1).reshape(shape[1:]).tolist()
    return data


# --------------------------------------------------------------------------- output


def journal_path(output: Path) -> Path:
    """Where records are appended while the job runs."""
    if file_format(output) == "jsonl":
        return output
    return output.with_name(output.name + JOURNAL_SUFFIX)


def read_jsonl_records(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a JSON Lines results file; a torn last line (a killed run) is dropped.

    With ``repair`` the file is truncated after its last complete record, so that
    appending continues on a line of its own.
    """
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    good_end = 0
    with path.open("rb") as f:
        offset = 0
        for line in f:
            end = offset + len(line)
            stripped = line.strip()
            if stripped:
                try:
                    rec = orjson.loads(stripped)
                except orjson.JSONDecodeError:
                    if line.endswith(b"\n"):
                        raise InvalidRequest(
                            f"{path} is not a results file: the record at byte {offset} is "
                            "not JSON") from None
                    break
                if not isinstance(rec, dict) or "id" not in rec or "index" not in rec:
                    raise InvalidRequest(
                        f"{path} is not a results file: the record at byte {offset} has no "
                        "'id' and 'index'")
                if not line.endswith(b"\n"):
                    break
                records.append(rec)
            good_end = end
            offset = end
    if repair and good_end < path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_end)
    return records


def read_records(output: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Every record already written for ``output``: the finished file and the journal."""
    records: list[dict[str, Any]] = []
    if file_format(output) == "parquet":
        if output.exists():
            pq = _pyarrow_parquet()
            records.extend(pq.read_table(output).to_pylist())
        records.extend(read_jsonl_records(journal_path(output), repair=repair))
    else:
        records.extend(read_jsonl_records(output, repair=repair))
    return records


def latest_by_id(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record written for each id (a retried row supersedes its failure)."""
    return {str(r["id"]): r for r in records}


class JournalWriter:
    """Appends records to the journal as JSON Lines; flushed after each call.

    It also tracks whether the file is already what :func:`finalize` would leave:
    ``existing`` (the records the file holds, as read before appending) and every
    record written since in increasing ``index``, one per id. A job writes in input
    order, so finalizing its JSON Lines output then needs no second pass over it.
    """

    def __init__(self, path: Path, existing: Iterable[dict[str, Any]] = ()) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._ids: set[str] = set()
        self._last_index = -1
        self.in_order = True
        self.count = 0
        self._track(existing)
        self._f = path.open("ab")

    def _track(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.count += 1
            if not self.in_order:
                continue
            rid, index = str(r["id"]), int(r["index"])
            if index <= self._last_index or rid in self._ids:
                # A superseding retry or rows out of order: finalize must rewrite.
                self.in_order = False
                self._ids.clear()
                continue
            self._ids.add(rid)
            self._last_index = index

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._f.closed

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """Append ``records`` and flush them to the file."""
        records = list(records)
        # Output values decoded from base64 answers are numpy arrays: orjson writes them
        # as the same JSON numbers a JSON answer's values give.
        data = b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
                        for r in records)
        self._track(records)
        if data:
            self._f.write(data)
            self._f.flush()

    def close(self) -> None:
        """Close the file; idempotent."""
        if not self._f.closed:
            self._f.close()


class InOrder:
    """Releases results in the order of ``indices`` as the completed prefix grows.

    Results arrive in any order through :meth:`put`; ``emit`` gets the longest run
    of consecutive ones (in ``indices`` order) each time that run grows.
    """

    def __init__(self, indices: Iterable[int], emit: Callable[[list[dict[str, Any]]], None]):
        self._order = list(indices)
        self._emit = emit
        self._buffer: dict[int, dict[str, Any]] = {}
        self.position = 0

    @property
    def buffered(self) -> int:
        """Results waiting for an earlier one."""
        return len(self._buffer)

    @property
    def done(self) -> bool:
        """Whether every index has been released."""
        return self.position >= len(self._order)

    def put(self, index: int, record: dict[str, Any]) -> int:
        """Take the result of ``index``; returns how many results this released."""
        self._buffer[index] = record
        out: list[dict[str, Any]] = []
        while self.position < len(self._order) and self._order[self.position] in self._buffer:
            out.append(self._buffer.pop(self._order[self.position]))
            self.position += 1
        if out:
            self._emit(out)
        return len(out)


def finalize(output: Path, journal_writer: JournalWriter | None = None) -> int:
    """Leave ``output`` complete and in input order; returns its record count.

    JSON Lines: rewritten (atomically) only if a retry left it out of order or with a
    superseded record; not even read again when ``journal_writer``, the writer of
    all of it, saw it written in order. Parquet: the finished file and the journal
    become one file.
    """
    journal = journal_path(output)
    if file_format(output) == "jsonl":
        if (journal_writer is not None and journal_writer.in_order
                and journal_writer.path == output):
            return journal_writer.count
        records = read_jsonl_records(output)
        merged = _ordered(records)
        if merged != records:
            _replace(output, b"".join(orjson.dumps(r) + b"\n" for r in merged))
        return len(merged)
    merged = _ordered(read_records(output))
    pa = _pyarrow()
    pq = _pyarrow_parquet()
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(merged) if merged else pa.table({}), tmp)
    os.replace(tmp, output)
    journal.unlink(missing_ok=True)
    return len(merged)


def _ordered(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(latest_by_id(records).values(), key=lambda r: int(r["index"]))


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_parquet_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts) as a Parquet file: for preparing job inputs."""
    pq = _pyarrow_parquet()
    pq.write_table(_pyarrow().Table.from_pylist(rows), path)


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError as exc:
        raise InvalidRequest(
            "Parquet needs pyarrow: pip install 'inferline[parquet]'") from exc
    return pyarrow


def _pyarrow_parquet() -> Any:
    _pyarrow()
    import pyarrow.parquet

    return pyarrow.parquet
