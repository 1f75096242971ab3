-- vecpipe 0004: tenant isolation by row-level security, and the role that searches run as.
--
-- Searches do not read chunks as the owner of the table. Inside their transaction they switch to
-- :"app_role" (SET LOCAL ROLE) and name their tenant in the setting vecpipe.tenant (SET LOCAL).
-- That role may only SELECT chunks, and the policy below shows it the rows of that one tenant: a
-- query that forgets its WHERE clause, or one typed by hand, still sees a single tenant, and a
-- transaction that set no tenant sees nothing.
--
-- The owner (the role that runs `vecpipe migrate` and the writer) is deliberately not subject to
-- these policies (no FORCE ROW LEVEL SECURITY): the writer merges batches that mix tenants,
-- removes stale chunks and whole tenants, and the embedder reuses vectors across tenants. Those
-- are trusted services; what a tenant's request can reach goes through the role below.

-- The role: no login, inherits nothing, is never a superuser and never bypasses row security. A
-- DBA may create it beforehand (then a role without CREATEROLE can run this file). The migrating
-- user is made a member, because SET ROLE needs membership.
SELECT set_config('vecpipe.app_role', :'app_role', false);

DO $$
DECLARE
    app  text := current_setting('vecpipe.app_role');
    want text := CASE WHEN current_setting('server_version_num')::int >= 160000
                      THEN 'SET' ELSE 'MEMBER' END;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = app) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE '
                           'NOREPLICATION NOBYPASSRLS', app);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another schema's migration created it at the same moment
        END;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = app AND (rolsuper OR rolbypassrls)) THEN
        RAISE EXCEPTION 'role % is a superuser or has BYPASSRLS, so row-level security would '
                        'not apply to it; use another database.app_role', app;
    END IF;
    IF NOT pg_has_role(current_user, app, want) THEN
        EXECUTE format('GRANT %I TO %I', app, current_user);
    END IF;
END
$$;

-- What the role may do: read chunks, nothing else.
GRANT USAGE ON SCHEMA :"schema" TO :"app_role";
GRANT SELECT ON :"schema".chunks TO :"app_role";

-- One tenant per transaction. current_setting(..., true) is NULL when no tenant was set, and
-- tenant_id = NULL matches no row: the policy fails closed.
ALTER TABLE :"schema".chunks ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON :"schema".chunks;
CREATE POLICY tenant_isolation ON :"schema".chunks TO :"app_role"
    USING (tenant_id = current_setting('vecpipe.tenant', true))
    WITH CHECK (tenant_id = current_setting('vecpipe.tenant', true));

-- The other tenant-keyed tables get the same rule, so that a grant added later cannot open them
-- to every tenant at once. The role has no grant on them today.
ALTER TABLE :"schema".documents ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON :"schema".documents;
CREATE POLICY tenant_isolation ON :"schema".documents TO :"app_role"
    USING (tenant_id = current_setting('vecpipe.tenant', true));

ALTER TABLE :"schema".tenant_deletions ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON :"schema".tenant_deletions;
CREATE POLICY tenant_isolation ON :"schema".tenant_deletions TO :"app_role"
    USING (tenant_id = current_setting('vecpipe.tenant', true));

ALTER TABLE :"schema".audit_log ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON :"schema".audit_log;
CREATE POLICY tenant_isolation ON :"schema".audit_log TO :"app_role"
    USING (tenant_id = current_setting('vecpipe.tenant', true));

-- Vector reuse for the embedder: content seen before (same hash, same model) is not embedded
-- again, whichever tenant stored it. This function answers with the hash and the vector only,
-- never the text, tenant or document, so an embed worker can run under a role that has EXECUTE
-- on it and no read access to chunks at all. It runs as its owner (SECURITY DEFINER), with a
-- fixed search_path so that no caller can substitute objects of its own.
CREATE OR REPLACE FUNCTION :"schema".cached_vectors(
    hashes bytea[], model text, revision text, backend text)
RETURNS TABLE (content_hash bytea, embedding public.:vector_type)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT DISTINCT ON (c.content_hash) c.content_hash, c.embedding
    FROM :"schema".chunks AS c
    WHERE c.content_hash = ANY (hashes)
      AND c.model_name = model AND c.model_revision = revision AND c.model_backend = backend;
END;

-- Functions are executable by PUBLIC by default; this one only by its owner and by roles an
-- operator grants it to (GRANT EXECUTE ON FUNCTION ... TO an embed role).
REVOKE ALL ON FUNCTION :"schema".cached_vectors(bytea[], text, text, text) FROM PUBLIC;
