"""The zoo's random-weight vision models: real architectures whose logits keep a usable scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.zoo import vision


@pytest.mark.parametrize("factory", [vision.resnet50, vision.mobilenet_v2])
def test_random_models_give_logits_at_a_scale_int8_can_hold(factory: object) -> None:
    model = factory()  # type: ignore[operator]
    x = torch.from_numpy(vision.random_images(2)[vision.INPUT_NAME])
    with torch.inference_mode():
        logits = model(x).numpy()
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    assert logits.std() > 1e-2  # transformers' default init leaves MobileNetV2's logits near 1e-9
