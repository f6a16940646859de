//! Numbered schema migrations, run once per database under an advisory lock.

use postgres::Client;

use jobhost_core::error::{Error, Result, StoreError};

use crate::Db;

/// The session-level advisory lock every host takes while it migrates (`"jobh"` in ASCII), so
/// hosts starting together apply each migration once.
const MIGRATION_LOCK: i64 = 0x6a6f_6268;

/// Entry *i* takes the schema from version *i* to *i + 1*. Integers are `BIGINT` throughout
/// (times are milliseconds since the epoch); JSON is stored as text, as the engine hands it.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE environments (id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE sheets (
    key BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    environment_id TEXT NOT NULL,
    name TEXT NOT NULL,
    workbook_id TEXT,
    created_at BIGINT NOT NULL
);
-- `ord` is dense per sheet (0, 1, 2, …) so a page is a range scan, not an OFFSET walk.
CREATE TABLE records (
    id BIGSERIAL PRIMARY KEY,
    sheet_key BIGINT NOT NULL,
    ord BIGINT NOT NULL,
    vals TEXT NOT NULL,
    messages TEXT,
    metadata TEXT,
    has_error BOOLEAN NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX records_order ON records (sheet_key, ord);
CREATE INDEX records_errors ON records (sheet_key) WHERE has_error;
CREATE TABLE jobs (
    seq BIGSERIAL UNIQUE,
    id TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    operation TEXT NOT NULL,
    source TEXT,
    status TEXT NOT NULL,
    trigger_ TEXT NOT NULL,
    mode TEXT NOT NULL,
    input TEXT,
    info TEXT,
    progress BIGINT NOT NULL,
    estimated_completion_at BIGINT,
    outcome TEXT,
    parent_id TEXT,
    part_index BIGINT,
    part_data TEXT,
    part_execution TEXT,
    predecessor_ids TEXT,
    run_at BIGINT,
    stale_timeout_ms BIGINT,
    attempt BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    outcome_acknowledged_at BIGINT,
    ready_at BIGINT,
    last_activity_at BIGINT,
    split_at BIGINT,
    parts_completed_at BIGINT
);
CREATE INDEX jobs_env ON jobs (environment_id, seq);
CREATE INDEX jobs_parts ON jobs (parent_id, part_index) WHERE parent_id IS NOT NULL;
CREATE INDEX jobs_live ON jobs (status) WHERE status IN ('scheduled', 'ready', 'executing');
CREATE TABLE job_predecessors (
    job_id TEXT NOT NULL,
    predecessor_id TEXT NOT NULL,
    PRIMARY KEY (job_id, predecessor_id)
);
CREATE INDEX job_predecessors_rev ON job_predecessors (predecessor_id);
-- `key` is an event's handle, taken at insert (deliveries point at it). `seq` is its place in
-- the stream, given at commit by the trigger below, so that sequence numbers follow commit
-- order: a reader following an environment by `seq` never passes an event that commits late.
CREATE TABLE events (
    key BIGSERIAL PRIMARY KEY,
    seq BIGINT,
    tx xid8 NOT NULL DEFAULT pg_current_xact_id(),
    id TEXT NOT NULL UNIQUE,
    environment_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    job_id TEXT,
    context TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX events_seq ON events (seq);
CREATE INDEX events_env ON events (environment_id, seq);
CREATE INDEX events_job ON events (job_id) WHERE job_id IS NOT NULL;
CREATE INDEX events_unordered ON events (tx) WHERE seq IS NULL;
CREATE TABLE event_order (last BIGINT NOT NULL);
INSERT INTO event_order VALUES (0);
-- At commit: number this transaction's events after every event committed before. The row
-- lock on event_order is held from here to the end of the commit, so only the last moment of
-- each commit that wrote events waits for another's.
CREATE FUNCTION jobhost_order_events() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    n BIGINT;
    base BIGINT;
BEGIN
    SELECT count(*) INTO n FROM events WHERE tx = pg_current_xact_id() AND seq IS NULL;
    IF n > 0 THEN
        UPDATE event_order SET last = last + n RETURNING last - n INTO base;
        UPDATE events e SET seq = base + o.rn
          FROM (SELECT key, row_number() OVER (ORDER BY key) AS rn FROM events
                 WHERE tx = pg_current_xact_id() AND seq IS NULL) o
         WHERE e.key = o.key;
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER events_in_commit_order AFTER INSERT ON events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION jobhost_order_events();
CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    filter TEXT,
    active BOOLEAN NOT NULL,
    updated_at BIGINT NOT NULL
);
-- status: pending | leased | done | dead. `due_at` is when a pending delivery may be leased or
-- when a lease expires; NULL once finished. `attempts` and `lease_owner` are the fence.
CREATE TABLE deliveries (
    id BIGSERIAL PRIMARY KEY,
    event_key BIGINT NOT NULL,
    subscription_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    due_at BIGINT,
    lease_owner TEXT,
    last_error TEXT,
    finished_at BIGINT
);
-- Per subscription, in due order: a lease reads the first rows of its subscription's range
-- instead of sorting every due delivery.
CREATE INDEX deliveries_due ON deliveries (subscription_id, due_at, id) WHERE status IN ('pending', 'leased');
CREATE INDEX deliveries_dead ON deliveries (subscription_id) WHERE status = 'dead';
CREATE INDEX deliveries_leased ON deliveries (lease_owner) WHERE status = 'leased';
CREATE TABLE executions (
    id BIGSERIAL PRIMARY KEY,
    environment_id TEXT NOT NULL,
    plugin TEXT NOT NULL,
    plugin_version TEXT NOT NULL,
    route BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    job_id TEXT,
    attempt BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_us BIGINT NOT NULL,
    cpu_us BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT,
    peak_memory BIGINT NOT NULL,
    logs TEXT NOT NULL
);
CREATE INDEX executions_env ON executions (environment_id, id);
CREATE INDEX executions_job ON executions (job_id) WHERE job_id IS NOT NULL;
-- The loop guard's count per chain, in shards (see `charge_chain`).
CREATE TABLE chains (
    id TEXT NOT NULL,
    shard BIGINT NOT NULL,
    events BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (id, shard)
);
CREATE TABLE secrets (
    environment_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (environment_id, name)
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    environment_id TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX tokens_env ON tokens (environment_id);
CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
"#,
    r#"
-- Plugins of the fleet: components by content address, and what each environment runs.
CREATE TABLE plugin_blobs (
    version TEXT PRIMARY KEY,
    bytes BYTEA NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE plugin_deployments (
    seq BIGSERIAL PRIMARY KEY,
    environment_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT REFERENCES plugin_blobs (version),
    deployed_at BIGINT NOT NULL
);
CREATE INDEX plugin_deployments_plugin ON plugin_deployments (environment_id, name, seq);
"#,
    r#"
-- Each sheet's record counts, kept by the statements that change them, in shards as the loop
-- guard's chains are (see `add_record_counts`): reading them never scans the sheet's records.
CREATE TABLE record_counts (
    sheet_key BIGINT NOT NULL,
    shard BIGINT NOT NULL,
    total BIGINT NOT NULL,
    errors BIGINT NOT NULL,
    PRIMARY KEY (sheet_key, shard)
);
INSERT INTO record_counts (sheet_key, shard, total, errors)
    SELECT sheet_key, 0, COUNT(*), COUNT(*) FILTER (WHERE has_error) FROM records GROUP BY sheet_key;
"#,
    r#"
-- A delivery's outbound HTTP requests (JSON), beside its logs.
ALTER TABLE executions ADD COLUMN http TEXT;
"#,
    r#"
-- Each parent's part counts, kept by triggers on its parts: the end of every part reads them,
-- and counting the parts themselves there read all N of them for each of N parts. The
-- buckets are `PartStatusCounts`'s. A part's insert or move appends its difference to
-- `part_count_deltas` (a plain insert: nothing waits, and a split's thousands of inserts do
-- not update one row thousands of times in a transaction, which walks a chain of versions
-- that grows with each); the transaction that ends a part, which holds the parent's lock,
-- folds the parent's committed deltas into its row of `part_counts` (see `part_counts`).
-- A move within one bucket (an ack: `ready` → `executing`) writes nothing.
CREATE TABLE part_counts (
    parent_id TEXT PRIMARY KEY,
    total BIGINT NOT NULL,
    active BIGINT NOT NULL,
    complete BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    canceled BIGINT NOT NULL
);
CREATE TABLE part_count_deltas (
    parent_id TEXT NOT NULL,
    total BIGINT NOT NULL,
    active BIGINT NOT NULL,
    complete BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    canceled BIGINT NOT NULL
);
CREATE INDEX part_count_deltas_parent ON part_count_deltas (parent_id);
CREATE FUNCTION jobhost_part_bucket(status TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN status IN ('ready', 'executing') THEN 'active'
                WHEN status IN ('complete', 'failed', 'canceled') THEN status
                ELSE 'other' END
$$;
CREATE FUNCTION jobhost_count_part() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    parent TEXT;
    added TEXT;
    removed TEXT;
    added_parts BIGINT := 0;
BEGIN
    IF TG_OP = 'INSERT' THEN
        parent := NEW.parent_id; added := jobhost_part_bucket(NEW.status); added_parts := 1;
    ELSIF TG_OP = 'DELETE' THEN
        parent := OLD.parent_id; removed := jobhost_part_bucket(OLD.status); added_parts := -1;
    ELSE
        parent := NEW.parent_id; added := jobhost_part_bucket(NEW.status); removed := jobhost_part_bucket(OLD.status);
    END IF;
    -- Nothing reads an ended parent's counts (they were dropped when it ended): the parts a
    -- cancel ends after their parent are not counted. Parts are inserted only under a parent
    -- that is running (a split), so a split's inserts skip the look-up.
    IF TG_OP <> 'INSERT'
       AND EXISTS (SELECT 1 FROM jobs WHERE id = parent AND status IN ('complete', 'failed', 'canceled')) THEN
        RETURN NULL;
    END IF;
    INSERT INTO part_count_deltas (parent_id, total, active, complete, failed, canceled) VALUES (
        parent,
        added_parts,
        (added IS NOT DISTINCT FROM 'active')::int - (removed IS NOT DISTINCT FROM 'active')::int,
        (added IS NOT DISTINCT FROM 'complete')::int - (removed IS NOT DISTINCT FROM 'complete')::int,
        (added IS NOT DISTINCT FROM 'failed')::int - (removed IS NOT DISTINCT FROM 'failed')::int,
        (added IS NOT DISTINCT FROM 'canceled')::int - (removed IS NOT DISTINCT FROM 'canceled')::int
    );
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_part_added AFTER INSERT ON jobs FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL) EXECUTE FUNCTION jobhost_count_part();
CREATE TRIGGER jobs_part_moved AFTER UPDATE OF status ON jobs FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL AND jobhost_part_bucket(OLD.status) <> jobhost_part_bucket(NEW.status))
    EXECUTE FUNCTION jobhost_count_part();
CREATE TRIGGER jobs_part_removed AFTER DELETE ON jobs FOR EACH ROW
    WHEN (OLD.parent_id IS NOT NULL) EXECUTE FUNCTION jobhost_count_part();
-- A split job that ends drops its counts: once a parent has ended, no rule reads them.
CREATE FUNCTION jobhost_drop_part_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM part_count_deltas WHERE parent_id = NEW.id;
    DELETE FROM part_counts WHERE parent_id = NEW.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_parent_ended AFTER UPDATE OF status ON jobs FOR EACH ROW
    WHEN (NEW.split_at IS NOT NULL AND NEW.status IN ('complete', 'failed', 'canceled')
          AND OLD.status NOT IN ('complete', 'failed', 'canceled'))
    EXECUTE FUNCTION jobhost_drop_part_counts();
INSERT INTO part_counts (parent_id, total, active, complete, failed, canceled)
    SELECT parent_id, COUNT(*), COUNT(*) FILTER (WHERE b = 'active'), COUNT(*) FILTER (WHERE b = 'complete'),
           COUNT(*) FILTER (WHERE b = 'failed'), COUNT(*) FILTER (WHERE b = 'canceled')
    FROM (SELECT parent_id, jobhost_part_bucket(status) AS b FROM jobs WHERE parent_id IS NOT NULL) parts
    WHERE parent_id IN (SELECT id FROM jobs WHERE status NOT IN ('complete', 'failed', 'canceled'))
    GROUP BY parent_id;
"#,
];

/// The schema version this build knows.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database to [`SCHEMA_VERSION`], refusing one that is newer.
pub fn migrate(client: &mut Client) -> Result<()> {
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).db()?;
    let result = migrate_locked(client);
    // Unlocked however it went; the session's end would release it too.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]);
    result
}

fn migrate_locked(client: &mut Client) -> Result<()> {
    client.batch_execute("CREATE TABLE IF NOT EXISTS jobhost_schema (version BIGINT NOT NULL)").db()?;
    let version: i64 = match client.query_opt("SELECT version FROM jobhost_schema", &[]).db()? {
        Some(row) => row.try_get(0).db()?,
        None => {
            client.execute("INSERT INTO jobhost_schema (version) VALUES (0)", &[]).db()?;
            0
        }
    };
    if version > SCHEMA_VERSION {
        return Err(Error::store(format!(
            "the database has jobhost schema version {version}, newer than this jobhost knows ({SCHEMA_VERSION}); \
             upgrade jobhost"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let mut tx = client.transaction().db()?;
        tx.batch_execute(sql).map_err(|e| StoreError::caused_by(format!("migration {} failed", i + 1), e))?;
        tx.execute("UPDATE jobhost_schema SET version = $1", &[&(i as i64 + 1)]).db()?;
        tx.commit().db()?;
        tracing::info!(version = i + 1, "migrated the PostgreSQL schema");
    }
    Ok(())
}
