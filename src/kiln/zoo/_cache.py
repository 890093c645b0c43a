"""Where the zoo keeps what it trains: one safetensors file per training recipe, in kiln's cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def recipe_key(recipe: dict[str, Any]) -> str:
    """A short hash of a training recipe: change a hyper-parameter and the model is trained anew."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def trained_weights_path(stem: str, recipe: dict[str, Any], cache_dir: Path | None = None) -> Path:
    from kiln.environment import get_settings

    root = cache_dir or get_settings().cache_dir
    return root / "zoo" / f"{stem}-{recipe_key(recipe)}.safetensors"
