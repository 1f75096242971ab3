"""``vecpipe produce``: files, directories, JSONL or stdin -> chunks on the chunks topic."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from producers.chunking import (
    chunk_document,
    load_tokenizer,
    make_chunker,
    max_seq_length_of,
    truncation_report,
)
from producers.publisher import Publisher
from producers.readers import ReadFailure, iter_documents
from vecpipe.config import Config
from vecpipe.messages import Chunk, Document

__all__ = ["ProduceSummary", "produce"]


@dataclass
class ProduceSummary:
    """Counts of one produce run."""

    documents: int = 0
    chunks: int = 0
    empty: int = 0
    failures: list[ReadFailure] = field(default_factory=list)
    chunk_chars: list[int] = field(default_factory=list)
    chunk_texts: list[str] = field(default_factory=list)

    def line(self, seconds: float) -> str:
        """One line for the end of the run."""
        rate = self.documents / seconds if seconds > 0 else 0.0
        return (f"{self.documents} documents, {self.chunks} chunks, {self.empty} empty, "
                f"{len(self.failures)} unreadable in {seconds:.1f} s ({rate:.0f} documents/s)")


def produce(cfg: Config, paths: Sequence[str], *, include: Sequence[str] = ("*",),
            exclude: Sequence[str] = (), dry_run: bool = False, progress: bool = True) -> int:
    """Chunk and publish every readable document under ``paths``; return the exit status.

    Unreadable files are reported with their path and reason and counted; they never stop the run.
    Exit status 1 when any input could not be read, 0 otherwise.
    """
    splitter = make_chunker(cfg.produce.chunker, cfg.model.name, cfg.produce.chunk_size,
                            cfg.produce.chunk_overlap)
    publisher = None
    if not dry_run:
        def chunker(doc: Document) -> list[Chunk]:
            return chunk_document(doc, splitter)

        publisher = Publisher(cfg, chunker)
    summary = ProduceSummary()
    started = time.monotonic()
    bar = tqdm(unit="doc", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0)
    try:
        for item in iter_documents(paths, cfg.produce.tenant, include=include, exclude=exclude):
            if isinstance(item, ReadFailure):
                summary.failures.append(item)
                tqdm.write(f"skipped {item.source}: {item.reason}", file=sys.stderr)
                continue
            if publisher is not None:
                result = publisher.publish(item)
                n = result.chunks
            else:
                chunks = chunk_document(item, splitter)
                n = len(chunks)
                summary.chunk_chars.extend(len(c.text) for c in chunks)
                summary.chunk_texts.extend(c.text for c in chunks)
            summary.documents += 1
            summary.chunks += n
            summary.empty += n == 0
            bar.update(1)
            elapsed = max(time.monotonic() - started, 1e-6)
            bar.set_postfix(chunks=summary.chunks, chunks_s=f"{summary.chunks / elapsed:.0f}")
        if publisher is not None:
            publisher.flush()
    finally:
        bar.close()
    print(summary.line(time.monotonic() - started))
    if dry_run and summary.chunk_chars:
        sizes = summary.chunk_chars
        print(f"chunk characters: min {min(sizes)}, median {statistics.median(sizes):.0f}, "
              f"max {max(sizes)} ({cfg.produce.chunker} chunker, size {cfg.produce.chunk_size}, "
              f"overlap {cfg.produce.chunk_overlap})")
        # What the model would silently cut off: zero for the token-aware chunkers.
        tokenizer = load_tokenizer(cfg.model.name)
        limit = max_seq_length_of(cfg.model.name, tokenizer)
        report = truncation_report(summary.chunk_texts, tokenizer, limit)
        print(f"model tokens: {report['tokens']} in {report['chunks']} chunks, max "
              f"{report['max_tokens']} per chunk; {report['tokens_lost']} tokens in "
              f"{report['truncated_chunks']} chunks past the model's {limit}-token limit "
              "would be silently truncated")
    return 1 if summary.failures else 0
