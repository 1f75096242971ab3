-- vecpipe 0002: one row per chunk, keyed by (tenant, document, chunk index).
--
-- The writer merges into this table with INSERT ... ON CONFLICT, so a redelivered message
-- changes nothing, and a row is rewritten only when its content or its model changed.

CREATE TABLE IF NOT EXISTS :"schema".chunks (
    tenant_id       text        NOT NULL,
    doc_id          text        NOT NULL,
    chunk_index     integer     NOT NULL CHECK (chunk_index >= 0),
    -- The document version that last changed this chunk's content.
    doc_version     bigint      NOT NULL,
    chunk_count     integer     NOT NULL CHECK (chunk_count > chunk_index),
    -- sha256 of the normalized text: equal hash and model means nothing to do.
    content_hash    bytea       NOT NULL,
    content         text        NOT NULL,
    char_start      integer,
    char_end        integer,
    source_uri      text        NOT NULL DEFAULT '',
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    embedding       :vector_type(:dimension) NOT NULL,
    -- Lineage: which model (name, revision, backend) embedded the chunk, and when.
    model_name      text        NOT NULL,
    model_revision  text        NOT NULL DEFAULT '',
    model_backend   text        NOT NULL,
    embedded_at     timestamptz NOT NULL,
    written_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, doc_id, chunk_index)
);

-- Vectors do not compress: keep them inline rather than let TOAST try (and add a lookup).
ALTER TABLE :"schema".chunks ALTER COLUMN embedding SET STORAGE PLAIN;

-- The embedder reuses a stored vector for content it has seen: look-ups by hash.
CREATE INDEX IF NOT EXISTS chunks_content_hash_idx ON :"schema".chunks (content_hash);

-- Metadata filters in searches use jsonb containment (@>).
CREATE INDEX IF NOT EXISTS chunks_metadata_idx ON :"schema".chunks USING gin (metadata jsonb_path_ops);
