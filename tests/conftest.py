from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.environment import get_settings


@pytest.fixture(scope="session", autouse=True)
def kiln_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One kiln cache per test session, so tests never read or write the user's ~/.cache/kiln."""
    cache = tmp_path_factory.mktemp("kiln-cache")
    old = os.environ.get("KILN_CACHE_DIR")
    os.environ["KILN_CACHE_DIR"] = str(cache)
    get_settings.cache_clear()
    try:
        yield cache
    finally:
        if old is None:
            os.environ.pop("KILN_CACHE_DIR", None)
        else:
            os.environ["KILN_CACHE_DIR"] = old
        get_settings.cache_clear()


@pytest.fixture(scope="session")
def digits_trained(kiln_cache: Path):  # type: ignore[no-untyped-def]
    """The digits CNN, trained once per session in the session cache."""
    from kiln.zoo import digits

    return digits.train()


@pytest.fixture(scope="session")
def detector_trained(kiln_cache: Path):  # type: ignore[no-untyped-def]
    """The shapes detector, trained once per session in the session cache (a few minutes on 2 cores)."""
    from kiln.zoo import detector

    return detector.train()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"
