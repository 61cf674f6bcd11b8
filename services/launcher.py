"""`pagewire serve`: tokenizer, engine and gateway as three child processes
on one model, for a single machine.

Engine options (`--device`, `--max-model-len`, ...) are the engine's own
flags and pass through to it; `--model` goes to the tokenizer too. The
children inherit the environment, but every port and address is given to
them as a flag, which beats PAGEWIRE_* variables.

Readiness is each service's grpc.health.v1 status under its full service
name. With `--tls-cert`/`--tls-key` (or PAGEWIRE_TLS_CERT / PAGEWIRE_TLS_KEY)
the gateway serves TLS on both public ports, and the launcher probes it over
TLS, trusting the gateway's own certificate: as for `pagewire health
--ca-file`, that certificate must be valid for the address probed (127.0.0.1
when `--host` is 0.0.0.0 or ::, else `--host`) and be self-signed or carry its
root CA; when a handshake shows it is not, serve says why and stops at once.

Ctrl-C or SIGTERM stops the gateway first (it drains its clients), then the
engine and the tokenizer. If a child dies, the launcher says which, with
its exit code and last lines of output. Before all three are serving it then
stops the others (a child that cannot start would only die again); once they
are, it starts the dead child again, after a delay that doubles while the
child keeps dying soon after its start.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import signal
import socket
import ssl
import sys
import typing
from dataclasses import dataclass
from pathlib import Path


from pagewire.services.common.config import ServiceConfig, option
from pagewire.services.common.grpc_utils import check_health, stop_on_signals
from pagewire.services.common.logging import get_logger
from pagewire.services.common.tls import TlsFiles
from pagewire.services.engine.config import EngineConfig
from pagewire.services.gateway.discovery import split_host_port

log = get_logger("serve")

READINESS_NAMES = {
    "tokenizer": "pagewire.v1.Tokenizer",
    "engine": "pagewire.v1.Engine",
    "gateway": "pagewire.v1.Generation",
}
# Lines of a child's output kept to explain its death.
TAIL_LINES = 20
READINESS_POLL_S = 0.5
RESTART_INITIAL_S = 1.0
RESTART_MAX_S = 30.0
# A child that ran this long before dying is restarted after the initial delay.
RESTART_RESET_AFTER_S = 60.0
# Beyond its grace period, what a child gets to exit before it is killed (the
# gateway needs a second or two to close its REST connections).
STOP_MARGIN_S = 5.0


@dataclass
class LauncherOptions(ServiceConfig):
    """Run tokenizer, engine and gateway as three processes on one model."""

    port: int = option(50051, "gRPC port of the gateway's public API.")
    http_port: int = option(8000, "Port of the gateway's OpenAI-style REST API.")
    tokenizer_port: int = option(50052, "Port of the tokenizer service (on 127.0.0.1).")
    engine_port: int = option(50053, "Port of the engine service (on 127.0.0.1).")
    startup_timeout_s: float = option(600.0, "Seconds the three services get to report SERVING.")
    shutdown_grace_s: float = option(10.0, "Seconds each service gets to drain on shutdown before it is killed.")
    tls_cert: str = option("", "PEM certificate chain for TLS on the gateway's public ports; with --tls-key.")
    tls_key: str = option("", "PEM private key for TLS on the gateway's public ports; with --tls-cert.")


def _engine_fields() -> list[dataclasses.Field]:  # type: ignore[type-arg]
    """The engine's own fields (not the ones every service or the launcher has)."""
    own = {f.name for f in dataclasses.fields(LauncherOptions)}
    return [f for f in dataclasses.fields(EngineConfig) if f.name not in own]


def _copy_field(f: dataclasses.Field) -> typing.Any:  # type: ignore[type-arg]
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


_engine_hints = typing.get_type_hints(EngineConfig)
ServeConfig = dataclasses.make_dataclass(
    "ServeConfig", [(f.name, _engine_hints[f.name], _copy_field(f)) for f in _engine_fields()], bases=(LauncherOptions,)
)
ServeConfig.__doc__ = LauncherOptions.__doc__
CONFIG = ServeConfig


