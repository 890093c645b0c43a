"""torch.compile with a dynamic batch: batch sizes 1…32 share the compiled graph(s)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.engines.base import EngineOptions, load_engine
from kiln.repository import Repository
from tests.unit.optimize.conftest import Imported


@pytest.mark.slow
def test_compiled_mlp_runs_batches_1_to_32_on_one_graph(mlp: Imported) -> None:
    import torch
    from torch._dynamo.utils import counters

    spec = Repository(mlp.repo).spec(mlp.name)
    torch._dynamo.reset()
    counters.clear()
    eager = load_engine("torch", mlp.version_dir, spec, EngineOptions())
    options = EngineOptions(run={"compile": "default", "freezing": True})
    with load_engine("torch", mlp.version_dir, spec, options) as engine:
        for batch in range(1, 33):
            feed = {"x": mlp.x[:batch]}
            np.testing.assert_allclose(engine.run(feed)["y"], eager.run(feed)["y"], atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1  # not one per batch size, not even one for batch 1
    torch._dynamo.reset()


def test_reduce_overhead_is_refused_on_cpu(mlp: Imported) -> None:
    from kiln.errors import UnsupportedError

    spec = Repository(mlp.repo).spec(mlp.name)
    with pytest.raises(UnsupportedError, match="CUDA"):
        load_engine("torch", mlp.version_dir, spec, EngineOptions(run={"compile": "reduce-overhead"}))
