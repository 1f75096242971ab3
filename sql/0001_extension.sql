-- vecpipe 0001: the pgvector extension and the schema that holds vecpipe's tables.
--
-- Every migration here is plain SQL, safe to run twice. Names written :"schema", :vector_type,
-- :dimension and :"app_role" are psql variables: `vecpipe migrate` fills them from its
-- configuration, and a DBA can run a file by hand with
--   psql -v schema=vecpipe -v vector_type=vector -v dimension=384 -v app_role=vecpipe_app -f FILE

-- pgvector >= 0.8 brings the vector and halfvec types, HNSW and IVFFlat, and iterative scans.
-- In public, so that every schema (one per deployment or test) sees the types.
CREATE EXTENSION IF NOT EXISTS vector SCHEMA public;

CREATE SCHEMA IF NOT EXISTS :"schema";
