"""``vecpipe serve``: search and ingestion over HTTP, one tenant per API key.

``app`` holds the routes, ``service`` what they share (the pool as the service's own role, the
encoder and its batcher, the publisher), ``limits`` the per-key rate limit, key cache and body
limit, ``batcher`` the batching of query encodes, ``api`` the bodies.
"""

from __future__ import annotations

from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files

import uvicorn

from vecpipe.config import Config
from vecpipe.db.pool import connect, make_pool
from vecpipe.logs import configure_logging, get_logger
from vecpipe.model import Encoder
from workers.serve.app import ApiError, create_app
from workers.serve.service import Service, check_role, serve_database

__all__ = ["ApiError", "Service", "build_service", "check_role", "create_app", "page", "run",
           "serve_database"]


def page() -> str:
    """The search page served at ``/``."""
    return files("workers.serve").joinpath("static/index.html").read_text("utf-8")


def build_service(cfg: Config, encoder: Encoder | None = None) -> Service:
    """Check the role, load the model, open the pool: everything but the HTTP server."""
    db = serve_database(cfg)
    with connect(db, vector_types=False) as conn:
        check_role(conn, cfg)
    if encoder is None:
        # One torch thread: requests are batched, and the database needs the other cores.
        encoder = Encoder(replace(cfg.model, threads=cfg.model.threads or 1))
    pool = make_pool(db, name="vecpipe-serve")
    try:
        built = version("vecpipe")
    except PackageNotFoundError:
        built = "unknown"
    return Service(replace(cfg, database=db), encoder=encoder, pool=pool, page=page(),
                   version=built)


def run(cfg: Config) -> None:
    """Serve until SIGTERM or SIGINT (uvicorn drains the requests in flight)."""
    configure_logging(cfg.ops.log_format, cfg.ops.log_level, stage="serve",
                      worker_id=cfg.ops.worker_id)
    service = build_service(cfg)
    try:
        uvicorn.run(create_app(service), host=cfg.serve.host, port=cfg.serve.port,
                    log_level="warning", access_log=False, timeout_graceful_shutdown=int(
                        cfg.ops.shutdown_grace_s))
    finally:
        service.pool.close()
        get_logger(stage="serve").info("serve_exited")
