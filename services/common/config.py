"""Service configuration: one dataclass per service, filled from CLI flags and
`PAGEWIRE_*` environment variables (flag beats environment beats default).

A field `max_num_seqs` becomes the flag `--max-num-seqs` and the variable
`PAGEWIRE_MAX_NUM_SEQS`; its help text is the field's `help` metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pagewire.services.common.limits import DEFAULT_MAX_MESSAGE_BYTES

ENV_PREFIX = "PAGEWIRE_"

C = TypeVar("C")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (and optional `choices`; `secret=True`
    for a value that must not appear on a command line)."""
    metadata = {"help": help, **kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def available_cores() -> int:
    """The cores this process may run on (its affinity, as under a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Processes of a front-door service (gateway, tokenizer): one per four
    cores, at least one and at most eight. A 2-core host keeps one, so small
    hosts and CI run as with a single process; the engine process and the
    other front-door service need cores of their own."""
    return max(1, min(8, available_cores() // 4))


@dataclass
class ServiceConfig:
    """Settings every gRPC service has."""

    host: str = option("127.0.0.1", "Address to bind; 0.0.0.0 to listen on every interface.")
    port: int = option(0, "Port to bind.")
    max_message_bytes: int = option(DEFAULT_MAX_MESSAGE_BYTES, "Largest gRPC message accepted or sent, in bytes.")
    log_level: str = option("info", "Log level.", choices=["debug", "info", "warning", "error"])
    log_format: str = option("auto", "Log format; auto is JSON unless stderr is a terminal.", choices=["auto", "json", "console"])
    shutdown_grace_s: float = option(10.0, "Seconds in-flight requests may finish after SIGTERM/SIGINT (readiness reports NOT_SERVING meanwhile).")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _scalar_type(annotation: Any) -> tuple[type, bool, bool]:
    """(base type, is optional, is list) of a field annotation."""
    hint = annotation
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one flag per field of `config_cls`, defaulting to its environment variable."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        base, _, is_list = _scalar_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        var = env_name(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} [env {var}; default {default!r}]"
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif is_list:
            parser.add_argument(flag, action="append", type=base, **kwargs)
        else:
            parser.add_argument(flag, type=base, **kwargs)


def config_from_args(config_cls: type[C], args: argparse.Namespace, environ: typing.Mapping[str, str] | None = None) -> C:
    """Build `config_cls` from parsed flags, then environment variables, then defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
            continue
        raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        base, optional, is_list = _scalar_type(hints[f.name])
        try:
            if optional and raw == "":
                values[f.name] = None
            elif is_list:
                values[f.name] = [base(item.strip()) for item in raw.split(",") if item.strip()]
            elif base is bool:
                values[f.name] = _parse_bool(raw)
            else:
                values[f.name] = base(raw)
        except ValueError as exc:
            raise SystemExit(f"invalid {env_name(f.name)}={raw!r}: {exc}") from exc
        if "choices" in f.metadata and values[f.name] not in f.metadata["choices"]:
            raise SystemExit(f"invalid {env_name(f.name)}={raw!r}: choose from {', '.join(f.metadata['choices'])}")
    return config_cls(**values)


def parse_config(config_cls: type[C], argv: list[str] | None = None, prog: str | None = None) -> C:
    parser = argparse.ArgumentParser(prog=prog, description=config_cls.__doc__)
    add_config_arguments(parser, config_cls)
    return config_from_args(config_cls, parser.parse_args(argv))
