-- vecpipe 0009: what `vecpipe serve` needs: full-text search, API keys, and the functions through
-- which a role under row-level security finds its candidate rows with the owner's indexes.
--
-- PostgreSQL does not use an operator that is not leakproof (jsonb @>, @@, tsvector @@) as an
-- index condition under a policy: as the application role, a filtered or keyword query would
-- read every row of the tenant. The functions below run as the owner (SECURITY DEFINER, fixed
-- search_path, like cached_vectors), read the tenant only from the transaction's vecpipe.tenant,
-- and return that tenant's row addresses, ranks and estimates, nothing else. A caller reads the
-- rows themselves through the policy, by address.

-- Full-text search. A nullable column, filled by the writer with the row and by `vecpipe migrate`
-- for the rows written before it (in small batches): adding it rewrites nothing and takes its
-- exclusive lock for an instant. Its GIN index is built CONCURRENTLY by `vecpipe migrate`.
ALTER TABLE :"schema".chunks ADD COLUMN IF NOT EXISTS content_tsv tsvector;

-- API keys: 256-bit random keys, stored as sha256 (a slow password hash would cost each request
-- milliseconds; a key is random, not a password, so sha256 is enough). Each is bound to one
-- tenant; an admin key may also run tenant-wide operations (erase the tenant), for its tenant.
CREATE TABLE IF NOT EXISTS :"schema".api_keys (
    key_id      text        PRIMARY KEY,
    key_hash    bytea       NOT NULL UNIQUE,
    tenant_id   text        NOT NULL,
    admin       boolean     NOT NULL DEFAULT false,
    label       text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
ALTER TABLE :"schema".api_keys ENABLE ROW LEVEL SECURITY;

-- A key's tenant, if the key exists and is not revoked: all the service learns about keys.
CREATE OR REPLACE FUNCTION :"schema".resolve_key(hash bytea)
RETURNS TABLE (key_id text, tenant_id text, admin boolean)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT k.key_id, k.tenant_id, k.admin FROM :"schema".api_keys AS k
    WHERE k.key_hash = hash AND k.revoked_at IS NULL;
END;

-- The planner's estimates of the tenant's rows and of the table's: they choose the strategy.
-- (VOLATILE only because PostgreSQL allows EXPLAIN in no other kind of function.)
CREATE OR REPLACE FUNCTION :"schema".tenant_estimate()
RETURNS TABLE (tenant_rows bigint, total_rows bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tenant text := current_setting('vecpipe.tenant', true);
    plan json;
BEGIN
    IF tenant IS NULL THEN
        RETURN QUERY SELECT 0::bigint, 0::bigint;
        RETURN;
    END IF;
    EXECUTE 'EXPLAIN (FORMAT JSON) SELECT 1 FROM :"schema".chunks WHERE tenant_id = '
        || quote_literal(tenant) INTO plan;
    tenant_rows := (plan -> 0 -> 'Plan' ->> 'Plan Rows')::numeric::bigint;
    EXECUTE 'EXPLAIN (FORMAT JSON) SELECT 1 FROM :"schema".chunks' INTO plan;
    total_rows := (plan -> 0 -> 'Plan' ->> 'Plan Rows')::numeric::bigint;
    RETURN NEXT;
END
$$;

-- At most `cap` addresses of the tenant's rows that match the compiled filter (vecpipe.db.filters:
-- containment and a jsonpath predicate, both values, never SQL). Dynamic SQL so that each call is
-- planned with its own values and the primary key or GIN serves it.
CREATE OR REPLACE FUNCTION :"schema".tenant_rows(
    cap integer, contain jsonb DEFAULT NULL, path jsonpath DEFAULT NULL)
RETURNS SETOF tid
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text := 'SELECT c.ctid FROM :"schema".chunks AS c WHERE c.tenant_id = $1';
BEGIN
    IF contain IS NOT NULL THEN q := q || ' AND c.metadata @> $2'; END IF;
    IF path IS NOT NULL THEN q := q || ' AND c.metadata @@ $3'; END IF;
    RETURN QUERY EXECUTE q || ' LIMIT $4'
        USING current_setting('vecpipe.tenant', true), contain, path, cap;
END
$$;

-- The tenant's `n` best full-text matches for a web-search-style query (quotes, OR, -word),
-- ranked by ts_rank_cd, with the same filter.
CREATE OR REPLACE FUNCTION :"schema".keyword_rows(
    query text, config regconfig, n integer, contain jsonb DEFAULT NULL,
    path jsonpath DEFAULT NULL)
RETURNS TABLE (row_id tid, rank real)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text := 'SELECT c.ctid, ts_rank_cd(c.content_tsv, t.q) FROM :"schema".chunks AS c,'
        ' websearch_to_tsquery($5, $4) AS t(q) WHERE c.tenant_id = $1 AND c.content_tsv @@ t.q';
BEGIN
    IF contain IS NOT NULL THEN q := q || ' AND c.metadata @> $2'; END IF;
    IF path IS NOT NULL THEN q := q || ' AND c.metadata @@ $3'; END IF;
    RETURN QUERY EXECUTE q || ' ORDER BY 2 DESC, 1 LIMIT $6'
        USING current_setting('vecpipe.tenant', true), contain, path, query, config, n;
END
$$;

REVOKE ALL ON FUNCTION :"schema".resolve_key(bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION :"schema".tenant_estimate() FROM PUBLIC;
REVOKE ALL ON FUNCTION :"schema".tenant_rows(integer, jsonb, jsonpath) FROM PUBLIC;
REVOKE ALL ON FUNCTION :"schema".keyword_rows(text, regconfig, integer, jsonb, jsonpath)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION :"schema".resolve_key(bytea) TO :"app_role";
GRANT EXECUTE ON FUNCTION :"schema".tenant_estimate() TO :"app_role";
GRANT EXECUTE ON FUNCTION :"schema".tenant_rows(integer, jsonb, jsonpath) TO :"app_role";
GRANT EXECUTE ON FUNCTION :"schema".keyword_rows(text, regconfig, integer, jsonb, jsonpath)
    TO :"app_role";

-- `GET /v1/documents/{id}`: a tenant may read its own documents' versions (the policy of 0004).
GRANT SELECT ON :"schema".documents TO :"app_role";

-- The service's own LOGIN role: owns nothing, is not a member of the owner, never bypasses row
-- security; it holds the application role's rights (SELECT through the policies, EXECUTE on the
-- functions above) and nothing else. Its password is set by `vecpipe migrate` from
-- VECPIPE_SERVE_ROLE_PASSWORD, or by a DBA; a DBA may also create it beforehand.
-- Both names again: on an upgrade, 0004 (which set vecpipe.app_role) ran in an earlier session.
SELECT set_config('vecpipe.serve_role', :'serve_role', false);
SELECT set_config('vecpipe.app_role', :'app_role', false);

DO $$
DECLARE
    serve text := current_setting('vecpipe.serve_role');
    app   text := current_setting('vecpipe.app_role');
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = serve) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE '
                           'NOREPLICATION NOBYPASSRLS', serve);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = serve AND (rolsuper OR rolbypassrls)) THEN
        RAISE EXCEPTION 'role % is a superuser or has BYPASSRLS, so row-level security would '
                        'not apply to it; use another serve.role', serve;
    END IF;
    IF NOT pg_has_role(serve, app, 'USAGE') THEN
        EXECUTE format('GRANT %I TO %I', app, serve);
    END IF;
END
$$;
