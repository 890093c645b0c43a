"""Tiny models imported once per session: a CNN (Conv+BN+ReLU, Linear head) and an MLP, with data
whose labels are the fp32 model's own predictions, so the reference scores 100 % top-1."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def tiny_cnn() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )  # fmt: skip
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding has something to fold
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def scaled_cnn() -> Any:
    """:func:`tiny_cnn` on raw pixels scaled inside the model (``x / 16``), as the digits CNN is."""
    from torch import nn

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = tiny_cnn()

        def forward(self, x: Any) -> Any:
            return self.body(x / 16.0)

    return Scaled().eval()


def tiny_mlp() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def tiny_attention() -> Any:
    """One self-attention block over 6 tokens of 8 features, pooled to 4 logits: Softmax, weighted
    MatMuls (q, k, v, out), activation-by-activation MatMuls (Q·Kᵀ, attention·V) and a Gemm head."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.q, self.k, self.v, self.out = (nn.Linear(8, 8) for _ in range(4))
            self.head = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weights = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8**0.5, dim=-1)
            return self.head(self.out(weights @ self.v(x)).mean(dim=1))

    return Attention().eval()


@dataclass
class Imported:
    repo: Path
    name: str
    version_dir: Path
    data: Path  # .npz with inputs, labels and calibration/<input>
    x: np.ndarray
    labels: np.ndarray


def _import(tmp: Path, name: str, model: Any, shape: tuple[int, ...], task: str) -> Imported:
    import torch

    import kiln

    repo = tmp / "repo"
    result = kiln.import_model(model, repo, name=name, input_shapes=[shape], input_names=["x"],
                               output_names=["y"], task=task)  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, *shape[1:])).astype(np.float32)
    calib = rng.standard_normal((64, *shape[1:])).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(x)).numpy().argmax(axis=1)
    data = tmp / f"{name}.npz"
    np.savez(data, x=x, labels=labels, **{"calibration/x": calib})
    return Imported(repo, name, result.path, data, x, labels)


@pytest.fixture(scope="session")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    return _import(tmp_path_factory.mktemp("cnn"), "cnn", tiny_cnn(), (1, 1, 8, 8), "classification")


@pytest.fixture(scope="session")
def scaled(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    return _import(tmp_path_factory.mktemp("scaled"), "scaled", scaled_cnn(), (1, 1, 8, 8), "classification")


@pytest.fixture(scope="session")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    return _import(tmp_path_factory.mktemp("mlp"), "mlp", tiny_mlp(), (1, 16), "classification")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def attention(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    return _import(tmp_path_factory.mktemp("attention"), "attention", tiny_attention(), (1, 6, 8), "generic")