def _flag(name: str, value: typing.Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [part for item in value for part in (flag, str(item))]
    return [flag, str(value)]


def _changed_engine_flags(config: typing.Any) -> list[str]:
    """Flags for the engine options that differ from the engine's defaults."""
    defaults = EngineConfig()
    flags = []
    for f in _engine_fields():
        value = getattr(config, f.name)
        if value != getattr(defaults, f.name) and value is not None:
            flags += _flag(f.name, value)
    return flags


def child_commands(config: typing.Any) -> dict[str, list[str]]:
    """The command line of each child, in start order."""
    # The children write to a pipe, where "auto" would mean JSON even when
    # the launcher's own output is a terminal.
    log_format = ("console" if sys.stderr.isatty() else "json") if config.log_format == "auto" else config.log_format
    common = ["--log-level", config.log_level, "--log-format", log_format, "--max-message-bytes", str(config.max_message_bytes)]
    grace = ["--shutdown-grace-s", str(config.shutdown_grace_s)]
    model = ["--model", config.model] if config.model else []
    # Given as flags, so that the gateway serves the TLS files the launcher probes with.
    tls = ["--tls-cert", config.tls_cert, "--tls-key", config.tls_key] if config.tls_cert else []
    base = [sys.executable, "-m", "pagewire.services.cli"]
    engine_has_grace = any(f.name == "shutdown_grace_s" for f in dataclasses.fields(EngineConfig))
    return {
        "tokenizer": [*base, "tokenizer", "--host", "127.0.0.1", "--port", str(config.tokenizer_port), *model, *common, *grace],
        "engine": [
            *base, "engine", "--host", "127.0.0.1", "--port", str(config.engine_port), *_changed_engine_flags(config), *common,
            *(grace if engine_has_grace else []),
        ],
        "gateway": [
            *base, "gateway", "--host", config.host, "--port", str(config.port), "--http-port", str(config.http_port),
            "--tokenizer", f"127.0.0.1:{config.tokenizer_port}", "--engine", f"127.0.0.1:{config.engine_port}", *tls, *common, *grace,
        ],
    }  # fmt: skip


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    tail: collections.deque[str]
    relay: asyncio.Task[None]


async def _relay_output(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    """Copy a child's output to ours, keeping its last lines."""
    while line := await stream.readline():
        text = line.decode(errors="replace")
        tail.append(text.rstrip("\n"))
        sys.stderr.write(text)
        sys.stderr.flush()


async def _start(name: str, command: list[str]) -> Child:
    # Own session: a Ctrl-C in the terminal reaches only the launcher, which
    # stops the children in order.
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True
    )
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    assert process.stdout is not None
    log.info("started", child=name, pid=process.pid)
    return Child(name, process, tail, asyncio.create_task(_relay_output(process.stdout, tail)))


class UnverifiableCertificate(RuntimeError):
    """The gateway serves TLS with a certificate that its readiness probe
    cannot verify, so waiting longer would never see it SERVING."""


def _check_certificate(target: str, cert_path: Path) -> None:
    """A TLS handshake with target trusting cert_path: raises
    UnverifiableCertificate when verification fails; a port not yet open or
    any other failure says nothing and returns."""
    host, port = split_host_port(target)
    context = ssl.create_default_context(cafile=str(cert_path))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=READINESS_POLL_S * 4) as sock, context.wrap_socket(sock, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as exc:
        raise UnverifiableCertificate(
            f"the gateway's TLS certificate {cert_path} cannot be verified for {host}: {exc.verify_message}; "
            f"serve needs a certificate valid for {host} that is self-signed or includes its root CA"
        ) from exc
    except OSError:
        return


async def _wait_serving(targets: dict[str, str], gateway_cert: Path | None) -> None:
    """Returns once every child reports SERVING (the gateway probed over TLS,
    trusting gateway_cert, when it has one). Raises UnverifiableCertificate as
    soon as the gateway's TLS handshake shows the probe can never succeed."""
    roots = {"gateway": gateway_cert.read_bytes()} if gateway_cert is not None else {}
    pending = dict(targets)
    while pending:
        for name, target in list(pending.items()):
            if await asyncio.to_thread(check_health, target, READINESS_NAMES[name], READINESS_POLL_S * 4, roots.get(name)):
                log.info("ready", child=name, address=target)
                del pending[name]
            elif name == "gateway" and gateway_cert is not None:
                await asyncio.to_thread(_check_certificate, target, gateway_cert)
        if pending:
            await asyncio.sleep(READINESS_POLL_S)


async def _stop(children: dict[str, Child], grace_s: float) -> None:
    """SIGTERM in reverse start order (gateway first), SIGKILL after the grace."""
    for child in reversed(list(children.values())):
        if child.process.returncode is None:
            child.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), grace_s + STOP_MARGIN_S)
            except TimeoutError:
                log.warning("did not stop in time, killing", child=child.name, grace_s=grace_s, margin_s=STOP_MARGIN_S)
                child.process.kill()
                await child.process.wait()
        await asyncio.wait_for(child.relay, grace_s)


