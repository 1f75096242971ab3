"""The record boundary: each consumed record becomes the stage's input, or that record's failure.

Decoding, validating against the contract and converting to what the stage works on happen here,
one record at a time. Whatever is raised in there, whichever library raises it, is that record's
fault: it becomes a failure of its own (dead-lettered with the reason) and the rest of the batch
goes on. No input can cross this boundary and stop a stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from confluent_kafka import Message

from vecpipe.errors import InvalidMessage, PermanentError
from vecpipe.messages import Chunk, ChunkGap, Delete, Embedding, decode
from vecpipe.stages.settle import Failure

__all__ = ["Decoded", "DecodedBatch", "as_record_fault", "decode_batch"]

T = TypeVar("T")
Decoded = Chunk | Delete | Embedding | ChunkGap


@dataclass
class DecodedBatch(Generic[T]):
    """What a batch decoded to: the inputs in batch order, and the records that failed."""

    inputs: list[tuple[Message, T]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def decode_batch(messages: Sequence[Message],
                 convert: Callable[[Message, Decoded], T]) -> DecodedBatch[T]:
    """Decode every record by the schema its headers name and ``convert`` it; a record whose
    decoding or conversion raises anything becomes a failure of its own."""
    out: DecodedBatch[T] = DecodedBatch()
    for msg in messages:
        try:
            out.inputs.append((msg, convert(msg, decode(msg.value(), msg.headers()))))
        except Exception as exc:
            out.failures.append(Failure(msg, as_record_fault(exc)))
    return out


def as_record_fault(exc: Exception) -> PermanentError:
    """``exc`` as the record's fault: our own sentence as it is, anything else wrapped in one
    that names what was raised (the original stays the cause, for the stack trace)."""
    if isinstance(exc, PermanentError):
        return exc
    fault = InvalidMessage(f"the record could not be read: {type(exc).__name__}: {exc}")
    fault.__cause__ = exc
    return fault
