-- vecpipe 0005: a document deleted without a version stays deleted for what was published before.
--
-- A delete message that names a version removes that version and older ones: the documents row
-- keeps the version, and only a newer one revives the document. A delete without a version means
-- "this document, as of now": it removes every version published before the delete message,
-- including versions the writer has not seen yet (a chunk waiting in the dead-letter topic,
-- replayed later with its original timestamp). Such a chunk may carry a version higher than any
-- the writer has stored, so the version alone cannot refuse it; the delete's time can.
ALTER TABLE :"schema".documents ADD COLUMN IF NOT EXISTS deleted_before timestamptz;