def _report_death(child: Child) -> None:
    log.error("child exited", child=child.name, exit_code=child.process.returncode, last_output="\n".join(child.tail))


async def _supervise(
    children: dict[str, Child], commands: dict[str, list[str]], exits: dict[asyncio.Future[int], Child], stopping: asyncio.Future[bool]
) -> None:
    """Until `stopping` completes, start again every child that dies
    (`children` and `exits` follow the new processes)."""
    loop = asyncio.get_running_loop()
    delays = dict.fromkeys(children, RESTART_INITIAL_S)
    started_at = dict.fromkeys(children, loop.time())
    while True:
        done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            return
        for waiter in done:
            child = exits.pop(waiter)
            _report_death(child)
            if loop.time() - started_at[child.name] > RESTART_RESET_AFTER_S:
                delays[child.name] = RESTART_INITIAL_S
            delay = delays[child.name]
            delays[child.name] = min(delay * 2, RESTART_MAX_S)
            log.warning("restarting child", child=child.name, exit_code=child.process.returncode, in_s=delay)
            await asyncio.wait([stopping], timeout=delay)
            if stopping.done():
                return
            children[child.name] = await _start(child.name, commands[child.name])
            started_at[child.name] = loop.time()
            exits[asyncio.ensure_future(children[child.name].process.wait())] = children[child.name]


async def serve(config: typing.Any) -> int:
    tls = TlsFiles.from_options(config.tls_cert, config.tls_key)
    commands = child_commands(config)
    targets = {
        "tokenizer": f"127.0.0.1:{config.tokenizer_port}",
        "engine": f"127.0.0.1:{config.engine_port}",
        "gateway": f"{'127.0.0.1' if config.host in ('0.0.0.0', '::') else config.host}:{config.port}",
    }
    stop = stop_on_signals()
    children: dict[str, Child] = {}
    exit_code = 0
    try:
        for name, command in commands.items():
            children[name] = await _start(name, command)
        exits = {asyncio.ensure_future(child.process.wait()): child for child in children.values()}
        stopping = asyncio.ensure_future(stop.wait())
        waiting = _wait_serving(targets, tls.cert_path if tls else None)
        ready = asyncio.ensure_future(asyncio.wait_for(waiting, config.startup_timeout_s))
        done, _ = await asyncio.wait([ready, stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
        if ready in done and ready.exception() is None:
            log.info(
                "pagewire is serving",
                grpc=f"{config.host}:{config.port}",
                grpc_tls=tls is not None,
                rest=f"{'https' if tls else 'http'}://{config.host}:{config.http_port}/v1",
                model=config.model or "embedded default",
            )
            await _supervise(children, commands, exits, stopping)
            done = {stopping}
        elif ready in done and isinstance(ready.exception(), UnverifiableCertificate):
            log.error("gateway readiness cannot be probed", reason=str(ready.exception()))
            exit_code = 1
        elif ready in done:
            log.error(
                "services did not report SERVING in time",
                startup_timeout_s=config.startup_timeout_s,
                gateway_probe=f"{targets['gateway']} over " + (f"TLS, trusting {tls.cert_path}" if tls else "plaintext"),
            )
            exit_code = 1
        ready.cancel()
        stopping.cancel()
        for waiter in exits:
            if waiter in done:
                _report_death(exits[waiter])
                exit_code = 1
            else:
                waiter.cancel()
        if stop.is_set():
            log.info("shutting down")
    finally:
        await _stop(children, config.shutdown_grace_s)
    log.info("stopped", exit_code=exit_code)
    return exit_code
