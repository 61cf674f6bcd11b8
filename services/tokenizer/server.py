"""Entry point of the tokenizer service (`pagewire tokenizer`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pagewire.services.common.config import ServiceConfig, option
from pagewire.services.common.grpc_utils import RunningServer, serve_until_signalled, start_server
from pagewire.services.common.logging import get_logger

log = get_logger("tokenizer")

SERVICE_NAME = "pagewire.v1.Tokenizer"


@dataclass
class TokenizerConfig(ServiceConfig):
    """The tokenizer service: text and chats to token ids, ids to text."""

    port: int = option(50052, "gRPC port.")
    model: str = option("", "A HF model directory or a .gguf file; empty for the embedded default model.")
    max_streams: int = option(64, "Most Tokenize/Detokenize streams open at once (each holds a thread).")
    shutdown_grace_s: float = option(10.0, "Seconds in-flight streams get to finish on SIGTERM.")


CONFIG = TokenizerConfig


async def start(config: TokenizerConfig) -> RunningServer:
    from pagewire.services.common.model import load_hf_tokenizer, resolve_model
    from pagewire.v1 import tokenizer_pb2_grpc
    from pagewire.services.tokenizer.servicer import TokenizerServicer

    source = resolve_model(config.model)
    tokenizer = await asyncio.to_thread(load_hf_tokenizer, source)
    servicer = TokenizerServicer(tokenizer, source.model_id)
    running = await start_server(
        config.host,
        config.port,
        config.max_message_bytes,
        [lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        handler_threads=config.max_streams,
    )
    await running.set_serving(True)
    log.info("serving", address=f"{config.host}:{running.port}", model=source.model_id, vocab_size=servicer.vocab_size)
    return running


async def serve(config: TokenizerConfig) -> int:
    running = await start(config)
    await serve_until_signalled(running, config.shutdown_grace_s)
    return 0
