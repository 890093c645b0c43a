"""The built-in example: a small CNN that kiln trains itself, offline, on scikit-learn's digits.

The data ships with scikit-learn (1,797 8×8 images), the split and seed are fixed, and the trained
weights are cached as safetensors under the kiln cache, keyed by the training recipe, so the model is
trained once per machine (about 10 s on 2 cores) and every later run reuses it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.zoo import _cache

FACTORY = "kiln.zoo.digits:build_model"
INPUT_NAME = "pixels"
INPUT_SHAPE = (1, 1, 8, 8)
LABELS = [str(d) for d in range(10)]

# The training recipe; any change gives a new cache key.
RECIPE: dict[str, Any] = {
    "arch": "conv32-conv64-pool-conv128-pool-fc10/v1",
    "seed": 0,
    "val_fraction": 0.2,
    "epochs": 40,
    "batch_size": 64,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "shift_augment": 1,
}


def build_model() -> Any:
    """The untrained architecture (the factory ``kiln import`` calls). Input: raw pixels 0..16."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                nn.MaxPool2d(2),
            )  # fmt: skip
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(128 * 2 * 2, 10))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(pixels / 16.0))

    return DigitsCNN()


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def load_data() -> DigitsData:
    """scikit-learn's digits, as float32 [N, 1, 8, 8] pixels 0..16 with a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=RECIPE["val_fraction"], random_state=RECIPE["seed"], stratify=y
    )
    return DigitsData(np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_va), y_va)


@dataclass(frozen=True)
class TrainedDigits:
    weights: Path
    val_accuracy: float
    train_seconds: float
    cached: bool


def recipe_key() -> str:
    return _cache.recipe_key(RECIPE)


def weights_path(cache_dir: Path | None = None) -> Path:
    return _cache.trained_weights_path("digits-cnn", RECIPE, cache_dir)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def train(cache_dir: Path | None = None, force: bool = False, progress: Any = None) -> TrainedDigits:
    """Train (or reuse the cached) digits CNN; ``progress(epoch, epochs)`` is called per epoch."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = weights_path(cache_dir)
    if path.is_file() and not force:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return TrainedDigits(path, float(meta.get("val_accuracy", "nan")), float(meta.get("train_seconds", 0)), True)

    import torch

    start = time.perf_counter()
    data = load_data()
    threads = torch.get_num_threads()
    torch.manual_seed(RECIPE["seed"])
    gen = np.random.default_rng(RECIPE["seed"])
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    epochs, bs = RECIPE["epochs"], RECIPE["batch_size"]
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=RECIPE["lr"], total_steps=epochs * ((len(data.y_train) + bs - 1) // bs)
    )
    x_all, y_all = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    loss_fn = torch.nn.CrossEntropyLoss()
    try:
        for epoch in range(epochs):
            model.train()
            order = torch.from_numpy(gen.permutation(len(y_all)))
            for i in range(0, len(order), bs):
                idx = order[i : i + bs]
                xb = _shift(x_all[idx], gen, RECIPE["shift_augment"])
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), y_all[idx])
                loss.backward()
                opt.step()
                sched.step()
            if progress is not None:
                progress(epoch + 1, epochs)
        model.eval()
        with torch.inference_mode():
            val_acc = accuracy(model(torch.from_numpy(data.x_val)).numpy(), data.y_val)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"val_accuracy": f"{val_acc:.6f}", "train_seconds": f"{seconds:.2f}",
                                        "recipe": json.dumps(RECIPE, sort_keys=True)})  # fmt: skip
    tmp.replace(path)
    return TrainedDigits(path, val_acc, seconds, False)


def _shift(x: Any, gen: np.random.Generator, max_shift: int) -> Any:
    """Random translation by up to ``max_shift`` pixels (zero padded): cheap, label-preserving."""
    import torch

    if not max_shift:
        return x
    dy, dx = (int(v) for v in gen.integers(-max_shift, max_shift + 1, size=2))
    padded = torch.nn.functional.pad(x, (max_shift, max_shift, max_shift, max_shift))
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def optimize_data() -> tuple[tuple[dict[str, np.ndarray], np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]:
    """``(calibration, validation)`` for ``kiln optimize``: calibrate on training images, validate on
    the held-out split, so calibration never sees the images that accuracy is measured on."""
    data = load_data()
    return ({INPUT_NAME: data.x_train}, data.y_train), ({INPUT_NAME: data.x_val}, data.y_val)


def train_data() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The training split as ``(inputs, labels)``, for the passes that fine-tune (distillation,
    quantization-aware training): the same images training saw, never the validation ones."""
    data = load_data()
    return {INPUT_NAME: data.x_train}, data.y_train
