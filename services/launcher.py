"""`pagewire serve`: tokenizer, engine and gateway as three child processes
on one model, for a single machine.

serve takes every option of the three services except where they listen,
which it decides itself (the tokenizer and engine on 127.0.0.1 at
`--tokenizer-port` and `--engine-port`, the gateway told those addresses),
and passes each option on to the services that have it: `--max-num-seqs` to
the engine, `--routing` and `--api-key` to the gateway, `--model` to the
tokenizer and the engine. An option is passed on only where its value differs
from what the child would read on its own (the children inherit the
environment, PAGEWIRE_* variables included), as a flag, except a secret such
as the API key: it goes in the child's environment, since any local user can
read a command line.

With `--tokenizer-workers N` serve starts N tokenizers, on `--tokenizer-port`
and the N-1 ports after it, and gives the gateway every address; the
gateway's `--gateway-workers` are the gateway's to start (workers.py), so
serve runs one gateway process either way.

Readiness is each service's grpc.health.v1 status under its full service
name. With `--tls-cert`/`--tls-key` (or PAGEWIRE_TLS_CERT / PAGEWIRE_TLS_KEY)
the gateway serves TLS on both public ports, and the launcher probes it over
TLS, trusting the gateway's own certificate: as for `pagewire health
--ca-file`, that certificate must be valid for the address probed (127.0.0.1
when `--host` is 0.0.0.0 or ::, else `--host`) and be self-signed or carry its
root CA; when a handshake shows it is not, serve says why and stops at once.

Ctrl-C or SIGTERM stops the gateway first (it drains its clients), then the
engine and the tokenizers (all at once). A launcher killed outright (SIGKILL, the OOM
killer) takes its children with it: on Linux each gets SIGTERM from the
kernel and drains on its own, so none is left holding its port. If a child dies, the launcher says which, with
its exit code and last lines of output. Before all three are serving it then
stops the others (a child that cannot start would only die again); once they
are, it starts the dead child again, after a delay that doubles while the
child keeps dying soon after its start.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
import ssl
import sys
import typing
from dataclasses import dataclass
from pathlib import Path


from pagewire.services.common.children import ChildCommand, Supervision, flag, run_children
from pagewire.services.common.config import ServiceConfig, config_from_args, default_workers, env_name, option
from pagewire.services.common.grpc_utils import check_health
from pagewire.services.common.logging import get_logger
from pagewire.services.common.tls import TlsFiles
from pagewire.services.engine.config import EngineConfig
from pagewire.services.gateway.config import GatewayConfig
from pagewire.services.gateway.discovery import split_host_port
from pagewire.services.tokenizer.config import TokenizerConfig

log = get_logger("serve")

LOOPBACK = "127.0.0.1"
READINESS_POLL_S = 0.5


@dataclass(frozen=True)
class ChildSpec:
    """A service that serve runs: its subcommand, config and readiness name,
    and the options of its config that serve does not offer: where the
    services listen, which serve decides (_placement)."""

    name: str
    config: type[ServiceConfig]
    readiness: str
    withheld: frozenset[str]

    def passed_fields(self) -> list[dataclasses.Field[typing.Any]]:
        return [f for f in dataclasses.fields(self.config) if f.name not in self.withheld]


# In start order.
CHILDREN = (
    ChildSpec("tokenizer", TokenizerConfig, "pagewire.v1.Tokenizer", frozenset({"host", "port"})),
    ChildSpec("engine", EngineConfig, "pagewire.v1.Engine", frozenset({"host", "port"})),
    # The discovery interval is how often dns:/// and file:/// engine targets
    # are resolved again; serve gives the gateway its engine's address itself.
    ChildSpec("gateway", GatewayConfig, "pagewire.v1.Generation", frozenset({"tokenizer", "engine", "discovery_interval_s"})),
)


@dataclass
class LauncherOptions:
    """Run tokenizer, engine and gateway as three processes on one model."""

    tokenizer_port: int = option(50052, "Port of the tokenizer service (on 127.0.0.1); its N workers listen on this port and the N-1 after it.")
    tokenizer_workers: int = option(
        default_workers(), "Tokenizer processes, each of which every gateway worker uses; default: one per four cores, 1 to 8."
    )
    engine_port: int = option(50053, "Port of the engine service (on 127.0.0.1).")
    startup_timeout_s: float = option(600.0, "Seconds the three services get to report SERVING.")
    shutdown_grace_s: float = option(10.0, "Seconds each service gets to drain on shutdown before it is killed.")


def _default(f: dataclasses.Field[typing.Any]) -> typing.Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _copy_field(f: dataclasses.Field[typing.Any]) -> typing.Any:
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def _serve_config() -> type:
    """LauncherOptions plus every option that the children take from serve,
    once: an option that several children have goes to each of them."""
    own = {f.name for f in dataclasses.fields(LauncherOptions)}
    fields: dict[str, tuple[str, typing.Any, typing.Any]] = {}
    defaults: dict[str, typing.Any] = {}
    for child in CHILDREN:
        hints = typing.get_type_hints(child.config)
        for f in child.passed_fields():
            if f.name in own:
                continue
            if f.name not in fields:
                fields[f.name], defaults[f.name] = (f.name, hints[f.name], _copy_field(f)), _default(f)
            elif defaults[f.name] != _default(f):
                raise TypeError(f"--{f.name.replace('_', '-')} has different defaults in the services serve runs, so one value cannot serve both")
    # The settings every service has first in --help, the gateway's address among them.
    common = [f.name for f in dataclasses.fields(ServiceConfig)]
    order = sorted(fields, key=lambda name: common.index(name) if name in common else len(common))
    config = dataclasses.make_dataclass("ServeConfig", [fields[name] for name in order], bases=(LauncherOptions,))
    config.__doc__ = LauncherOptions.__doc__
    return config


CONFIG = _serve_config()
READINESS = {child.name: child.readiness for child in CHILDREN}


def _tokenizer_ports(config: typing.Any) -> dict[str, int]:
    """The tokenizer workers by child name ("tokenizer" when there is one), on consecutive ports."""
    workers = max(1, config.tokenizer_workers)
    if workers == 1:
        return {"tokenizer": config.tokenizer_port}
    return {f"tokenizer-{index}": config.tokenizer_port + index for index in range(workers)}


def _placement(config: typing.Any) -> dict[str, dict[str, typing.Any]]:
    """The options of each child process that serve sets itself: where it
    and its peers listen. The gateway's own workers are its to start."""
    tokenizers = _tokenizer_ports(config)
    return {
        **{name: {"host": LOOPBACK, "port": port} for name, port in tokenizers.items()},
        "engine": {"host": LOOPBACK, "port": config.engine_port},
        "gateway": {"tokenizer": [f"{LOOPBACK}:{port}" for port in tokenizers.values()], "engine": [f"{LOOPBACK}:{config.engine_port}"]},
    }


