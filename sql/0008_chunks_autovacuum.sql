-- vecpipe 0008: autovacuum for a table that grows by millions of rows.
--
-- The defaults vacuum a table once 20% of it has changed and analyze it at 10%: on a chunks
-- table of 10 million rows that is 2 million dead or new rows before the visibility map (index-
-- only and bitmap scans), the HNSW index's cleanup and the planner's estimates (which choose
-- the search strategy) catch up. These are storage parameters: setting them takes a SHARE UPDATE
-- EXCLUSIVE lock, which blocks neither reads nor writes. `vecpipe index stats` flags a table
-- whose values are far from these (vecpipe.db.tuning).
ALTER TABLE :"schema".chunks SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);
