"""Tokenizer service settings: plain data, so that the CLI and `pagewire
serve` read them without loading a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from pagewire.services.common.config import ServiceConfig, option


@dataclass
class TokenizerConfig(ServiceConfig):
    """The tokenizer service: text and chats to token ids, ids to text."""

    port: int = option(50052, "gRPC port.")
    model: str = option("", "A HF model directory or a .gguf file; empty for the embedded default model.")
    max_streams: int = option(64, "Most Tokenize/Detokenize streams open at once (each holds a thread).")
