"""One ONNX Runtime session per model version: loading, provider choice, warmup, runs."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pipeline.errors import InferenceFailed, ModelLoadError
from pipeline.registry import ModelVersion, TensorSpec
from pipeline.text import FEEDS, TextEncoder, sample_texts

log = logging.getLogger("inferline.session")

Provider = Literal["auto", "cuda", "cpu"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# Registry datatype -> (ONNX Runtime type string, numpy dtype).
DATATYPES: dict[str, tuple[str, npt.DTypeLike]] = {
    "BOOL": ("tensor(bool)", np.bool_),
    "UINT8": ("tensor(uint8)", np.uint8),
    "INT8": ("tensor(int8)", np.int8),
    "INT16": ("tensor(int16)", np.int16),
    "INT32": ("tensor(int32)", np.int32),
    "INT64": ("tensor(int64)", np.int64),
    "FP16": ("tensor(float16)", np.float16),
    "FP32": ("tensor(float)", np.float32),
    "FP64": ("tensor(double)", np.float64),
    "BYTES": ("tensor(string)", np.object_),
}
# ORT's own default logger severity (WARNING); restored after a quiet CUDA probe.
_ORT_DEFAULT_SEVERITY = 2
_ORT_QUIET_SEVERITY = 4


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why this process cannot use CUDA with ONNX Runtime, or None when it may.

    The CUDA provider library is opened directly first: when one of its CUDA
    libraries is missing, ORT would log an error and fall back to CPU on every
    session, so checking once here keeps the logs clean and gives the exact reason.
    """
    if CUDA not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} is built without {CUDA}"
    win = sys.platform == "win32"
    name = "onnxruntime_providers_cuda.dll" if win else "libonnxruntime_providers_cuda.so"
    lib = Path(ort.__file__).parent / "capi" / name
    if lib.is_file():
        try:
            ctypes.CDLL(str(lib))
        except OSError as exc:
            # Only a missing dependency is conclusive; other loader errors are left
            # for ORT to judge when it creates the session.
            if win or "cannot open shared object file" in str(exc):
                return f"cannot load {name}: {exc}"
    return None


def choose_providers(preferred: Provider) -> list[str]:
    """The ONNX Runtime providers to request, best first, for a provider preference."""
    if preferred == "cpu" or cuda_unavailable_reason() is not None:
        return [CPU]
    return [CUDA, CPU]


