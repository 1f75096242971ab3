-- vecpipe 0007: the replay audit, one row per `vecpipe dlq replay`.
--
-- A replay sends records back into the pipeline's topics, so who ran it, when, with which
-- filters, and what went where must be answerable later, as for a deletion. The row is written
-- when the replay starts (status running) and completed when it ends (done, or failed with the
-- error's sentence): a replay killed mid-way stays running, with the counts of its last
-- progress report, and its finished_at empty. A replay whose row cannot be written does not run.
CREATE TABLE IF NOT EXISTS :"schema".replay_audit (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at      timestamptz NOT NULL DEFAULT now(),
    -- Set with the final status; also the time of the last progress report while running.
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    status          text        NOT NULL DEFAULT 'running'
                    CHECK (status IN ('running', 'done', 'failed')),
    -- --actor, else VECPIPE_ACTOR, else the OS user and host (user@host).
    actor           text        NOT NULL,
    -- The process that ran it (ops.worker_id: host and pid unless set).
    worker          text        NOT NULL,
    dlq_topic       text        NOT NULL,
    consumer_group  text        NOT NULL,
    dry_run         boolean     NOT NULL,
    -- The selection and destination flags as given (--since 2h stays "2h", with the instant it
    -- meant beside it), never an address or a password.
    filters         jsonb       NOT NULL,
    -- How it ended (end, limit, stopped, nothing_left, halted), empty while running.
    ended           text,
    -- replayed, by target topic and by error class, and each kind of skip: the same object as
    -- `dlq replay --json` prints.
    counts          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error           text,
    CHECK ((status = 'running') = (finished_at IS NULL))
);

-- `vecpipe audit --replays` lists newest first, by time.
CREATE INDEX IF NOT EXISTS replay_audit_started_idx ON :"schema".replay_audit (started_at);

-- Not tenant-keyed, and read only by operators through the owner (the role that migrates and
-- replays): :"app_role", the searching role, gets no grant on it, as on audit_log.
