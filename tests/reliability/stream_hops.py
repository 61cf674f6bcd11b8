"""The internal streams and the public Generate as the fuzz tests drive
them: for each, how its items travel (a Hop), its well-formed requests, the
sweep of every field of its request message over that field's extremes, and
hypothesis draws of whole requests, each with the protos' verdict on it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from hypothesis import strategies as st

from pagewire.services.common.limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MIN_OUTPUT_TOKENS
from pagewire.v1 import common_pb2, engine_pb2, engine_pb2_grpc, gateway_pb2, gateway_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from tests.reliability.fuzz_inputs import (
    CHAT_ROLES,
    DURATIONS,
    ROLES,
    SPECIAL_TEXTS,
    Verdict,
    duration,
    id_lists,
    prompt_ids_verdict,
    request_ids,
    sampling_params,
    sampling_sweep,
    sampling_verdict,
    stop_verdict,
    chat_turns,
    texts,
    timeout_verdict,
    timeouts,
    token_ids,
)
from tests.reliability.stream_clients import MultiplexedStream, engine_events, gateway_events, text_events, tokenized_events
from tests.reliability.stream_sessions import CHANNEL_OPTIONS, SETTLE_S, Item, unique
from tests.support.harness import Cluster

GOOD_MAX_TOKENS = 8
GOOD_TEXTS = ("The capital of France is", "def fibonacci(n):", "Water boils at a temperature of")
GOOD_CHAT = (("system", "Answer in one word."), ("user", "What colour is the sky on a clear day?"))


@dataclass(frozen=True)
class Facts:
    """What the cluster serves, read from its processes."""

    cluster: Cluster
    model_id: str
    vocab_size: int
    max_model_len: int
    eos_token_id: int
    good_prompts: tuple[tuple[int, ...], ...]
    # The greedy output of each, from the engine.
    good_outputs: tuple[tuple[int, ...], ...] = ()


def renamed(message: Any, request_id: str) -> Any:
    """A copy of a request message (None stays None) under another request_id."""
    if message is None:
        return None
    copy = type(message)()
    copy.CopyFrom(message)
    copy.request_id = request_id
    return copy


# --- the engine's Generate ------------------------------------------------------


class EngineHop:
    name = "engine Generate"

    def open(self, channel: grpc.aio.Channel) -> MultiplexedStream:
        return MultiplexedStream(engine_pb2_grpc.EngineStub(channel).Generate(), engine_events)

    def with_id(self, payload: engine_pb2.AddRequest | None, request_id: str) -> engine_pb2.AddRequest | None:
        return renamed(payload, request_id)

    def messages(self, items: Sequence[Item]) -> list[engine_pb2.EngineInput]:
        adds = [item.payload for item in items if item.payload is not None]
        aborts = [item.request_id for item in items if item.stop_early or item.payload is None]
        return [engine_pb2.EngineInput(add=adds, abort=aborts)]


def greedy(max_tokens: int | None = 1) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def unbounded(params: common_pb2.SamplingParams) -> bool:
    return not params.HasField("max_tokens") or params.max_tokens > 2


def add_item(facts: Facts, name: str, add: engine_pb2.AddRequest) -> Item:
    verdict = prompt_ids_verdict(list(add.prompt_token_ids), facts.vocab_size, facts.max_model_len) + sampling_verdict(add.sampling, facts.vocab_size, facts.max_model_len)
    if not add.request_id:
        verdict += Verdict(["an empty request_id"])
    if add.HasField("timeout"):
        verdict += timeout_verdict(add.timeout)
    return Item(name, add.request_id, add, verdict, stop_early=unbounded(add.sampling))


def engine_goods(facts: Facts) -> list[Item]:
    return [Item(f"prompt{i}", "", engine_pb2.AddRequest(prompt_token_ids=ids, sampling=greedy(GOOD_MAX_TOKENS))) for i, ids in enumerate(facts.good_prompts)]


def engine_sweep(facts: Facts) -> list[Item]:
    """Every field of AddRequest at each of its extremes, the rest valid."""
    prompt = facts.good_prompts[0]

    def add(ids: Sequence[int] = prompt, sampling: common_pb2.SamplingParams | None = None, request_id: str | None = None) -> engine_pb2.AddRequest:
        return engine_pb2.AddRequest(request_id=unique("engine") if request_id is None else request_id, prompt_token_ids=ids, sampling=sampling or greedy())

    items = [add_item(facts, name, add(sampling=params)) for name, params in sampling_sweep(greedy(), facts.vocab_size)]
    items += [add_item(facts, f"prompt of {len(ids)} ids up to {max(ids, default=0)}", add(ids=ids)) for ids in id_lists(facts.vocab_size)]
    for seconds, nanos in DURATIONS:
        timed = add()
        timed.timeout.CopyFrom(duration(seconds, nanos))
        items.append(add_item(facts, f"timeout=({seconds} s, {nanos} ns)", timed))
    items.append(add_item(facts, "empty request_id", add(request_id="")))
    items.append(add_item(facts, "a 10k-character request_id", add(request_id="x" * 10_000 + unique(""))))
    items.append(Item("a duplicate of a live request's id", "", add(), Verdict(["a duplicate id"]), duplicate=True))
    items += [Item(f"abort of an unknown id {rid[:12]!r}", rid, None, finals=0) for rid in (unique("never-added"), "y" * 10_000)]
    return items


@st.composite
def engine_draws(draw: st.DrawFn, facts: Facts) -> Item:
    ids = draw(token_ids(facts.vocab_size))
    add = engine_pb2.AddRequest(request_id=draw(request_ids("draw-")), prompt_token_ids=ids, sampling=draw(sampling_params(st.none() | st.integers(0, 2))))
    if draw(st.booleans()):
        add.timeout.CopyFrom(draw(timeouts()))
    return add_item(facts, f"hypothesis draw {add.request_id[:20]!r}", add)


# --- the gateway's public Generate -----------------------------------------------


class GatewayHop:
    name = "gateway Generate"

    def open(self, channel: grpc.aio.Channel) -> MultiplexedStream:
        return MultiplexedStream(gateway_pb2_grpc.GenerationStub(channel).Generate(), gateway_events)

    def with_id(self, payload: gateway_pb2.GenerateRequest | None, request_id: str) -> gateway_pb2.GenerateRequest | None:
        return renamed(payload, request_id)

    def messages(self, items: Sequence[Item]) -> list[gateway_pb2.ClientMessage]:
        starts = [gateway_pb2.ClientMessage(start=item.payload) for item in items if item.payload is not None]
        cancels = [gateway_pb2.ClientMessage(cancel=gateway_pb2.Cancel(request_id=item.request_id)) for item in items if item.stop_early or item.payload is None]
        return starts + cancels


def utf8_tokens_at_most(text: str) -> int:
    """Byte-level BPE gives a byte at most one token; the BOS besides."""
    return len(text.encode()) + 1


def generate_item(facts: Facts, name: str, request: gateway_pb2.GenerateRequest) -> Item:
    verdict = sampling_verdict(request.sampling, facts.vocab_size, facts.max_model_len) + stop_verdict(list(request.stop))
    if not request.request_id:
        verdict += Verdict(["no request_id on Generate"])
    if request.model not in ("", facts.model_id):
        verdict += Verdict([f"unknown model {request.model[:20]!r}"])
    if request.HasField("timeout"):
        verdict += timeout_verdict(request.timeout)
    kind = request.WhichOneof("input")
    longest = facts.max_model_len - MIN_OUTPUT_TOKENS
    if kind is None:
        verdict += Verdict(["no input"])
    elif kind == "token_ids":
        verdict += prompt_ids_verdict(list(request.token_ids.ids), facts.vocab_size, facts.max_model_len)
    elif kind == "text":
        verdict += Verdict(["empty text"]) if not request.text else Verdict(may_refuse=["a long text"]) if utf8_tokens_at_most(request.text) > longest else Verdict()
    else:
        messages = request.chat.messages
        if not messages:
            verdict += Verdict(["a chat without messages"])
        if any(m.role not in CHAT_ROLES for m in messages):
            verdict += Verdict(["an unknown role"])
        # The template's system prompt and markers: well under 100 tokens.
        if sum(utf8_tokens_at_most(m.role + m.content) + 8 for m in messages) + 100 > longest:
            verdict += Verdict(may_refuse=["a long chat"])
    return Item(name, request.request_id, request, verdict, stop_early=unbounded(request.sampling))


def text_request(text: str, sampling: common_pb2.SamplingParams | None = None, **fields: Any) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(request_id=unique("gateway"), text=text, sampling=sampling or greedy(), **fields)


def chat_request(turns: Sequence[tuple[str, str]], sampling: common_pb2.SamplingParams | None = None) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(request_id=unique("gateway"), sampling=sampling or greedy())
    request.chat.messages.extend(common_pb2.ChatMessage(role=role, content=content) for role, content in turns)
    request.chat.SetInParent()
    return request


def gateway_goods(facts: Facts) -> list[Item]:
    goods = [Item(f"text{i}", "", text_request(text, greedy(GOOD_MAX_TOKENS))) for i, text in enumerate(GOOD_TEXTS)]
    ids = gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=facts.good_prompts[0]), sampling=greedy(GOOD_MAX_TOKENS))
    return [*goods, Item("token_ids", "", ids), Item("chat", "", chat_request(GOOD_CHAT, greedy(GOOD_MAX_TOKENS)))]


def gateway_sweep(facts: Facts) -> list[Item]:
    """Every field of GenerateRequest at each of its extremes, the rest valid."""
    requests = [(name, text_request("Hello", params)) for name, params in sampling_sweep(greedy(), facts.vocab_size)]
    requests += [(f"text of {len(text)} characters {text[:16]!r}", text_request(text)) for text in texts()]
    for ids in id_lists(facts.vocab_size):
        request = gateway_pb2.GenerateRequest(request_id=unique("gateway"), token_ids=gateway_pb2.TokenIds(ids=ids), sampling=greedy())
        request.token_ids.SetInParent()
        requests.append((f"token_ids: {len(ids)} up to {max(ids, default=0)}", request))
    requests += [(f"chat, {role!r} says {text[:16]!r}", chat_request([(role, text)])) for role in ROLES for text in texts()[:-1]]
    requests += [("a chat without messages", chat_request([])), ("500 chat turns", chat_request([("user", "hi"), ("assistant", "hello")] * 250))]
    requests += [(f"model {model[:16]!r}", text_request("Hello", model=model)) for model in ("", facts.model_id, "gpt-4", "/etc/passwd", "m" * 10_000)]
    stops = [[""], ["s"] * (MAX_STOP_STRINGS + 1), ["s" * (MAX_STOP_STRING_CHARS + 1)], [str(i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS)], list(SPECIAL_TEXTS[:3])]
    requests += [(f"stop: {len(stop)} strings, longest {max(map(len, stop))}", text_request("Hello", stop=stop)) for stop in stops]
    for seconds, nanos in DURATIONS:
        timed = text_request("Hello")
        timed.timeout.CopyFrom(duration(seconds, nanos))
        requests.append((f"timeout=({seconds} s, {nanos} ns)", timed))
    requests += [("skip_special_tokens=False", text_request("Hello", skip_special_tokens=False)), ("include_stop_str_in_output", text_request("Hello", stop=["o"], include_stop_str_in_output=True))]
    long_id = text_request("Hello")
    long_id.request_id = "x" * 10_000 + unique("")
    requests += [("no input", gateway_pb2.GenerateRequest(request_id=unique("gateway"), sampling=greedy())), ("a 10k-character request_id", long_id)]
    items = [generate_item(facts, name, request) for name, request in requests]
    # The one item without an id: the refusal's chunk carries none either.
    items.append(Item("an empty ClientMessage", "", gateway_pb2.GenerateRequest(), Verdict(["no request_id"])))
    items += [Item(f"cancel of an unknown id {rid[:12]!r}", rid, None, finals=0) for rid in (unique("never-started"), "z" * 10_000)]
    return items


@st.composite
def gateway_draws(draw: st.DrawFn, facts: Facts) -> Item:
    request = gateway_pb2.GenerateRequest(
        request_id=draw(request_ids("draw-")),
        model=draw(st.sampled_from(["", facts.model_id, "llama"])),
        sampling=draw(sampling_params(st.none() | st.integers(0, 2))),
        stop=draw(st.lists(st.sampled_from(["", "\n", *SPECIAL_TEXTS[:3]]) | st.text(max_size=8), max_size=MAX_STOP_STRINGS + 1)),
        include_stop_str_in_output=draw(st.booleans()),
    )
    kind = draw(st.sampled_from(["text", "token_ids", "chat"]))
    if kind == "text":
        request.text = draw(st.sampled_from(texts()) | st.text(max_size=64))
    elif kind == "token_ids":
        request.token_ids.ids.extend(draw(token_ids(facts.vocab_size)))
        request.token_ids.SetInParent()
    else:
        request.chat.messages.extend(common_pb2.ChatMessage(role=role, content=content) for role, content in draw(chat_turns()))
        request.chat.SetInParent()
    if draw(st.booleans()):
        request.timeout.CopyFrom(draw(timeouts()))
    return generate_item(facts, f"hypothesis draw {request.request_id[:20]!r}", request)


# --- the tokenizer's Detokenize --------------------------------------------------


class DetokenizeHop:
    name = "tokenizer Detokenize"

    def open(self, channel: grpc.aio.Channel) -> MultiplexedStream:
        return MultiplexedStream(tokenizer_pb2_grpc.TokenizerStub(channel).Detokenize(), text_events)

    def with_id(self, payload: list[tokenizer_pb2.DetokenizeItem], request_id: str) -> list[tokenizer_pb2.DetokenizeItem]:
        return [renamed(item, request_id) for item in payload]

    def messages(self, items: Sequence[Item]) -> list[tokenizer_pb2.DetokenizeBatch]:
        # A well-formed request's tokens come in pieces, the items of the batch between them.
        good, *rest = items
        first, *later = good.payload
        interleaved = [first, *(part for item in rest for part in item.payload)]
        return [tokenizer_pb2.DetokenizeBatch(items=interleaved), tokenizer_pb2.DetokenizeBatch(items=later)]


def detokenize_goods(facts: Facts) -> list[Item]:
    goods = []
    for i, (prompt, output) in enumerate(zip(facts.good_prompts, facts.good_outputs, strict=True)):
        start = tokenizer_pb2.DetokenizeStart(prompt_tail_ids=prompt[-8:], stop=["\n\n\n"])
        parts = [tokenizer_pb2.DetokenizeItem(start=start, append=tokenizer_pb2.DetokenizeAppend(token_ids=output[:1]))]
        parts += [tokenizer_pb2.DetokenizeItem(append=tokenizer_pb2.DetokenizeAppend(token_ids=[token])) for token in output[1:]]
        parts.append(tokenizer_pb2.DetokenizeItem(append=tokenizer_pb2.DetokenizeAppend(last=True)))
        goods.append(Item(f"output{i}", "", parts))
    return goods


def detokenize_item(facts: Facts, name: str, start: tokenizer_pb2.DetokenizeStart | None, token_ids: Sequence[int], request_id: str | None = None) -> Item:
    """A request opened by `start` (unless None) and closed by one append of `token_ids`."""
    rid = unique("detok") if request_id is None else request_id
    item = tokenizer_pb2.DetokenizeItem(request_id=rid, append=tokenizer_pb2.DetokenizeAppend(token_ids=token_ids, last=True))
    verdict = Verdict(["ids outside the vocabulary"] if any(t >= facts.vocab_size for t in token_ids) else [])
    if start is None:
        verdict += Verdict(["an append to a request never started"])
    else:
        item.start.CopyFrom(start)
        verdict += stop_verdict(list(start.stop))
        if any(t >= facts.vocab_size for t in start.prompt_tail_ids):
            verdict += Verdict(["prompt_tail_ids outside the vocabulary"])
    return Item(name, rid, [item], verdict)


def detokenize_sweep(facts: Facts) -> list[Item]:
    start = tokenizer_pb2.DetokenizeStart
    items = [detokenize_item(facts, f"append of {len(ids)} ids up to {max(ids, default=0)}", start(), ids) for ids in id_lists(facts.vocab_size)]
    items += [detokenize_item(facts, f"prompt_tail_ids of {len(ids)} up to {max(ids, default=0)}", start(prompt_tail_ids=ids), [30]) for ids in id_lists(facts.vocab_size)]
    stops = [[""], ["s"] * (MAX_STOP_STRINGS + 1), ["s" * (MAX_STOP_STRING_CHARS + 1)], [str(i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS)], list(SPECIAL_TEXTS)]
    items += [detokenize_item(facts, f"stop: {len(stop)} strings, longest {max(map(len, stop))}", start(stop=stop), [30, 198]) for stop in stops]
    items += [detokenize_item(facts, f"skip_special_tokens={skip}", start(skip_special_tokens=skip), [0, 1, 2, facts.vocab_size - 1]) for skip in (False, True)]
    items.append(detokenize_item(facts, "include_stop_str_in_output", start(stop=["."], include_stop_str_in_output=True), [30, 198]))
    items.append(detokenize_item(facts, "an append to a request never started", None, [30]))
    items.append(detokenize_item(facts, "empty request_id", start(), [30], request_id=""))
    items.append(Item("a duplicate start of a live request", "", [tokenizer_pb2.DetokenizeItem(start=start())], Verdict(["a duplicate id"]), duplicate=True))
    items += [Item(f"cancel of an unknown id {rid[:12]!r}", rid, [tokenizer_pb2.DetokenizeItem(request_id=rid, cancel=True)], finals=0) for rid in (unique("never"), "c" * 10_000)]
    return items


@st.composite
def detokenize_draws(draw: st.DrawFn, facts: Facts) -> Item:
    """Appends at most max_model_len ids, the most a request can produce;
    longer ones are a case of their own (test_stream_fuzz's
    detokenize-long-append-with-stop-strings)."""
    ids = token_ids(facts.vocab_size)
    start = None
    if draw(st.integers(0, 9)):
        start = tokenizer_pb2.DetokenizeStart(
            stop=draw(st.lists(st.sampled_from(["", *SPECIAL_TEXTS[:3]]) | st.text(max_size=8), max_size=MAX_STOP_STRINGS + 1)),
            include_stop_str_in_output=draw(st.booleans()),
            skip_special_tokens=draw(st.none() | st.booleans()),
            prompt_tail_ids=draw(ids),
        )
    appended = draw(ids)[: facts.max_model_len]
    return detokenize_item(facts, "hypothesis draw", start, appended, request_id=draw(request_ids("draw-")))


# --- the tokenizer's Tokenize ---------------------------------------------------------


class TokenizeHop:
    name = "tokenizer Tokenize"

    def open(self, channel: grpc.aio.Channel) -> MultiplexedStream:
        return MultiplexedStream(tokenizer_pb2_grpc.TokenizerStub(channel).Tokenize(), tokenized_events)

    def with_id(self, payload: tokenizer_pb2.TokenizeRequest, request_id: str) -> tokenizer_pb2.TokenizeRequest:
        return renamed(payload, request_id)

    def messages(self, items: Sequence[Item]) -> list[tokenizer_pb2.TokenizeBatch]:
        return [tokenizer_pb2.TokenizeBatch(requests=[item.payload for item in items])]


def tokenize_item(name: str, request: tokenizer_pb2.TokenizeRequest) -> Item:
    kind = request.WhichOneof("input")
    refuse = []
    if kind is None:
        refuse.append("no input")
    elif kind == "text" and not request.text:
        refuse.append("empty text")
    elif kind == "chat":
        if not request.chat.messages:
            refuse.append("a chat without messages")
        if any(m.role not in CHAT_ROLES for m in request.chat.messages):
            refuse.append("an unknown role")
    return Item(name, request.request_id, request, Verdict(refuse))


def chat(turns: Sequence[tuple[str, str]], **fields: Any) -> tokenizer_pb2.Chat:
    return tokenizer_pb2.Chat(messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in turns], **fields)


def tokenize_goods() -> list[Item]:
    goods = [Item(f"text{i}", "", tokenizer_pb2.TokenizeRequest(text=text)) for i, text in enumerate(GOOD_TEXTS)]
    return [*goods, Item("chat", "", tokenizer_pb2.TokenizeRequest(chat=chat(GOOD_CHAT)))]


def tokenize_sweep() -> list[Item]:
    def request(**fields: Any) -> tokenizer_pb2.TokenizeRequest:
        return tokenizer_pb2.TokenizeRequest(request_id=unique("tok"), **fields)

    items = [tokenize_item(f"text {text[:16]!r} ({len(text)}), add_special_tokens={special}", request(text=text, add_special_tokens=special)) for text in texts() for special in (None, False, True)]
    for role in ROLES:
        items += [tokenize_item(f"chat, {role!r} says {text[:16]!r} ({len(text)})", request(chat=chat([(role, text)]))) for text in texts()]
    items += [
        tokenize_item("a chat without messages", request(chat=chat([]))),
        tokenize_item("a chat without the generation prompt", request(chat=chat([("user", "hi")], add_generation_prompt=False))),
        tokenize_item("roles that do not alternate", request(chat=chat([("assistant", "a")] * 3 + [("system", "late")]))),
        tokenize_item("500 chat turns", request(chat=chat([("user", "hi"), ("assistant", "hello")] * 250))),
        tokenize_item("no input", request()),
        tokenize_item("empty request_id", tokenizer_pb2.TokenizeRequest(request_id="", text="no id")),
    ]
    return items


@st.composite
def tokenize_draws(draw: st.DrawFn) -> Item:
    request = tokenizer_pb2.TokenizeRequest(request_id=draw(request_ids("draw-")), add_special_tokens=draw(st.none() | st.booleans()))
    kind = draw(st.sampled_from(["text", "chat", "none"]))
    if kind == "text":
        request.text = draw(st.sampled_from(texts()) | st.text(max_size=64))
    elif kind == "chat":
        request.chat.CopyFrom(chat(draw(chat_turns())))
        request.chat.SetInParent()
    return tokenize_item("hypothesis draw", request)


async def tokenize(address: str, texts: Sequence[str], **fields: Any) -> list[list[int]]:
    """The token ids of each text, on a Tokenize stream of their own."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stream = TokenizeHop().open(channel)
        ids = [unique("tokenize") for _ in texts]
        await stream.send(tokenizer_pb2.TokenizeBatch(requests=[tokenizer_pb2.TokenizeRequest(request_id=rid, text=text, **fields) for rid, text in zip(ids, texts, strict=True)]))
        await stream.settle(Counter(ids), SETTLE_S)
        await stream.close()
        return [stream.outcome(rid).token_ids for rid in ids]
