"""The `pagewire` command: one subcommand per service, plus `serve` (all
three) and `health` (a grpc.health.v1 probe for containers)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import sys
from pathlib import Path

from pagewire.services.common.config import add_config_arguments, config_from_args
from pagewire.services.common.grpc_utils import check_health
from pagewire.services.common.logging import configure_logging, get_logger
from pagewire.services.common.model import ModelNotFoundError

# subcommand -> (module with `CONFIG` and `async def serve(config)`, summary)
SERVICES = {
    "tokenizer": ("pagewire.services.tokenizer.server", "Run the tokenizer service (default port 50052)."),
    "engine": ("pagewire.services.engine.service.server", "Run the engine service (default port 50053)."),
    "gateway": ("pagewire.services.gateway.server", "Run the gateway: public gRPC (50051) and OpenAI-style REST (8000)."),
    "serve": ("pagewire.services.launcher", "Run tokenizer, engine and gateway as three processes on one model."),
}


def installed_version() -> str:
    """The installed distribution's version; run from a source tree (its
    directories on PYTHONPATH, nothing installed), a note saying so, so that
    every command still starts."""
    try:
        return importlib.metadata.version("pagewire")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="pagewire", description="pagewire: an LLM inference server of three gRPC services.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules: dict[str, object] = {}
    for name, (module_name, summary) in SERVICES.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        sub = commands.add_parser(name, help=summary, description=summary)
        add_config_arguments(sub, module.CONFIG)
    health = commands.add_parser("health", help="Exit 0 only if HOST:PORT reports SERVING through grpc.health.v1.")
    health.add_argument("target", metavar="HOST:PORT")
    health.add_argument("--service", default="", help="Service name to check; empty for the whole server.")
    health.add_argument("--timeout", type=float, default=3.0, help="Seconds to wait for the answer.")
    health.add_argument(
        "--ca-file", default="", help="PEM root certificates: probe over TLS, trusting these (a TLS gateway's own cert when self-signed)."
    )
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if args.command == "health":
        try:
            root_certificates = Path(args.ca_file).read_bytes() if args.ca_file else None
        except OSError as exc:
            parser.error(f"--ca-file: {exc}")
        serving = check_health(args.target, args.service, args.timeout, root_certificates)
        sys.stdout.write(("SERVING" if serving else "NOT_SERVING") + "\n")
        return 0 if serving else 1
    module = modules[args.command]
    config = config_from_args(module.CONFIG, args)
    configure_logging(config.log_level, config.log_format, service=args.command)
    try:
        return asyncio.run(module.serve(config)) or 0
    except ModelNotFoundError as exc:
        get_logger(args.command).error("model_not_found", reason=str(exc))
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
