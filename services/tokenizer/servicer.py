"""The Tokenizer gRPC servicer: multiplexed Tokenize and Detokenize streams.

A refused request gets a result carrying its error status; the stream and
every other request on it go on. The handlers are synchronous (encoding is
CPU work, and grpc-testing drives them directly); the asyncio server runs them
on its thread pool, one thread per open stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from pagewire.services.common.errors import DuplicateRequestError, RequestError, invalid_argument
from pagewire.services.common.grpc_utils import to_status
from pagewire.services.common.limit_checks import check_stop_strings
from pagewire.services.common.logging import get_logger
from pagewire.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from pagewire.services.tokenizer.detokenizer import IncrementalDetokenizer

log = get_logger("tokenizer")

CHAT_ROLES = ("system", "user", "assistant", "tool")


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: Any, model_id: str):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.vocab_size = len(tokenizer)

    # ---- encoding -------------------------------------------------------

    def encode(self, request: tokenizer_pb2.TokenizeRequest) -> list[int]:
        """Token ids of one request; raises RequestError when it is refused."""
        kind = request.WhichOneof("input")
        if kind == "text":
            if not request.text:
                raise invalid_argument("text is empty: send at least one character")
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            return list(self.tokenizer(request.text, add_special_tokens=add_special)["input_ids"])
        if kind == "chat":
            return self.encode_chat(request.chat)
        raise invalid_argument("the request has no input: set text or chat")

    def encode_chat(self, chat: tokenizer_pb2.Chat) -> list[int]:
        if not chat.messages:
            raise invalid_argument("chat has no messages")
        for index, message in enumerate(chat.messages):
            if message.role not in CHAT_ROLES:
                raise invalid_argument(f"messages[{index}].role is {message.role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not self.tokenizer.chat_template:
            raise invalid_argument(f"model {self.model_id} has no chat template: send text instead")
        add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        conversation = [{"role": m.role, "content": m.content} for m in chat.messages]
        # Render then encode without special tokens: the template already holds them.
        rendered = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=False)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def tokenize_batch(self, batch: tokenizer_pb2.TokenizeBatch) -> tokenizer_pb2.TokenizedBatch:
        out = tokenizer_pb2.TokenizedBatch()
        for request in batch.requests:
            result = out.results.add(request_id=request.request_id)
            try:
                result.token_ids.extend(self.encode(request))
            except RequestError as exc:
                result.error.CopyFrom(to_status(exc))
                log.info("tokenize_refused", request_id=request.request_id, reason=exc.message)
        return out

    def Tokenize(self, request_iterator: Iterator[tokenizer_pb2.TokenizeBatch], context: grpc.ServicerContext) -> Iterator[tokenizer_pb2.TokenizedBatch]:
        for batch in request_iterator:
            yield self.tokenize_batch(batch)

    # ---- decoding -------------------------------------------------------

    def start_detokenizer(self, start: tokenizer_pb2.DetokenizeStart) -> IncrementalDetokenizer:
        check_stop_strings(start.stop)
        self.check_ids(start.prompt_tail_ids, "prompt_tail_ids")
        return IncrementalDetokenizer.with_prompt_tail(
            self.tokenizer,
            list(start.prompt_tail_ids),
            stop=list(start.stop),
            include_stop_str_in_output=start.include_stop_str_in_output,
            skip_special_tokens=start.skip_special_tokens if start.HasField("skip_special_tokens") else True,
        )

    def check_ids(self, token_ids: Any, field_name: str) -> None:
        # max() first: a step's ids are checked on every append.
        if token_ids and max(token_ids) >= self.vocab_size:
            bad = [i for i in token_ids if i >= self.vocab_size]
            raise invalid_argument(f"{field_name} holds ids outside the vocabulary of {self.vocab_size}: {bad[:5]}")

    def detokenize_item(self, item: tokenizer_pb2.DetokenizeItem, live: dict[str, IncrementalDetokenizer]) -> tokenizer_pb2.TextDelta | None:
        """The item's reply: new text, its end, or its refusal; None when there is nothing to say."""
        rid = item.request_id
        if item.cancel:
            live.pop(rid, None)
            return None
        append = item.append
        try:
            if item.HasField("start"):
                if rid in live:
                    raise DuplicateRequestError(f"request {rid!r} is already open on this stream; the earlier request continues")
                live[rid] = self.start_detokenizer(item.start)
            if rid not in live:
                raise invalid_argument(f"request {rid!r} was never started on this stream (send DetokenizeStart first)")
            if not item.HasField("append"):
                return None
            token_ids = list(append.token_ids)
            self.check_ids(token_ids, "token_ids")
            update = live[rid].append(token_ids, last=append.last)
        except RequestError as exc:
            # The caller's id clash must not cost the live request its text so far.
            closed = not isinstance(exc, DuplicateRequestError)
            if closed:
                live.pop(rid, None)
            log.info("detokenize_refused", request_id=rid, reason=exc.message)
            return tokenizer_pb2.TextDelta(request_id=rid, error=to_status(exc), closed=closed)
        closed = update.stopped or append.last
        if closed:
            live.pop(rid, None)
        elif not update.text:
            return None
        return tokenizer_pb2.TextDelta(
            request_id=rid, text=update.text, stopped=update.stopped, matched_stop=update.matched_stop, closed=closed, num_tokens=update.num_tokens
        )

    def Detokenize(self, request_iterator: Iterator[tokenizer_pb2.DetokenizeBatch], context: grpc.ServicerContext) -> Iterator[tokenizer_pb2.TextBatch]:
        live: dict[str, IncrementalDetokenizer] = {}
        for batch in request_iterator:
            deltas = [delta for item in batch.items if (delta := self.detokenize_item(item, live)) is not None]
            if deltas:
                yield tokenizer_pb2.TextBatch(deltas=deltas)

    def Info(self, request: tokenizer_pb2.TokenizerInfoRequest, context: grpc.ServicerContext) -> tokenizer_pb2.TokenizerInfo:
        info = tokenizer_pb2.TokenizerInfo(
            model_id=self.model_id,
            vocab_size=self.vocab_size,
            eos_token_ids=[self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [],
            has_chat_template=bool(self.tokenizer.chat_template),
        )
        if self.tokenizer.bos_token_id is not None:
            info.bos_token_id = self.tokenizer.bos_token_id
        return info
