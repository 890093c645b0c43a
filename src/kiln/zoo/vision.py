"""ResNet-50 and MobileNetV2 built from ``transformers`` configs with random weights (no torchvision, no
download): real architectures for speed tests only, since random weights say nothing about accuracy.

Each factory returns a module whose single input is ``pixel_values`` ``[N, 3, 224, 224]`` and whose
output is the 1000 logits; import it like any PyTorch model::

    kiln.import_model("kiln.zoo.vision:resnet50", repo, input_shapes=[INPUT_SHAPE], input_names=["pixel_values"],
                      output_names=["logits"], atol=1e-3)

With random weights hold an optimizer budget on output drift (``--metric sqnr``) over explicit data
(:func:`random_images`), never on a task metric.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kiln.errors import MissingExtraError

INPUT_NAME = "pixel_values"
INPUT_SHAPE = (1, 3, 224, 224)
FACTORIES = {"resnet50": "kiln.zoo.vision:resnet50", "mobilenetv2": "kiln.zoo.vision:mobilenet_v2"}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("zoo", "transformers", "building the ResNet-50 or MobileNetV2 zoo model") from None
    return transformers


def resnet50() -> Any:
    """ResNet-50 (transformers' ``ResNetConfig`` defaults: the torchvision layout), seed 0."""
    import torch

    t = _transformers()
    torch.manual_seed(0)
    return _logits(t.ResNetForImageClassification(t.ResNetConfig(num_labels=1000)))


def mobilenet_v2() -> Any:
    """MobileNetV2 1.0/224, seed 0, convolutions Kaiming-initialised over their fan-in.

    transformers initialises convolutions with std 0.02, so random activations shrink to ~1e-21 by the
    logits and every int8 variant underflows. Kaiming over the fan-out does not rescue it either: a
    depthwise kernel's fan-out counts every channel, its weights come out sqrt(C) too small, and the
    logits still end near 1e-9. Over the fan-in (which torch divides by the groups) they stay near 1.
    """
    import torch

    t = _transformers()
    torch.manual_seed(0)
    model = t.MobileNetV2ForImageClassification(t.MobileNetV2Config(num_labels=1000))
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return _logits(model)


def _logits(model: Any) -> Any:
    import torch

    class Logits(torch.nn.Module):
        """``pixel_values -> logits`` (transformers' models return an output object)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values, return_dict=False)[0]

    return Logits().eval()


def random_images(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal images (what normalised pixels look like to a random model), as explicit data."""
    rng = np.random.default_rng(seed)
    return {INPUT_NAME: rng.standard_normal((n, *INPUT_SHAPE[1:])).astype(np.float32)}
