"""Engine discovery: turn the gateway's `--engine` values into the set of
replica addresses to route across, and follow that set as replicas come and go.

An `--engine` value is one of

- `HOST:PORT`: one replica, fixed.
- `dns:///NAME:PORT`: every address NAME resolves to, re-resolved every
  interval. A Kubernetes headless Service name (`engine-headless.NS.svc`)
  resolves to each ready engine pod; a compose service name to each replica.
- `file:///PATH`: the `HOST:PORT` lines of a file (`#` starts a comment),
  re-read every interval, for service registries that write files.

A lookup that fails for a passing reason keeps the target's last known
addresses, so a DNS hiccup does not empty the gateway; a name that does not
exist (a headless Service with no ready pod) or a missing file means none.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pagewire.services.common.logging import get_logger

log = get_logger("gateway")

# getaddrinfo errors that mean "no such name" rather than "try again".
_NAME_ABSENT = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class TargetError(ValueError):
    pass


def split_host_port(text: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; the port is required."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise TargetError(f"{text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class StaticTarget:
    address: str

    async def resolve(self) -> frozenset[str]:
        return frozenset({self.address})


@dataclass(frozen=True)
class DnsTarget:
    host: str
    port: int

    async def resolve(self) -> frozenset[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in _NAME_ABSENT:
                return frozenset()
            raise
        return frozenset(join_host_port(sockaddr[0], self.port) for *_, sockaddr in infos)


@dataclass(frozen=True)
class FileTarget:
    path: Path

    async def resolve(self) -> frozenset[str]:
        try:
            text = await asyncio.to_thread(self.path.read_text)
        except FileNotFoundError:
            return frozenset()
        addresses = set()
        for line in text.splitlines():
            entry = line.split("#", 1)[0].strip()
            if entry:
                host, port = split_host_port(entry)
                addresses.add(join_host_port(host, port))
        return frozenset(addresses)


Target = StaticTarget | DnsTarget | FileTarget


def parse_target(text: str) -> Target:
    """The Target an `--engine` value names; TargetError when malformed."""
    if text.startswith("dns:"):
        parts = urlsplit(text)
        if parts.netloc:
            raise TargetError(f"{text!r}: a DNS server (dns://SERVER/...) cannot be chosen; use dns:///NAME:PORT")
        host, port = split_host_port(parts.path.lstrip("/"))
        return DnsTarget(host, port)
    if text.startswith("file:"):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise TargetError(f"{text!r} is not file:///PATH")
        return FileTarget(Path(unquote(parts.path)))
    host, port = split_host_port(text)
    return StaticTarget(join_host_port(host, port))


@dataclass(frozen=True)
class ReplicaSetChange:
    """The replica addresses now, and how they differ from the previous set."""

    current: frozenset[str]
    added: frozenset[str]
    removed: frozenset[str]


class EngineDiscovery:
    """Resolves every target and reports the union whenever it changes."""

    def __init__(self, targets: Sequence[str], interval_s: float):
        if not targets:
            raise TargetError("no engine named: pass --engine HOST:PORT, dns:///NAME:PORT or file:///PATH")
        self.targets = [parse_target(t) for t in targets]
        self.interval_s = interval_s
        self._last_known: dict[Target, frozenset[str]] = {}

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(t, StaticTarget) for t in self.targets)

    async def resolve(self) -> frozenset[str]:
        """Every target's addresses; a target whose lookup fails keeps its last known ones."""
        results = await asyncio.gather(*(t.resolve() for t in self.targets), return_exceptions=True)
        for target, result in zip(self.targets, results):
            if isinstance(result, BaseException):
                if not isinstance(result, (OSError, TargetError)):
                    raise result
                log.warning("engine lookup failed, keeping last known replicas", target=str(target), error=str(result))
                continue
            if result != self._last_known.get(target):
                log.info("engine replicas resolved", target=str(target), replicas=sorted(result))
            self._last_known[target] = result
        return frozenset().union(*self._last_known.values())

    async def watch(self) -> AsyncIterator[ReplicaSetChange]:
        """The first set at once, then each change; ends after the first set
        when every target is static."""
        current = await self.resolve()
        yield ReplicaSetChange(current, current, frozenset())
        while self.is_dynamic:
            await asyncio.sleep(self.interval_s)
            resolved = await self.resolve()
            if resolved != current:
                yield ReplicaSetChange(resolved, resolved - current, current - resolved)
                current = resolved
