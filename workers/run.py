"""Assembles a stage into a running worker: config -> clients -> processor -> consumer loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vecpipe.config import Config
from vecpipe.db.pool import make_pool
from vecpipe.db.store import Store
from vecpipe.deadletter.guard import DeadLetterGuard
from vecpipe.deadletter.sender import DeadLetters
from vecpipe.errors import Unreachable
from vecpipe.health import Health, Metrics, serve
from vecpipe.kafka.admin import ensure_topics
from vecpipe.kafka.consumer import BatchConsumer, BatchLimits, Processor, StopFlag
from vecpipe.kafka.producer import DurableProducer
from vecpipe.logs import configure_logging, get_logger
from vecpipe.model import Encoder
from vecpipe.tracing import flush as flush_traces
from vecpipe.tracing import install as install_tracing
from workers.embed import EmbedProcessor, EncoderLike, VectorCache
from workers.gauges import preset, refresher_for
from workers.write import WriteProcessor

__all__ = ["run_embed", "run_write"]


def _run(
    cfg: Config,
    stage: str,
    topic: str,
    group: str,
    limits: BatchLimits,
    make_processor: Callable[[DurableProducer, DeadLetters, DeadLetterGuard, Metrics, Any],
                             Processor],
    until_idle_s: float | None,
    stop: StopFlag | None,
) -> int:
    configure_logging(cfg.ops.log_format, cfg.ops.log_level, stage=stage,
                      worker_id=cfg.ops.worker_id)
    log = get_logger()
    ensure_topics(cfg.kafka)
    metrics = Metrics(stage)
    preset(metrics)
    # A loop that has not turned, or a batch that has not moved, for this long is stuck.
    health = Health(stall_after_s=max(cfg.ops.stall_after_s, cfg.ops.shutdown_grace_s * 4),
                    metrics=metrics)
    server, gauges = None, None
    if cfg.ops.metrics_port:
        server = serve(cfg.ops.metrics_port, metrics, health)
        log.info("http_serving", port=cfg.ops.metrics_port,
                 paths=["/metrics", "/healthz", "/readyz"])
        # Read from the broker and the catalog only when someone can scrape them.
        gauges = refresher_for(cfg, metrics, log)
        gauges.start()
    try:
        producer = DurableProducer(cfg.kafka)
        dead_letters = DeadLetters(producer, cfg.kafka, stage, cfg.ops.worker_id)
        guard = DeadLetterGuard(cfg.dead_letter)
        processor = make_processor(producer, dead_letters, guard, metrics, log)
        if stop is None:
            stop = StopFlag()
            stop.install_signal_handlers()
        loop = BatchConsumer(
            cfg.kafka, topic, group, processor, limits, log=log, metrics=metrics, health=health,
            stop=stop, until_idle_s=until_idle_s, shutdown_grace_s=cfg.ops.shutdown_grace_s,
        )
        code = loop.run()
        try:
            producer.close()
        except Exception as exc:
            log.warning("producer_close_failed", error=str(exc))
    finally:
        # However the loop ended (a fatal error included), the port and the threads are freed.
        if gauges is not None:
            gauges.stop()
        flush_traces()
        if server is not None:
            server.shutdown()
            server.server_close()
    return code


def run_embed(cfg: Config, until_idle_s: float | None = None,
              stop: StopFlag | None = None, encoder: EncoderLike | None = None) -> int:
    """Run the embedding stage until stopped; return the process exit code.

    ``encoder`` defaults to the configured model; tests pass one loaded once per session.
    """
    install_tracing(cfg, "embed")  # a missing exporter stops the worker here, before the model
    ensure_topics(cfg.kafka)
    if encoder is None:
        encoder = Encoder(cfg.model)
    cache: VectorCache | None = None
    pool = None
    if cfg.embed.reuse_vectors:
        try:
            pool = make_pool(cfg.database, name="vecpipe-embed-cache")
        except Unreachable as exc:
            # Reuse only saves model time; embedding goes on without it, loudly.
            get_logger(stage="embed").warning("vector_reuse_off", reason=str(exc))
        else:
            cache = Store(cfg, pool)

    def make(producer: DurableProducer, dl: DeadLetters, guard: DeadLetterGuard,
             metrics: Metrics, log: Any) -> Processor:
        log.info("model_loaded", model=encoder.name, revision=encoder.revision,
                 backend=encoder.backend_tag, dimension=encoder.dimension)
        return EmbedProcessor(cfg, encoder, producer, dl, guard, metrics, log, cache=cache)

    limits = BatchLimits(cfg.embed.batch_size, cfg.embed.batch_tokens,
                         cfg.embed.batch_wait_ms / 1000, cfg.embed.batch_bytes)
    try:
        return _run(cfg, "embed", cfg.kafka.chunks_topic, cfg.kafka.embed_group, limits, make,
                    until_idle_s, stop)
    finally:
        if pool is not None:
            pool.close()


def run_write(cfg: Config, until_idle_s: float | None = None,
              stop: StopFlag | None = None) -> int:
    """Run the writer stage until stopped; return the process exit code."""
    install_tracing(cfg, "write")
    ensure_topics(cfg.kafka)
    pool = make_pool(cfg.database, name="vecpipe-write")
    store = Store(cfg, pool)

    def make(producer: DurableProducer, dl: DeadLetters, guard: DeadLetterGuard,
             metrics: Metrics, log: Any) -> Processor:
        return WriteProcessor(cfg, store, producer, dl, guard, metrics, log, cfg.ops.worker_id)

    limits = BatchLimits(cfg.write.batch_size, cfg.write.batch_size,
                         cfg.write.batch_wait_ms / 1000, cfg.write.batch_bytes)
    try:
        return _run(cfg, "write", cfg.kafka.embeddings_topic, cfg.kafka.write_group, limits,
                    make, until_idle_s, stop)
    finally:
        pool.close()