def service_of(name: str) -> str:
    """The service a child process runs ("tokenizer" for "tokenizer-1")."""
    return name.partition("-")[0]


def child_commands(config: typing.Any) -> dict[str, ChildCommand]:
    """The command line and environment of each child process, in start order."""
    # The children write to a pipe, where "auto" would mean JSON even when
    # the launcher's own output is a terminal.
    log_format = ("console" if sys.stderr.isatty() else "json") if config.log_format == "auto" else config.log_format
    placement = _placement(config)
    commands = {}
    for child in CHILDREN:
        # What the child would run with if given no flag: its defaults and the environment it inherits.
        on_its_own = config_from_args(child.config, argparse.Namespace())
        for process_name in [name for name in placement if service_of(name) == child.name]:
            command = ChildCommand([sys.executable, "-m", "pagewire.services.cli", child.name], {})
            for name, value in placement[process_name].items():
                command.argv += flag(name, value)
            for f in child.passed_fields():
                value = log_format if f.name == "log_format" else getattr(config, f.name)
                if value == getattr(on_its_own, f.name):
                    continue
                if f.metadata.get("secret"):
                    command.env[env_name(f.name)] = str(value)
                else:
                    command.argv += flag(f.name, value)
            commands[process_name] = command
    return commands


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
            if await asyncio.to_thread(check_health, target, READINESS[service_of(name)], READINESS_POLL_S * 4, roots.get(name)):
                log.info("ready", child=name, address=target)
                del pending[name]
            elif name == "gateway" and gateway_cert is not None:
                await asyncio.to_thread(_check_certificate, target, gateway_cert)
        if pending:
            await asyncio.sleep(READINESS_POLL_S)


async def serve(config: typing.Any) -> int:
    tls = TlsFiles.from_options(config.tls_cert, config.tls_key)
    commands = child_commands(config)
    targets = {
        **{name: f"{LOOPBACK}:{port}" for name, port in _tokenizer_ports(config).items()},
        "engine": f"{LOOPBACK}:{config.engine_port}",
        "gateway": f"{LOOPBACK if config.host in ('0.0.0.0', '::') else config.host}:{config.port}",
    }

    def serving() -> None:
        log.info(
            "pagewire is serving",
            grpc=f"{config.host}:{config.port}",
            grpc_tls=tls is not None,
            rest=f"{'https' if tls else 'http'}://{config.host}:{config.http_port}/v1",
            model=config.model or "embedded default",
        )

    def not_serving(error: BaseException) -> None:
        if isinstance(error, UnverifiableCertificate):
            log.error("gateway readiness cannot be probed", reason=str(error))
            return
        log.error(
            "services did not report SERVING in time",
            startup_timeout_s=config.startup_timeout_s,
            gateway_probe=f"{targets['gateway']} over " + (f"TLS, trusting {tls.cert_path}" if tls else "plaintext"),
        )

    waiting = asyncio.wait_for(_wait_serving(targets, tls.cert_path if tls else None), config.startup_timeout_s)
    # A service's workers stop together; the gateway stops its own.
    groups = [[name for name in commands if service_of(name) == child.name] for child in CHILDREN]
    return await run_children(commands, waiting, Supervision(config.shutdown_grace_s, groups, serving, not_serving))