class ModelSession:
    """Holds the ONNX Runtime session of one model version.

    ``provider`` overrides the spec's ``execution_provider`` unless it is ``"auto"``.
    Runs go through :meth:`run` (blocking) or :meth:`run_async`, which uses a
    single thread owned by this session so that ORT's intra-op threads, not a
    pool of callers, decide the parallelism.

    A version with ``preprocess = "tokenize"`` takes its declared BYTES input (one
    text per row) and tokenizes it in :meth:`run`, so that tokenization happens on
    the same thread as the ORT call, off the event loop, and callers (the worker,
    the batcher) handle such a model like any other.
    """

    def __init__(
        self, spec: ModelVersion, *, provider: Provider = "auto", intra_op_threads: int = 0,
        instances: int = 1,
    ) -> None:
        self.spec = spec
        self.requested: Provider = provider if provider != "auto" else spec.execution_provider
        self.intra_op_threads = intra_op_threads
        self.fallback_reason: str | None = None
        self.warm = False
        self.warmup_s = 0.0
        self.load_s = 0.0
        self._sess: ort.InferenceSession | None = None
        self._output_names = [t.name for t in spec.outputs]
        # ``instances`` threads run batches at once on the one ORT session (its run is
        # thread-safe): with one intra-op thread each they keep several cores busy
        # without the lock-step of one run split over threads, where a core taken by
        # another process stalls the whole run.
        self.instances = max(instances, 1)
        if self.instances > 1 and intra_op_threads == 0:
            # Left to ORT, every run would take all cores: share them out instead.
            self.intra_op_threads = max((os.cpu_count() or 1) // self.instances, 1)
        self._executor = ThreadPoolExecutor(
            max_workers=self.instances, thread_name_prefix=f"ort-{spec.key}"
        )
        self._closed = False
        self._provider = ""
        self._text: TextEncoder | None = None

    @property
    def loaded(self) -> bool:
        """Whether :meth:`load` succeeded and :meth:`close` has not been called."""
        return self._sess is not None

    @property
    def execution_provider(self) -> str:
        """The provider that actually runs this model (after any fallback)."""
        self._session()
        return self._provider

    def _session(self) -> ort.InferenceSession:
        if self._sess is None:
            state = "closed" if self._closed else "not loaded; call load() first"
            raise ModelLoadError(f"model {self.spec.key} session is {state}", model=self.spec.key)
        return self._sess

    def _options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.intra_op_threads > 0:
            opts.intra_op_num_threads = self.intra_op_threads
        # Spinning pool threads burn a core after every run; on a host shared with
        # the broker and the event loop that steals more than it saves.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        # Session-level warnings (e.g. nodes placed on CPU beside CUDA) are expected.
        opts.log_severity_level = 3
        return opts

    def _read_verified(self) -> bytes:
        path = self.spec.path
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(
                f"model {self.spec.key} file {str(path)!r} cannot be read: {exc}",
                model=self.spec.key,
                path=str(path),
            ) from exc
        expected = self.spec.sha256
        if expected is not None:
            # The bytes hashed are the bytes loaded, so the file cannot change in between.
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected.lower():
                raise ModelLoadError(
                    f"model {self.spec.key} file {str(path)!r} has sha256 {actual}, "
                    f"but the registry expects {expected}; rebuild or re-register it",
                    model=self.spec.key,
                    expected=expected,
                    actual=actual,
                )
        return data

    def _create(self, data: bytes) -> ort.InferenceSession:
        providers = choose_providers(self.requested)
        try:
            if CUDA not in providers:
                return ort.InferenceSession(data, self._options(), providers=providers)
            # A CUDA provider that fails to start logs an error per session and runs
            # on CPU anyway; the fallback is reported in our own load line instead.
            ort.set_default_logger_severity(_ORT_QUIET_SEVERITY)
            try:
                return ort.InferenceSession(data, self._options(), providers=providers)
            finally:
                ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)
        except Exception as exc:
            raise ModelLoadError(
                f"model {self.spec.key} file {str(self.spec.path)!r} was refused by "
                f"ONNX Runtime {ort.__version__}: {exc}",
                model=self.spec.key,
                path=str(self.spec.path),
            ) from exc

    def _check_io(self, sess: ort.InferenceSession) -> None:
        for kind, specs, actual in (
            ("inputs", self.spec.inputs, sess.get_inputs()),
            ("outputs", self.spec.outputs, sess.get_outputs()),
        ):
            have = {a.name: a.type for a in actual}
            want = {s.name: DATATYPES[s.datatype][0] for s in specs}
            if kind == "inputs" and self._text is not None:
                want = dict(FEEDS)  # the graph takes the tokenizer's tensors
            # Inputs must match exactly (ORT needs every one fed); extra outputs are fine.
            names_ok = (
                have.keys() == want.keys() if kind == "inputs" else want.keys() <= have.keys()
            )
            if not names_ok or any(have[n] != t for n, t in want.items()):
                raise ModelLoadError(
                    f"model {self.spec.key} {kind} are {sorted(have.items())} but the registry "
                    f"declares {sorted(want.items())}",
                    model=self.spec.key,
                    expected=sorted(want),
                    actual=sorted(have),
                )

    def load(self) -> None:
        """Verify the file's digest, create the ORT session and check its inputs/outputs.

        Idempotent; raises :class:`ModelLoadError` on any mismatch or ORT refusal.
        """
        if self._closed:
            raise ModelLoadError(f"model {self.spec.key} session is closed", model=self.spec.key)
        if self._sess is not None:
            return
        start = time.perf_counter()
        if self.spec.preprocess == "tokenize":
            self._text = self._load_text_encoder()
        sess = self._create(self._read_verified())
        self._check_io(sess)
        self._sess = sess
        self._provider = str(sess.get_providers()[0])
        self.load_s = time.perf_counter() - start
        self._log_provider(sess.get_providers()[0])

    def _load_text_encoder(self) -> TextEncoder:
        spec = self.spec
        texts = [t for t in spec.inputs if t.datatype == "BYTES"]
        if len(spec.inputs) != 1 or len(texts) != 1 or spec.tokenizer is None:
            raise ModelLoadError(
                f"model {spec.key} has preprocess = 'tokenize', which needs a tokenizer and "
                f"exactly one BYTES input; it declares {[t.datatype for t in spec.inputs]}",
                model=spec.key,
            )
        return TextEncoder.load(
            spec.tokenizer, max_seq_len=spec.max_seq_len, sha256=spec.tokenizer_sha256
        )

    def _run_text(
        self, sess: ort.InferenceSession, text: TextEncoder, array: npt.NDArray[Any]
    ) -> list[npt.NDArray[Any]]:
        """Tokenize, run each sub-batch of similar length, and put rows back in order.

        A long text batched with short ones runs apart from them rather than padding
        them all to its length (see :func:`pipeline.text.plan_chunks`).
        """
        chunks = text.encode_chunks(array)
        if not chunks:
            raise ValueError(f"input {self.spec.inputs[0].name!r} has no rows")
        if len(chunks) == 1:  # the whole batch, rows in their own order
            outputs: list[npt.NDArray[Any]] = sess.run(self._output_names, chunks[0][1])
            return outputs
        merged: list[npt.NDArray[Any]] = []
        for rows, feeds in chunks:
            for k, out in enumerate(sess.run(self._output_names, feeds)):
                if k == len(merged):
                    merged.append(np.empty((len(array), *out.shape[1:]), dtype=out.dtype))
                merged[k][rows] = out
        return merged

    def _log_provider(self, actual: str) -> None:
        level = logging.INFO
        if actual == CUDA:
            note = ""
        elif self.requested == "cpu":
            note = " (requested cpu)"
        else:
            self.fallback_reason = cuda_unavailable_reason() or (
                f"ONNX Runtime could not start {CUDA}; it needs CUDA "
                f"{_cuda_version()}, cuDNN 9 and a visible GPU"
            )
            note = f" (CUDA unavailable: {self.fallback_reason})"
            # An explicit request for CUDA that is not honoured deserves attention.
            level = logging.WARNING if self.requested == "cuda" else logging.INFO
        log.log(level, "%s execution provider %s%s", self.spec.key, actual, note)

    def warmup(self, batch_sizes: Iterable[int] | None = None) -> float:
        """Run representative inputs of each batch size (default: the spec's batch buckets).

        Makes ORT allocate and pick kernels before the first real request; returns
        and records the seconds spent. Numeric inputs are zeros; text inputs are real
        sentences of varied length, shifted at each size so that the batches differ.
        """
        sizes = self.spec.batch_buckets if batch_sizes is None else tuple(batch_sizes)
        start = time.perf_counter()
        for i, n in enumerate(dict.fromkeys(sizes)):
            self.run({t.name: representative_input(t, n, offset=i) for t in self.spec.inputs})
        self.warmup_s = time.perf_counter() - start
        self.warm = True
        return self.warmup_s

    def run(self, inputs: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run one batch, blocking; returns the spec's outputs by name.

        Raises :class:`InferenceFailed` when ONNX Runtime rejects or fails the batch.
        """
        sess = self._session()
        try:
            if self._text is None:
                results = sess.run(self._output_names, dict(inputs))
            else:
                results = self._run_text(sess, self._text, inputs[self.spec.inputs[0].name])
        except Exception as exc:
            first = next(iter(inputs.values()), None)
            batch = int(first.shape[0]) if first is not None and first.ndim else 0
            raise InferenceFailed(self.spec.name, self.spec.version, batch, exc) from exc
        return dict(zip(self._output_names, results, strict=True))

    def _timed_run(
        self, inputs: Mapping[str, npt.NDArray[Any]]
    ) -> tuple[dict[str, npt.NDArray[Any]], float]:
        start = time.perf_counter()
        outputs = self.run(inputs)
        return outputs, time.perf_counter() - start

    async def run_async(
        self, inputs: Mapping[str, npt.NDArray[Any]]
    ) -> tuple[dict[str, npt.NDArray[Any]], float]:
        """Run one batch on one of the session's threads; returns outputs and compute seconds."""
        self._session()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._timed_run, inputs)

    def close(self) -> None:
        """Stop the session's thread and drop the ORT session; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._sess = None
        self.warm = False

    def __enter__(self) -> ModelSession:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def representative_input(
    spec: TensorSpec, batch_size: int, *, offset: int = 0
) -> npt.NDArray[Any]:
    """An input shaped like ``spec``: the first free dimension is the batch, others 1.

    Numbers are zeros. BYTES elements are real sentences of varied length (starting
    at the ``offset``-th sample), since a text model's cost depends on its tokens.
    """
    shape = [
        batch_size if i == 0 and d == -1 else (1 if d == -1 else d)
        for i, d in enumerate(spec.shape)
    ]
    dtype = DATATYPES[spec.datatype][1]
    if spec.datatype == "BYTES":
        return sample_texts(int(np.prod(shape)), offset=offset).reshape(shape)
    return np.zeros(shape, dtype=dtype)


def _cuda_version() -> str:
    try:
        from onnxruntime.capi import build_and_package_info

        return str(getattr(build_and_package_info, "cuda_version", "12+"))
    except ImportError:
        return "12+"
