"""One session of the fuzz tests on a multiplexed stream: the items it
sends, each judged against what the protos say of it, and the well-formed
requests among them, compared with what they give on a stream of their own."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import grpc

from tests.reliability.fuzz_inputs import Verdict
from tests.reliability.stream_clients import MultiplexedStream, Outcome, StreamEnd

# A refusal a caller can act on; anything else that is not OK is a server fault.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}
SERVED_ENDS = {"LENGTH", "STOP", "CANCELLED", "TIME_LIMIT", "CLOSED", "STOPPED"}
# Items sent before the session waits for their replies: well under the
# engine's queue bound, so that a refusal for a full queue stays rare.
BATCH = 24
SETTLE_S = 120.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
_ids = itertools.count()
T = TypeVar("T")


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


@dataclass
class Item:
    """One request sent on a stream, with what the protos say of it."""

    name: str
    request_id: str
    payload: Any
    verdict: Verdict = field(default_factory=Verdict)
    # Served but unbounded (no max_tokens, or a large one): stopped right after it is sent.
    stop_early: bool = False
    # Replies that end it: 0 for a cancel of an unknown id.
    finals: int = 1
    # Sent under the id of the well-formed request sent just before it, which must go on.
    duplicate: bool = False


@dataclass
class Report:
    """What a hop's sessions saw, for the figures."""

    sessions: int = 0
    items: int = 0
    goods: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def figures(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "items": self.items, "well_formed": self.goods, "outcomes": dict(sorted(self.outcomes.items())), "wall_s": round(self.wall_s, 1)}


def judge(item: Item, outcome: Outcome) -> str | None:
    """Why `outcome` breaks the contract for `item`; None when it keeps it.
    An item that expects no reply (a cancel of an unknown id) shares its id
    with nothing the session judges, and is judged by the stream living on."""
    if not item.finals:
        return None
    if outcome.finals != item.finals:
        return f"{outcome.finals} ends instead of {item.finals}"
    if outcome.code is not grpc.StatusCode.OK and outcome.code not in REFUSALS:
        return f"{outcome.code.name}: {outcome.message}"
    refused = outcome.code in REFUSALS
    if item.verdict.refuse and not refused:
        return f"served ({outcome.finish}) though {', '.join(item.verdict.refuse)}"
    if item.verdict.valid and refused and outcome.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"refused though valid: {outcome.code.name}: {outcome.message}"
    if not refused and item.finals and outcome.finish not in SERVED_ENDS:
        return f"ended with {outcome.finish!r} and no error"
    return None


def label(outcome: Outcome) -> str:
    return outcome.code.name if outcome.code is not grpc.StatusCode.OK else outcome.finish or "no reply"


class Hop(Protocol):
    """How the items of one kind of stream travel."""

    name: str

    def open(self, channel: grpc.aio.Channel) -> MultiplexedStream: ...

    def with_id(self, payload: Any, request_id: str) -> Any: ...

    def messages(self, items: Sequence[Item]) -> list[Any]:
        """The wire messages carrying `items` in order, then stopping those to stop early."""


def batched(items: Sequence[T], size: int = BATCH) -> list[list[T]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)] or [[]]


async def run_session(
    hop: Hop, address: str, goods: Sequence[Item], schedule: Sequence[Sequence[Item]], settle_s: float = SETTLE_S
) -> tuple[list[tuple[Item, Outcome]], list[tuple[Item, Outcome]], StreamEnd]:
    """Send `schedule` batch by batch on one stream, a well-formed request
    (from `goods`, in turn) first in each batch; the outcomes of the items
    and of the well-formed requests, and how the stream ended. AssertionError
    when replies take longer than `settle_s`."""
    sent_goods: list[Item] = []
    sent: list[Item] = []
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stream = hop.open(channel)
        for index, batch in enumerate(schedule):
            good = goods[index % len(goods)]
            rid = unique(f"good-{good.name}")
            good = replace(good, request_id=rid, payload=hop.with_id(good.payload, rid))
            batch = [replace(item, request_id=rid, payload=hop.with_id(item.payload, rid)) if item.duplicate else item for item in batch]
            for message in hop.messages([good, *batch]):
                await stream.send(message)
            sent_goods.append(good)
            sent += batch
            await stream.settle(finals([item for item in batch if not item.duplicate]), settle_s)
        await stream.settle(finals([*sent_goods, *sent]), settle_s)
        end = await stream.close()

        def outcome(item: Item) -> Outcome:
            return stream.duplicate_outcome(item.request_id) if item.duplicate else stream.outcome(item.request_id)

        return [(item, outcome(item)) for item in sent], [(good, outcome(good)) for good in sent_goods], end


def finals(items: Sequence[Item]) -> Counter[str]:
    """The replies that end them, by request id."""
    expected: Counter[str] = Counter()
    for item in items:
        expected[item.request_id] += item.finals
    return expected


def essence(outcome: Outcome) -> tuple[Any, ...]:
    """What must not change for a well-formed request."""
    return (outcome.code.name, outcome.finish, outcome.token_ids, outcome.text, outcome.finals)


# What each hop's well-formed requests give on a stream of their own (the
# same model whatever process serves it): measured once per run.
_baselines: dict[str, dict[str, Any]] = {}


async def fuzz_hop(hop: Hop, address: str, goods: Sequence[Item], schedule: Sequence[Sequence[Item]], report: Report, settle_s: float = SETTLE_S) -> None:
    """One session with noise against the well-formed requests alone; the
    contract's breaches go into report.failures."""
    started = time.monotonic()
    if hop.name not in _baselines:
        _, alone, _ = await run_session(hop, address, goods, [[]] * len(goods))
        _baselines[hop.name] = {good.name: essence(outcome) for good, outcome in alone}
    baseline = _baselines[hop.name]
    results, goods_seen, end = await run_session(hop, address, goods, schedule, settle_s)
    report.sessions += 1
    report.goods += len(goods_seen)
    if end.code is not grpc.StatusCode.OK:
        report.failures.append(f"{hop.name}: the stream ended {end.code.name}: {end.details}")
    for good, outcome in goods_seen:
        if essence(outcome) != baseline[good.name]:
            report.failures.append(f"{hop.name}: well-formed {good.name} changed by the noise: {essence(outcome)} != {baseline[good.name]}")
    for item, outcome in results:
        report.items += 1
        report.outcomes[label(outcome) if item.finals else "cancel of an unknown id"] += 1
        if (problem := judge(item, outcome)) is not None:
            report.failures.append(f"{hop.name}: {item.name}: {problem}")
    report.wall_s += time.monotonic() - started
