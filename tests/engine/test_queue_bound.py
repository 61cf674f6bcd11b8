"""The bounded waiting queue: past --max-queue-len new requests are refused
with RESOURCE_EXHAUSTED, and a refusal leaves nothing behind."""

from __future__ import annotations

import grpc
import pytest

from services.common.grpc_utils import RequestError
from tests.engine.util import assert_no_leaks, greedy, make_engine, run_all


def test_requests_past_the_waiting_queue_bound_are_refused(engine_model) -> None:
    core = make_engine(engine_model, max_num_seqs=2, max_queue_len=3)
    for index in range(3):
        core.add_request(f"waiting-{index}", [1, 2, 3], greedy(2))
    with pytest.raises(RequestError) as refused:
        core.add_request("one-too-many", [1, 2, 3], greedy(2))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "one-too-many" not in core.sequences
    # Once the queue drains into the running batch there is room again.
    core.step()
    core.add_request("after-a-step", [1, 2, 3], greedy(2))
    outputs = run_all(core)
    assert set(outputs) == {"waiting-0", "waiting-1", "waiting-2", "after-a-step"}
    assert_no_leaks(core)
