"""The server's budget of bytes held by requests in flight."""

from __future__ import annotations

import pytest

from kiln.errors import RequestMemoryFullError
from kiln.serving.body_budget import BodyBudget


def test_requests_are_held_until_given_back_and_refused_past_the_limit() -> None:
    budget = BodyBudget(100)
    assert budget.take(60) == 60 and budget.take(40) == 40 and budget.held == 100
    with pytest.raises(RequestMemoryFullError, match=r"holding 100 bytes .* this one \(1 bytes so far\)") as info:
        budget.take(1)
    assert info.value.http_status == 503 and info.value.retry_after_s > 0
    assert budget.held == 100  # a refusal holds nothing
    budget.give(60)
    assert budget.take(50) == 50 and budget.held == 90 and budget.peak == 100


def test_a_lone_request_always_fits() -> None:
    budget = BodyBudget(10)
    assert budget.take(1000) == 1000  # what max_body_bytes allows is never refused on an idle server
    with pytest.raises(RequestMemoryFullError):
        budget.take(1)
    budget.give(1000)
    assert budget.held == 0 and budget.take(5) == 5
