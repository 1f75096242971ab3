"""The record boundary: each consumed record becomes the stage's input, or that record's failure.

Decoding, validating against the contract and converting to what the stage works on happen here,
for one record at a time, so that a record that cannot be read fails alone and the rest of the
batch goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from confluent_kafka import Message

from vecpipe.errors import PermanentError
from vecpipe.messages import Chunk, Delete, Embedding, decode
from vecpipe.stages.settle import Failure

__all__ = ["Decoded", "DecodedBatch", "decode_batch"]

T = TypeVar("T")
Decoded = Chunk | Delete | Embedding


@dataclass
class DecodedBatch(Generic[T]):
    """What a batch decoded to: the inputs in batch order, and the records that failed."""

    inputs: list[tuple[Message, T]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def decode_batch(messages: Sequence[Message],
                 convert: Callable[[Message, Decoded], T]) -> DecodedBatch[T]:
    """Decode every record by the schema its headers name and ``convert`` it; a record whose
    decoding or conversion raises :class:`PermanentError` becomes a failure of its own."""
    out: DecodedBatch[T] = DecodedBatch()
    for msg in messages:
        try:
            out.inputs.append((msg, convert(msg, decode(msg.value(), msg.headers()))))
        except PermanentError as exc:
            out.failures.append(Failure(msg, exc))
    return out
