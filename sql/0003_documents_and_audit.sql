-- vecpipe 0003: the newest version of each document, tombstones, and the audit trail.

-- One row per document: the newest version seen and its chunk count. A chunk message applies
-- only if its version is this one, so late, redelivered or replayed messages never win, and a
-- deleted document stays deleted until a newer version is published.
CREATE TABLE IF NOT EXISTS :"schema".documents (
    tenant_id    text        NOT NULL,
    doc_id       text        NOT NULL,
    version      bigint      NOT NULL,
    chunk_count  integer     NOT NULL,
    deleted      boolean     NOT NULL DEFAULT false,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, doc_id)
);

-- A tenant deletion: chunks published before it never come back, whatever their version.
CREATE TABLE IF NOT EXISTS :"schema".tenant_deletions (
    tenant_id       text        PRIMARY KEY,
    deleted_before  timestamptz NOT NULL
);

-- Deletion rights (GDPR, CCPA): what was removed, when, how many rows, and which message asked.
CREATE TABLE IF NOT EXISTS :"schema".audit_log (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    action        text        NOT NULL CHECK (action IN ('delete_document', 'delete_tenant')),
    tenant_id     text        NOT NULL,
    doc_id        text,
    doc_version   bigint,
    rows_deleted  integer     NOT NULL,
    applied       boolean     NOT NULL,
    -- topic, partition, offset, requested_at, reason and worker of the delete message.
    source        jsonb       NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_tenant_idx ON :"schema".audit_log (tenant_id, at);
