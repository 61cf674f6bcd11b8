"""Entry point of the tokenizer service (`pagewire tokenizer`)."""

from __future__ import annotations

import asyncio

from pagewire.services.common.grpc_utils import RunningServer, serve_until_signalled, start_service_server
from pagewire.services.common.logging import get_logger
from pagewire.services.tokenizer.config import TokenizerConfig

log = get_logger("tokenizer")

SERVICE_NAME = "pagewire.v1.Tokenizer"

CONFIG = TokenizerConfig


async def start(config: TokenizerConfig) -> RunningServer:
    from pagewire.services.common.model import load_hf_tokenizer, resolve_model
    from pagewire.v1 import tokenizer_pb2_grpc
    from pagewire.services.tokenizer.servicer import TokenizerServicer

    source = resolve_model(config.model)
    tokenizer = await asyncio.to_thread(load_hf_tokenizer, source)
    servicer = TokenizerServicer(tokenizer, source.model_id, config.max_message_bytes)
    running = await start_service_server(
        config, lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server), SERVICE_NAME, handler_threads=config.max_streams
    )
    await running.set_serving(True)
    log.info("serving", address=f"{config.host}:{running.port}", model=source.model_id, vocab_size=servicer.vocab_size)
    return running


async def serve(config: TokenizerConfig) -> int:
    running = await start(config)
    await serve_until_signalled(running, config.shutdown_grace_s)
    return 0
