"""Every message a service sends stays within --max-message-bytes: gRPC
fails the whole stream on a larger one, and with it every request the stream
carries. The streams' messages are batches (repeated fields of items), so a
sender packs items while they fit and starts the next message when the next
item would not; an item too large on its own fails alone.

Sizes are exact: a batch whose fields are all repeated serializes to the
concatenation of its items' encodings, each a tag, a length and the item."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from google.protobuf.message import Message

from pagewire.services.common.errors import Refusal, RequestError

M = TypeVar("M", bound=Message)


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def entry_bytes(item: Message, field_number: int = 1) -> int:
    """Bytes `item` takes as one entry of a repeated message field."""
    size = item.ByteSize()
    # Most entries: a one-byte tag (fields 1-15) and a one-byte length.
    if field_number < 16 and size < 128:
        return size + 2
    return _varint_bytes(field_number << 3) + _varint_bytes(size) + size


def too_large(what: str, size: int, max_bytes: int) -> RequestError:
    return RequestError(
        Refusal.INVALID_ARGUMENT,
        f"{what} takes {size} bytes, more than one message may hold (--max-message-bytes {max_bytes}); send less at once",
    )


def packed(items: Iterable[M], max_bytes: int) -> Iterator[list[M]]:
    """The items in order, grouped so that each group's entries fit in
    max_bytes. An item that does not fit alone is a group of its own: the
    caller checks items before they get here."""
    return packed_sized(((item, entry_bytes(item)) for item in items), max_bytes)


def packed_sized(sized_items: Iterable[tuple[M, int]], max_bytes: int) -> Iterator[list[M]]:
    """packed(), for items whose entry_bytes the caller has already taken."""
    group: list[M] = []
    size = 0
    for item, item_size in sized_items:
        if group and size + item_size > max_bytes:
            yield group
            group, size = [], 0
        group.append(item)
        size += item_size
    if group:
        yield group


def split_batch(batch: M, max_bytes: int) -> list[M]:
    """`batch` (a message of repeated fields only) as batches of at most
    max_bytes each, the entries of each field in their order. RequestError
    (INVALID_ARGUMENT) when one entry does not fit in a message alone."""
    pieces: list[M] = []
    piece, size = type(batch)(), 0
    for field, values in batch.ListFields():
        for value in values:
            entry = type(batch)(**{field.name: [value]})
            entry_size = entry.ByteSize()
            if entry_size > max_bytes:
                raise too_large(f"one {field.name} entry of {type(batch).__name__}", entry_size, max_bytes)
            if size + entry_size > max_bytes:
                pieces.append(piece)
                piece, size = type(batch)(), 0
            piece.MergeFrom(entry)
            size += entry_size
    if size:
        pieces.append(piece)
    return pieces
