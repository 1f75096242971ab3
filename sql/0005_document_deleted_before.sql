-- vecpipe 0005: a document deleted without a version stays deleted for what was published before.
--
-- A delete message that names a version removes that version and older ones: the documents row
-- keeps the version, and only a newer one revives the document. A delete without a version (and
-- a tenant deletion) means "as of now": it removes every version published before the delete
-- message, including versions the writer has not seen yet (a chunk waiting in the dead-letter
-- topic, replayed later with its original timestamp), and any version published after it, the
-- same one included, brings the document back. A version number cannot say that; the delete's
-- time, kept here, can.
ALTER TABLE :"schema".documents ADD COLUMN IF NOT EXISTS deleted_before timestamptz;
