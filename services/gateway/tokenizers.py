"""The gateway's tokenizer workers: one TokenizerClient (a Tokenize and a
Detokenize stream) per tokenizer address. Each Tokenize request goes to the
least loaded worker that is connected; a request's detokenization stays on
the worker its DetokenizeStart went to, since that worker holds its
incremental decoder."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from pagewire.services.common.errors import Refusal, RequestError
from pagewire.services.gateway.clients import TokenizerClient
from pagewire.services.gateway.connection import Backoff
from pagewire.v1 import tokenizer_pb2


class TokenizerPool:
    def __init__(
        self,
        addresses: list[str],
        channel_options: list[tuple[str, int]],
        backoff: Backoff,
        connect_timeout_s: float,
        max_message_bytes: int,
        on_text: Callable[[tokenizer_pb2.TextDelta], None],
        on_down: Callable[[TokenizerClient, str], None],
    ):
        def client(address: str) -> TokenizerClient:
            # The client is named in the callback, so that only its own requests fail.
            created = TokenizerClient(
                address, channel_options, backoff, connect_timeout_s, max_message_bytes, on_text, lambda reason: self._down(created, reason)
            )
            return created

        self._on_down = on_down

        self.clients = [client(address) for address in addresses]
        # The worker each detokenizing request's decoder lives on, by internal id.
        self._assigned: dict[str, TokenizerClient] = {}
        # Requests detokenizing on each worker: the load that picks one.
        self._load = dict.fromkeys(self.clients, 0)

    async def run(self) -> None:
        await asyncio.gather(*(client.run() for client in self.clients))

    @property
    def available(self) -> bool:
        return any(client.available for client in self.clients)

    def _least_loaded(self) -> TokenizerClient:
        connected = [client for client in self.clients if client.available]
        if not connected:
            names = ", ".join(client.address for client in self.clients)
            raise RequestError(Refusal.UNAVAILABLE, f"tokenizer {names} is not connected; retry shortly")
        return min(connected, key=lambda client: self._load[client] + client.pending_tokenize)

    async def tokenize(self, request: tokenizer_pb2.TokenizeRequest) -> tokenizer_pb2.TokenizeResult:
        return await self._least_loaded().tokenize(request)

    def assigned(self, request_id: str) -> TokenizerClient | None:
        """The worker that decodes the request's output."""
        if len(self.clients) == 1:
            return self.clients[0]
        return self._assigned.get(request_id)

    def _down(self, client: TokenizerClient, reason: str) -> None:
        self._on_down(client, reason)
        for request_id in [request_id for request_id, holder in self._assigned.items() if holder is client]:
            self.release(request_id)

    def release(self, request_id: str) -> None:
        """The request no longer detokenizes: its worker carries one fewer."""
        client = self._assigned.pop(request_id, None)
        if client is not None:
            self._load[client] -= 1

    def detokenize(self, items: Iterable[tokenizer_pb2.DetokenizeItem]) -> None:
        """Send each item to its request's worker; a start picks the worker,
        a cancel releases it. UNAVAILABLE when that worker is down."""
        if len(self.clients) == 1:
            self.clients[0].detokenize(items)
            return
        for item in items:
            if item.HasField("start"):
                client = self._least_loaded()
                self._assigned[item.request_id] = client
                self._load[client] += 1
            else:
                client = self._assigned.get(item.request_id)
                if client is None:
                    continue  # its worker went away with the decoder
                if item.cancel:
                    self.release(item.request_id)
            client.detokenize([item])

    def send_detokenize(self, batch: tokenizer_pb2.DetokenizeBatch) -> None:
        """A step's appends, one message per worker that has some. Items of
        a worker that is down are dropped: its down callback fails their requests."""
        if len(self.clients) == 1:
            self.clients[0].send_detokenize(batch)
            return
        per_client: dict[TokenizerClient, tokenizer_pb2.DetokenizeBatch] = {}
        for item in batch.items:
            client = self._assigned.get(item.request_id)
            if client is not None:
                per_client.setdefault(client, tokenizer_pb2.DetokenizeBatch()).items.append(item)
        for client, part in per_client.items():
            try:
                client.send_detokenize(part)
            except RequestError:
                pass

    async def token_texts(self, token_ids: Iterable[int]) -> dict[int, str]:
        return await self._least_loaded().token_texts(token_ids)
