"""vecpipe: streaming ingestion from Kafka into PostgreSQL + pgvector."""

__version__ = "0.1.0"
