"""The Tokenizer gRPC servicer: multiplexed Tokenize and Detokenize streams.

A refused request gets a result carrying its error status; the stream and
every other request on it go on. Any exception while one item is handled
fails that item alone: INVALID_ARGUMENT for what the caller can fix (a chat
the template refuses), INTERNAL for a fault of the service. Every reply fits
in --max-message-bytes: results are packed into messages while they fit, a
long text goes out in several deltas, and a prompt whose token ids cannot fit
in one message is refused.

The handlers are synchronous (encoding is CPU work, and grpc-testing drives
them directly); the asyncio server runs them on its thread pool, one thread
per open stream. Prompts are encoded side by side on a pool shared by every
stream, and each result is sent once it is ready, so a huge prompt does not
hold up the small ones behind it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from pagewire.services.common.config import available_cores
from pagewire.services.common.errors import DuplicateRequestError, RequestError, invalid_argument
from pagewire.services.common.grpc_utils import error_status, to_status
from pagewire.services.common.limit_checks import check_stop_strings, check_tools
from pagewire.services.common.limits import DEFAULT_MAX_MESSAGE_BYTES
from pagewire.services.common.logging import get_logger
from pagewire.services.common.message_size import entry_bytes, packed_sized, too_large
from pagewire.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from pagewire.services.tokenizer.detokenizer import IncrementalDetokenizer
from pagewire.services.tokenizer.encoder import ChatTurn, PromptEncoder, ToolCallTurn, ToolSpec
from pagewire.services.tokenizer.grammar import GrammarCompiler

log = get_logger("tokenizer")

CHAT_ROLES = ("system", "user", "assistant", "tool")


def encoding_threads() -> int:
    """One per core this process may run on: the Rust tokenizer releases the
    GIL while it encodes. At least two, so that one long prompt never has
    the pool to itself."""
    return max(2, available_cores())


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: Any, model_id: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.vocab_size = len(tokenizer)
        self.encoder = PromptEncoder(tokenizer, model_id)
        self.grammars = GrammarCompiler(tokenizer)
        self.max_message_bytes = max_message_bytes
        self._pool = ThreadPoolExecutor(max_workers=encoding_threads(), thread_name_prefix="tokenize")

    # ---- encoding -------------------------------------------------------

    def encode(self, request: tokenizer_pb2.TokenizeRequest) -> list[int]:
        """Token ids of one request; raises RequestError when it is refused."""
        kind = request.WhichOneof("input")
        if kind == "text":
            if not request.text:
                raise invalid_argument("text is empty: send at least one character")
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            return self.encoder.encode_text(request.text, add_special)
        if kind == "chat":
            return self.encode_chat(request.chat)
        if request.HasField("constraint"):
            return []  # a prompt the caller tokenized itself: only the constraint to compile
        raise invalid_argument("the request has no input: set text or chat")

    def encode_chat(self, chat: tokenizer_pb2.Chat) -> list[int]:
        if not chat.messages:
            raise invalid_argument("chat has no messages")
        for index, message in enumerate(chat.messages):
            if message.role not in CHAT_ROLES:
                raise invalid_argument(f"messages[{index}].role is {message.role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not self.encoder.has_chat_template:
            raise invalid_argument(f"model {self.model_id} has no chat template: send text instead")
        add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        check_tools(chat.tools)
        turns = [
            ChatTurn(m.role, m.content, tuple(ToolCallTurn(c.id, c.name, c.arguments) for c in m.tool_calls), m.tool_call_id) for m in chat.messages
        ]
        tools = [ToolSpec(t.name, t.description, t.parameters) for t in chat.tools]
        return self.encoder.encode_chat(turns, add_generation_prompt, chat.parse_special_tokens_in_content, tools)

    def tokenize_result(self, request: tokenizer_pb2.TokenizeRequest) -> tokenizer_pb2.TokenizeResult:
        """The request's result, or its refusal; never raises."""
        result = tokenizer_pb2.TokenizeResult(request_id=request.request_id)
        try:
            result.token_ids.extend(self.encode(request))
            if request.HasField("constraint"):
                result.compiled_grammar = self.grammars.compile(request.constraint)
            if entry_bytes(result) > self.max_message_bytes:
                what = "the prompt's token ids and the compiled grammar" if result.compiled_grammar else "the prompt's token ids"
                raise too_large(f"{what} ({len(result.token_ids)} ids)", entry_bytes(result), self.max_message_bytes)
        except RequestError as exc:
            log.info("tokenize_refused", request_id=request.request_id, reason=exc.message)
            return tokenizer_pb2.TokenizeResult(request_id=request.request_id, error=to_status(exc))
        except Exception as exc:
            log.exception("tokenize_failed", request_id=request.request_id)
            message = f"the tokenizer failed on this request: {type(exc).__name__}: {exc}"
            return tokenizer_pb2.TokenizeResult(request_id=request.request_id, error=error_status(grpc.StatusCode.INTERNAL, message))
        return result

    def Tokenize(self, request_iterator: Iterator[tokenizer_pb2.TokenizeBatch], context: grpc.ServicerContext) -> Iterator[tokenizer_pb2.TokenizedBatch]:
        """Every request gets one result, sent once it is ready: the results
        ready together go out packed in as few messages as fit."""
        ready: queue.SimpleQueue[tokenizer_pb2.TokenizeResult | int] = queue.SimpleQueue()
        threading.Thread(target=self._encode_all, args=(request_iterator, ready), name="tokenize-input", daemon=True).start()
        # The input's end arrives as the count of requests it held.
        answered, total = 0, None
        while total is None or answered < total:
            results = []
            item = ready.get()
            while True:
                if isinstance(item, int):
                    total = item
                else:
                    results.append(item)
                try:
                    item = ready.get_nowait()
                except queue.Empty:
                    break
            answered += len(results)
            for group in packed_sized(self._sendable((result, entry_bytes(result)) for result in results), self.max_message_bytes):
                yield tokenizer_pb2.TokenizedBatch(results=group)

    def _encode_all(self, request_iterator: Iterator[tokenizer_pb2.TokenizeBatch], ready: queue.SimpleQueue) -> None:
        """Hand every request of the stream to the pool, whose results land in
        `ready`; then the number of requests."""
        count = 0
        try:
            for batch in request_iterator:
                for request in batch.requests:
                    self._pool.submit(self.tokenize_result, request).add_done_callback(lambda done: ready.put(done.result()))
                    count += 1
        except grpc.RpcError:
            pass  # the caller went away; what it sent is still answered
        finally:
            ready.put(count)

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
            deltas = [delta for item in batch.items if (delta := self._detokenize_alone(item, live)) is not None]
            pieces = [piece for delta in deltas for piece in self._text_pieces(delta)]
            for group in packed_sized(self._sendable(pieces), self.max_message_bytes):
                yield tokenizer_pb2.TextBatch(deltas=group)

    def _detokenize_alone(self, item: tokenizer_pb2.DetokenizeItem, live: dict[str, IncrementalDetokenizer]) -> tokenizer_pb2.TextDelta | None:
        """detokenize_item, with a fault of the service failing (and closing) this request alone."""
        try:
            return self.detokenize_item(item, live)
        except Exception as exc:
            log.exception("detokenize_failed", request_id=item.request_id)
            live.pop(item.request_id, None)
            message = f"the detokenizer failed on this request: {type(exc).__name__}: {exc}"
            return tokenizer_pb2.TextDelta(request_id=item.request_id, error=error_status(grpc.StatusCode.INTERNAL, message), closed=True)

    def _text_pieces(self, delta: tokenizer_pb2.TextDelta) -> list[tuple[tokenizer_pb2.TextDelta, int]]:
        """The delta as deltas of the same request that each fit in a message
        (a few ids of long tokens can make more text than their message
        held), each with its entry_bytes; the flags go with the last piece."""
        size = entry_bytes(delta)
        if size <= self.max_message_bytes:
            return [(delta, size)]
        flags = tokenizer_pb2.TextDelta()
        flags.CopyFrom(delta)
        flags.ClearField("text")
        # The text field's own tag and length take at most 6 bytes, and a
        # character at most 4.
        room = max(1, (self.max_message_bytes - entry_bytes(flags) - 6) // 4)
        pieces = [tokenizer_pb2.TextDelta(request_id=delta.request_id, text=delta.text[at : at + room]) for at in range(0, len(delta.text), room)]
        pieces[-1].MergeFrom(flags)
        return [(piece, entry_bytes(piece)) for piece in pieces]

    def _sendable(self, sized_entries: Iterable[tuple[Any, int]]) -> list[tuple[Any, int]]:
        """The entries (with their entry_bytes) that fit in a message alone.
        Only a request id nearly as large as a message makes one that does
        not; it is dropped, since no reply could name it."""
        fitting = []
        for entry, size in sized_entries:
            if size <= self.max_message_bytes:
                fitting.append((entry, size))
            else:
                log.warning("reply dropped: its request id leaves no room in a message", request_id_bytes=len(entry.request_id.encode()))
        return fitting

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
