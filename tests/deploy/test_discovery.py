"""Engine discovery: target parsing, resolution, and following changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pagewire.services.gateway.discovery import DnsTarget, EngineDiscovery, FileTarget, ReplicaSetChange, StaticTarget, TargetError, parse_target


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("engine:50053", StaticTarget("engine:50053")),
        ("[::1]:50053", StaticTarget("[::1]:50053")),
        ("dns:///engine-headless.pagewire.svc:50053", DnsTarget("engine-headless.pagewire.svc", 50053)),
        ("dns:engine:50053", DnsTarget("engine", 50053)),
        ("file:///etc/pagewire/engines", FileTarget(Path("/etc/pagewire/engines"))),
    ],
)
def test_parse_target(text: str, target: object) -> None:
    assert parse_target(text) == target


@pytest.mark.parametrize("text", ["engine", "engine:", "engine:99999", "dns:///engine", "dns://8.8.8.8/engine:50053", "::1:50053", "file://host/x"])
def test_malformed_targets_are_refused(text: str) -> None:
    with pytest.raises(TargetError):
        parse_target(text)


def test_dns_target_resolves_every_address() -> None:
    assert asyncio.run(DnsTarget("127.0.0.1", 50053).resolve()) == {"127.0.0.1:50053"}
    assert "127.0.0.1:7" in asyncio.run(DnsTarget("localhost", 7).resolve())
    assert asyncio.run(DnsTarget("no-such-engine.invalid", 7).resolve()) == frozenset()


def test_watch_follows_a_file_and_keeps_the_last_good_list(tmp_path: Path) -> None:
    listing = tmp_path / "engines"
    listing.write_text("# replicas\n127.0.0.1:1001\n127.0.0.1:1002  # first zone\n")

    async def scenario() -> list[ReplicaSetChange]:
        discovery = EngineDiscovery([f"file://{listing}", "127.0.0.1:2000"], interval_s=0.01)
        changes = []
        async for change in discovery.watch():
            changes.append(change)
            if len(changes) == 1:
                listing.write_text("127.0.0.1:1002\n127.0.0.1:1003\n")
            elif len(changes) == 2:
                listing.write_text("127.0.0.1:1002\nnot-an-address\n")
                await asyncio.sleep(0.05)
                assert await discovery.resolve() == changes[-1].current
                listing.unlink()
            else:
                return changes
        raise AssertionError("watch ended")

    first, second, third = asyncio.run(scenario())
    assert first == ReplicaSetChange(
        frozenset({"127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:2000"}),
        frozenset({"127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:2000"}),
        frozenset(),
    )
    assert (second.added, second.removed) == ({"127.0.0.1:1003"}, {"127.0.0.1:1001"})
    assert third == ReplicaSetChange(frozenset({"127.0.0.1:2000"}), frozenset(), frozenset({"127.0.0.1:1002", "127.0.0.1:1003"}))


def test_static_targets_are_reported_once() -> None:
    async def scenario() -> list[ReplicaSetChange]:
        return [change async for change in EngineDiscovery(["127.0.0.1:1", "127.0.0.1:2"], interval_s=0.01).watch()]

    (only,) = asyncio.run(scenario())
    assert only.current == {"127.0.0.1:1", "127.0.0.1:2"}


def test_no_target_is_an_error() -> None:
    with pytest.raises(TargetError):
        EngineDiscovery([], interval_s=1.0)
