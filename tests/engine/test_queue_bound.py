"""The bounded waiting queue: past --max-queue-len requests queued behind a
full running batch, new ones are refused with RESOURCE_EXHAUSTED, and a
refusal leaves nothing behind."""

from __future__ import annotations

import pytest

from pagewire.services.common.errors import Refusal, RequestError
from tests.engine.util import assert_no_leaks, greedy, make_engine, run_all


def _assert_refused(core, request_id: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError) as refused:
        core.add_request(request_id, [1, 2, 3], greedy(2))
    assert refused.value.kind == Refusal.RESOURCE_EXHAUSTED
    assert "--max-queue-len 3" in refused.value.message
    assert request_id not in core.sequences


def test_requests_past_the_waiting_queue_bound_are_refused(engine_model) -> None:
    core = make_engine(engine_model, max_num_seqs=2, max_queue_len=3)
    # A burst that arrives before any step: two take the free seats of the batch, three queue.
    for index in range(5):
        core.add_request(f"burst-{index}", [1, 2, 3], greedy(2))
    _assert_refused(core, "one-too-many")
    # The step seats two; three still queue behind a full batch.
    outputs = {output.request_id: output for output in core.step()}
    assert len(core.scheduler.running) == 2
    _assert_refused(core, "still-too-many")
    # Once the seated ones finish there is room again.
    while not any(output.finish_reason is not None for output in outputs.values()):
        outputs = {output.request_id: output for output in core.step()}
    core.add_request("after-room", [1, 2, 3], greedy(2))
    finished = run_all(core)
    assert {f"burst-{index}" for index in range(2, 5)} | {"after-room"} <= set(finished)
    assert_no_leaks(core)
