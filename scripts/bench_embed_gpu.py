"""The embed stage on a GPU: raw encode against the stage's processing of the same chunks.

For a GPU machine without a JVM (so without a local Kafka): the stage runs on in-memory
messages with an in-memory producer, so the ratio is what the stage's own work (decode,
validate, reuse look-up, length sort, normalize, serialize) leaves of the model's speed.

    GPU_MODEL=/path/to/model GPU_CHUNKS=8000 python scripts/bench_embed_gpu.py > gpu.json

GPU_DEVICE (cuda), GPU_PRECISIONS (fp32,fp16,bf16) and GPU_CHUNKS (4000) are optional.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from producers.chunking import TokenSplitter, chunk_document
from producers.demo_corpus import write_demo_corpus
from vecpipe.config import ModelConfig, default_model_path, load_config
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.health import Metrics
from vecpipe.kafka.consumer import Batch
from vecpipe.logs import configure_logging, get_logger
from vecpipe.messages import CHUNK, Document, encode_chunk, schema_headers
from vecpipe.model import Encoder
from workers.embed import EmbedProcessor

MODEL = os.environ.get("GPU_MODEL") or default_model_path()
DEVICE = os.environ.get("GPU_DEVICE", "cuda")
LIMIT = int(os.environ.get("GPU_CHUNKS", "4000"))


@dataclass
class Msg:
    v: bytes
    k: bytes
    o: int
    h: list[tuple[str, bytes]] = field(default_factory=lambda: schema_headers(CHUNK))

    def topic(self) -> str: return "vecpipe.chunks"
    def partition(self) -> int: return 0
    def offset(self) -> int: return self.o
    def key(self) -> bytes: return self.k
    def value(self) -> bytes: return self.v
    def headers(self) -> list[tuple[str, bytes]]: return self.h
    def timestamp(self) -> tuple[int, int]: return (1, 1_700_000_000_000)
    def error(self) -> None: return None


class Sink:
    """A producer that keeps nothing: the broker is not on this machine."""

    def __init__(self) -> None:
        self.bytes = 0

    def produce(self, topic: str, value: bytes | None, key: Any = None, headers: Any = None,
                timestamp: Any = None) -> None:
        self.bytes += len(value or b"")

    def flush(self, timeout: float = 60.0) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def main() -> None:
    configure_logging("json", "warning")
    corpus = Path("/tmp/demo-corpus")
    write_demo_corpus(corpus)
    splitter = TokenSplitter.from_model(MODEL, 256, 32)
    chunks = []
    for path in sorted(corpus.glob("*.md")):
        doc = Document("default", path.name, path.read_text(), version=1)
        chunks.extend(chunk_document(doc, splitter))
    chunks = (chunks * 5)[:LIMIT]
    texts = [c.text for c in chunks]
    msgs = [Msg(encode_chunk(c), c.key, i) for i, c in enumerate(chunks)]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE,
        "torch": torch.__version__,
        "chunks": len(chunks), "note": "Kafka not available on the GPU machine (no JVM): the "
        "pipeline side is the embed stage's processing (decode, validate, encode, normalize, "
        "serialize) with an in-memory producer."}
    base = load_config(environ={})
    for precision in os.environ.get("GPU_PRECISIONS", "fp32,fp16,bf16").split(","):
        for batch in (64, 256):
            mcfg = ModelConfig(name=MODEL, device=DEVICE, precision=precision)
            enc = Encoder(mcfg)
            enc.encode(texts[:batch])  # warm-up: kernels, allocator
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, len(texts), batch):
                part = sorted(texts[i:i + batch], key=len)
                enc.encode(part, batch)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            limit = len(texts) / (time.perf_counter() - t0)
            cfg = replace(base, model=mcfg, embed=replace(base.embed, batch_size=batch,
                                                         reuse_vectors=False))
            sink = Sink()
            proc = EmbedProcessor(cfg, enc, sink,  # type: ignore[arg-type]
                                  DeadLetters(sink, cfg.kafka, "embed", "gpu"),  # type: ignore[arg-type]
                                  DeadLetterGuard(cfg.dead_letter), Metrics("embed"),
                                  get_logger())
            t0 = time.perf_counter()
            for i in range(0, len(msgs), batch):
                proc.process(Batch(msgs[i:i + batch]))  # type: ignore[arg-type]
            pipeline = len(msgs) / (time.perf_counter() - t0)
            results[f"{precision}_b{batch}"] = {
                "limit_per_s": round(limit, 1), "pipeline_per_s": round(pipeline, 1),
                "ratio": round(pipeline / limit, 3)}
            print(json.dumps({precision: batch, **results[f"{precision}_b{batch}"]}),
                  file=sys.stderr)
    ref = Encoder(ModelConfig(name=MODEL, device=DEVICE, precision="fp32"))
    v32 = ref.encode(texts[:512], 128)
    for precision in ("fp16", "bf16"):
        other = Encoder(ModelConfig(name=MODEL, device=DEVICE, precision=precision))
        v = other.encode(texts[:512], 128)
        cos = np.sum(v32 * v, axis=1) / (np.linalg.norm(v32, axis=1) * np.linalg.norm(v, axis=1))
        results[f"{precision}_mean_cosine_vs_fp32"] = round(float(cos.mean()), 5)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
