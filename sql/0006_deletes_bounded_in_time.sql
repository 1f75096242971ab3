-- vecpipe 0006: deletes bounded by publish time, and an audit trail written once per delete.
--
-- documents.published_at is when the stored version was last published: the
-- vecpipe.published_at header its chunks carry (the publisher sets it, and every stage, dead
-- letter and replay carries it unchanged). A delete without a version removes the document
-- only if that version was published before the delete (or at the same instant); one published
-- after it stays, however late the delete arrives (a producer's re-send after an outage, a
-- dead-letter replay, a redelivery after a crash). deleted_before moves either way, so chunks
-- published before the delete never come back. A row from before this migration has no publish time and
-- counts as published before any delete.
ALTER TABLE :"schema".documents ADD COLUMN IF NOT EXISTS published_at timestamptz;

-- documents.deleted_version is the highest version a delete with a version removed: those
-- versions never come back, even published again after a delete without a version moved
-- deleted_before (NULL: no delete with a version reached this document).
ALTER TABLE :"schema".documents ADD COLUMN IF NOT EXISTS deleted_version bigint;

-- A delete redelivered or replayed writes no second audit row: its request key, a digest of the
-- delete and its publish time, is unique (NULL for rows written before this migration).
ALTER TABLE :"schema".audit_log ADD COLUMN IF NOT EXISTS request_key text;
CREATE UNIQUE INDEX IF NOT EXISTS audit_log_request_key_idx ON :"schema".audit_log (request_key);
