"""``vecpipe bench embed``: the embed worker against raw model inference on the same texts.

Pipeline: N chunk messages of the demo corpus are written to a fresh chunks topic inside a Kafka
transaction, the real embed worker (``run_embed``, model already loaded) joins its group, and the
clock starts when the transaction commits; it stops when an independent consumer has seen the N-th
embedding message on the output topic (acknowledged by the broker).

Limit: ``Encoder.encode`` (``SentenceTransformer.encode``) on the same texts with the same batch
size, half measured before the pipeline and half after, so load that drifts weighs on both.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from producers.chunking import chunk_document, make_chunker
from producers.demo_corpus import write_demo_corpus
from vecpipe.bench.env import (
    HeldBack,
    Progress,
    StageRunner,
    TopicCounter,
    fresh_namespace,
    metric,
    poll_until,
)
from vecpipe.bench.stats import Target, rate, ratio, split_halves
from vecpipe.config import Config, ModelConfig
from vecpipe.db.migrate import migrate
from vecpipe.errors import BenchError
from vecpipe.kafka.admin import ensure_topics
from vecpipe.messages import CHUNK, Chunk, Document, encode_chunk, schema_headers
from vecpipe.model import Encoder

__all__ = [
    "EMBED_TARGET",
    "INT8_COSINE_TARGET",
    "INT8_SPEEDUP_TARGET",
    "Corpus",
    "demo_corpus",
    "encode_timed",
    "load_encoder",
    "model_info",
    "run",
    "stage_breakdown",
]

EMBED_TARGET = Target(">=", 0.90)
INT8_SPEEDUP_TARGET = Target(">=", 1.5)
INT8_COSINE_TARGET = Target(">=", 0.98)


@dataclass(frozen=True)
class Corpus:
    """Documents as their chunk lists, in publishing order."""
    documents: list[list[Chunk]]

    @property
    def chunks(self) -> list[Chunk]:
        """Every chunk, document after document."""
        return [c for doc in self.documents for c in doc]

    @property
    def texts(self) -> list[str]:
        """The chunk texts, in the same order."""
        return [c.text for c in self.chunks]

    def with_version(self, version: int) -> Corpus:
        """The same content published again as ``version``."""
        return Corpus([[replace(c, version=version) for c in doc] for doc in self.documents])

    def sizes(self) -> dict[str, Any]:
        """Counts and mean length, for the report."""
        texts = self.texts
        return {"documents": len(self.documents), "chunks": len(texts),
                "mean_chars": round(sum(map(len, texts)) / max(1, len(texts)), 1)}


def demo_corpus(cfg: Config, n: int, tenant: str, progress: Progress,
                version: int = 1) -> Corpus:
    """The first ``n`` chunks of the demo corpus (stdlib docstrings), token-chunked.

    Whole documents are taken in order; the last one is cut so exactly ``n`` chunks remain. If
    the corpus has fewer, it is taken again with each text marked by its round, so no text
    repeats (repeats would let vector reuse skip the model).
    """

    splitter = make_chunker("token", cfg.model.name, cfg.produce.chunk_size,
                            cfg.produce.chunk_overlap)
    with tempfile.TemporaryDirectory(prefix="vecpipe-bench-corpus-") as tmp:
        write_demo_corpus(Path(tmp))
        sources = [(p.stem, p.read_text("utf-8")) for p in sorted(Path(tmp).glob("*.md"))]
    if not sources:
        raise BenchError("The demo corpus is empty on this Python installation.")
    docs: list[list[Chunk]] = []
    total, rnd = 0, 0
    while total < n:
        for stem, text in sources:
            if total >= n:
                break
            doc_id = stem if rnd == 0 else f"{stem}~{rnd}"
            content = text if rnd == 0 else f"[round {rnd}] {text}"
            chunks = chunk_document(
                Document(tenant, doc_id, content, version, source_uri=f"demo://{stem}"),
                splitter)
            if chunks:
                docs.append(chunks[: n - total])
                total += len(docs[-1])
        rnd += 1
    progress(f"demo corpus: {total} chunks of {len(docs)} documents")
    return Corpus(docs)


def load_encoder(model: ModelConfig) -> Any:
    """The configured :class:`~vecpipe.model.Encoder`; a backend that cannot load is a sentence."""
    try:
        return Encoder(model)
    except ImportError as exc:
        raise BenchError(
            f"The {model.backend} backend cannot load in this environment ({exc}); its packages "
            "do not match the installed transformers. Fix the installation or pick another "
            "backend (--backend)."
        ) from None


def encode_timed(encoder: Any, texts: list[str],
                 batch_size: int) -> tuple[float, npt.NDArray[np.float32]]:
    """Seconds for one ``encode`` of ``texts`` at ``batch_size``, and the unit vectors."""
    started = time.perf_counter()
    vectors = encoder.encode(texts, batch_size)
    elapsed = time.perf_counter() - started
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return elapsed, (vectors / np.where(norms > 0, norms, 1)).astype(np.float32)


def model_info(encoder: Any) -> dict[str, Any]:
    """Model name, revision, backend, device (with the accelerator's name) and dimension."""
    device = str(encoder.device)
    device_name = None
    if device == "cuda":
        import torch

        device_name = torch.cuda.get_device_name(0)
    elif device == "mps":
        device_name = "Apple MPS"
    return {"name": encoder.name, "revision": encoder.revision, "backend": encoder.backend_tag,
            "device": device, "device_name": device_name, "dimension": encoder.dimension}


def stage_breakdown(samples: dict[str, float], stage: str, wall_s: float) -> dict[str, Any]:
    """Where a worker's time went, from its own metrics: batches, model time, processing time."""
    batches = metric(samples, "vecpipe_batch_seconds_count")
    out: dict[str, Any] = {
        "wall_s": round(wall_s, 3),
        "batches": int(batches),
        "mean_batch": round(metric(samples, "vecpipe_batch_size_sum") / batches, 1)
        if batches else 0,
        "processing_s": round(metric(samples, "vecpipe_batch_seconds_sum"), 3),
    }
    if stage == "embed":
        out["model_s"] = round(metric(samples, "vecpipe_encode_seconds_sum"), 3)
        out["reused"] = int(metric(samples, "vecpipe_unchanged_total"))
    out["dead_letters"] = int(metric(samples, "vecpipe_dead_letters_total"))
    return out


def publish_held(cfg: Config, chunks: list[Chunk]) -> HeldBack:
    """The chunk messages, written to the chunks topic in a transaction not yet committed."""
    held = HeldBack(cfg)
    headers = schema_headers(CHUNK)
    for c in chunks:
        held.produce(cfg.kafka.chunks_topic, encode_chunk(c), c.key, headers)
    held.flush()
    return held


def run(cfg: Config, progress: Progress, *, chunks: int) -> dict[str, Any]:
    """Measure the embed stage against raw encode; return the report's sections."""
    corpus = demo_corpus(cfg, chunks, "bench", progress)
    texts = corpus.texts
    batch = cfg.embed.batch_size
    progress(f"loading the model ({cfg.model.backend}, {cfg.model.device})")
    started = time.perf_counter()
    encoder = load_encoder(cfg.model)
    load_s = time.perf_counter() - started
    encoder.encode(texts[:batch], batch)  # first call pays lazy initialisation: not measured
    first, second = split_halves(len(texts))

    progress(f"limit, first half: encode {first.stop} texts, batch size {batch}")
    limit_a, vec_a = encode_timed(encoder, texts[first], batch)

    with fresh_namespace(cfg, progress) as ns:
        migrate(ns, with_index=False)  # the worker's vector-reuse look-ups need the table
        ensure_topics(ns.kafka)
        progress(f"writing {len(texts)} chunk messages (held back in a transaction)")
        held = publish_held(ns, corpus.chunks)
        counter = TopicCounter(ns, ns.kafka.embeddings_topic, len(texts))
        runner = StageRunner("embed", ns, encoder).start()
        try:
            progress("embed worker ready; releasing the input")
            t0 = held.release()
            poll_until(lambda: counter.count, len(texts), timeout=max(600.0, len(texts) * 2.0),
                       progress=progress, what="embeddings out", interval=0.05,
                       check=runner.check_alive)
            while counter.reached_at is None:
                time.sleep(0.005)
            wall = counter.reached_at - t0
        finally:
            runner.close()
            counter.close()
        samples = runner.metrics()

    progress(f"limit, second half: encode {second.stop - second.start} texts")
    limit_b, vec_b = encode_timed(encoder, texts[second], batch)
    limit_s = limit_a + limit_b
    pipeline_per_s = rate(len(texts), wall)
    limit_per_s = rate(len(texts), limit_s)
    embed: dict[str, Any] = {
        "pipeline_per_s": round(pipeline_per_s, 2),
        "limit_per_s": round(limit_per_s, 2),
        "ratio": ratio(pipeline_per_s, limit_per_s),
        "target": {"ratio": str(EMBED_TARGET)},
        "meets_target": {"ratio": EMBED_TARGET.met(ratio(pipeline_per_s, limit_per_s))},
        "pipeline_s": round(wall, 3),
        "limit_s": round(limit_s, 3),
        "limit_halves_s": [round(limit_a, 3), round(limit_b, 3)],
        "model_load_s": round(load_s, 2),
        "worker": stage_breakdown(samples, "embed", wall),
    }
    if cfg.model.backend == "onnx-int8":
        embed.update(_int8_versus_fp32(cfg, texts, batch, limit_s,
                                       np.concatenate([vec_a, vec_b]), progress))
        embed["target"].update(speedup_vs_fp32=str(INT8_SPEEDUP_TARGET),
                               mean_cosine=str(INT8_COSINE_TARGET))
        embed["meets_target"].update(
            speedup_vs_fp32=INT8_SPEEDUP_TARGET.met(embed["speedup_vs_fp32"]),
            mean_cosine=INT8_COSINE_TARGET.met(embed["mean_cosine"]))
    tokens = [encoder.count_tokens(t) for t in texts]
    sizes = {**corpus.sizes(), "mean_tokens": round(sum(tokens) / len(tokens), 1),
             "batch_size": batch, "batch_tokens": cfg.embed.batch_tokens,
             "batch_wait_ms": cfg.embed.batch_wait_ms}
    return {"model": model_info(encoder), "sizes": sizes, "embed": embed}


def _int8_versus_fp32(cfg: Config, texts: list[str], batch: int, int8_s: float,
                      int8_vectors: npt.NDArray[np.float32], progress: Progress) -> dict[str, Any]:
    """Raw speed of fp32 torch on the same texts, and how closely int8 agrees with it."""
    progress("loading fp32 torch for the int8 comparison")
    fp32 = load_encoder(replace(cfg.model, backend="torch", precision="fp32"))
    fp32.encode(texts[:batch], batch)
    progress(f"fp32 torch: encode {len(texts)} texts")
    fp32_s, fp32_vectors = encode_timed(fp32, texts, batch)
    cosines = np.sum(int8_vectors * fp32_vectors, axis=1)
    return {
        "fp32_limit_per_s": round(rate(len(texts), fp32_s), 2),
        "speedup_vs_fp32": round(fp32_s / int8_s, 3) if int8_s > 0 else 0.0,
        "mean_cosine": round(float(np.mean(cosines)), 5),
        "min_cosine": round(float(np.min(cosines)), 5),
    }
