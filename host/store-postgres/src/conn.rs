//! The store's read and write primitives over one PostgreSQL connection or transaction.

use std::collections::HashMap;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::{Client, GenericClient, Row, Statement};
use serde_json::Value;

use jobhost_core::error::{Error, Result, StoreError};
use jobhost_core::model::{
    ApiToken, DeadLetter, Environment, Event, Execution, Job, JobStatus, Millis, OpenDelivery, RecordCounts, Sheet,
    UnknownValue, json_text,
};
use jobhost_store::{
    DeliveryEnd, DeliveryStats, Deployment, DueDelivery, EncodedRecord, Fence, History, HistoryRow, HostRecord,
    JobQuery, Overdue, PartStatusCounts, QueryValue, RawRecord, ReadTx, StoreSize, StoredRecord, StoredSecret,
    Subscription, Tx,
};

use crate::Db;

/// Statements prepared on one connection, by SQL text: a statement is parsed once per
/// connection, not once per call.
pub(crate) type Statements = HashMap<String, Statement>;

/// A connection and what was prepared on it.
pub(crate) struct Session {
    pub client: Client,
    pub statements: Statements,
    /// This connection's shard of every loop-guard chain (see `charge_chain`): a connection's
    /// batches then contend with another connection's only when they drew the same shard.
    pub shard: i64,
    /// `Shared::outages` when this connection was made or last checked.
    pub outages_seen: u64,
}

impl Session {
    pub fn new(client: Client, outages_seen: u64) -> Self {
        Self { client, statements: HashMap::new(), shard: fastrand::i64(0..CHAIN_SHARDS), outages_seen }
    }
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

/// A connection (reads) or transaction (writes) seen through the store traits.
pub(crate) struct Conn<'a, C: GenericClient> {
    c: &'a mut C,
    statements: &'a mut Statements,
    shard: i64,
    /// Deliveries made due by this write, for the wake-up after its commit.
    pub new_deliveries: usize,
    /// The last sheet id → key looked up (keys never change).
    sheet: Option<(String, i64)>,
}

impl<'a, C: GenericClient> Conn<'a, C> {
    pub fn new(c: &'a mut C, statements: &'a mut Statements, shard: i64) -> Self {
        Self { c, statements, shard, new_deliveries: 0, sheet: None }
    }

    fn prepare(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.c.prepare(sql).db()?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let s = self.prepare(sql)?;
        self.c.query(&s, params).db()
    }

    fn query_opt(&mut self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let s = self.prepare(sql)?;
        self.c.query_opt(&s, params).db()
    }

    fn query_one(&mut self, sql: &str, params: Params<'_>) -> Result<Row> {
        let s = self.prepare(sql)?;
        self.c.query_one(&s, params).db()
    }

    fn execute(&mut self, sql: &str, params: Params<'_>) -> Result<u64> {
        let s = self.prepare(sql)?;
        self.c.execute(&s, params).db()
    }

    fn sheet_key(&mut self, sheet_id: &str) -> Result<i64> {
        if let Some((id, key)) = &self.sheet
            && id == sheet_id
        {
            return Ok(*key);
        }
        let key: i64 = match self.query_opt("SELECT key FROM sheets WHERE id = $1", &[&sheet_id])? {
            Some(row) => get(&row, 0)?,
            None => return Err(Error::not_found("sheet", sheet_id)),
        };
        self.sheet = Some((sheet_id.to_owned(), key));
        Ok(key)
    }

    /// The sheet's key, its row locked: appends and deletes renumber `ord`, one at a time.
    fn sheet_key_locked(&mut self, sheet_id: &str) -> Result<i64> {
        match self.query_opt("SELECT key FROM sheets WHERE id = $1 FOR UPDATE", &[&sheet_id])? {
            Some(row) => get(&row, 0),
            None => Err(Error::not_found("sheet", sheet_id)),
        }
    }

    /// Moves a sheet's record counts by `total` and `errors`, in this connection's shard: the
    /// parts of one job write back into one sheet at once, and a single row per sheet would queue
    /// their transactions on it. The counts are the sum over the shards.
    fn add_record_counts(&mut self, sheet_key: i64, total: i64, errors: i64) -> Result<()> {
        if total == 0 && errors == 0 {
            return Ok(());
        }
        let shard = self.shard;
        self.execute(
            "INSERT INTO record_counts (sheet_key, shard, total, errors) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (sheet_key, shard) DO UPDATE \
             SET total = record_counts.total + EXCLUDED.total, errors = record_counts.errors + EXCLUDED.errors",
            &[&sheet_key, &shard, &total, &errors],
        )?;
        Ok(())
    }

    /// Changes the subscriptions' version, which every host's routing cache checks.
    fn bump_subscriptions(&mut self) -> Result<()> {
        // Random, not a counter: a version written by a transaction that was rolled back must
        // never be written again for different subscriptions.
        let v = fastrand::u64(1..).to_string();
        self.execute(
            "INSERT INTO meta (key, value) VALUES ('subscriptions_version', $1) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&v],
        )?;
        Ok(())
    }

    fn jobs_where(&mut self, sql_tail: &str, params: Params<'_>) -> Result<Vec<Job>> {
        let rows = self.query(&format!("SELECT {JOB_COLUMNS} FROM jobs {sql_tail}"), params)?;
        rows.iter().map(job_from_row).collect()
    }
}

fn sql_value(value: &QueryValue) -> &(dyn ToSql + Sync) {
    match value {
        QueryValue::Text(t) => t,
        QueryValue::Int(i) => i,
    }
}

fn sheet_from_row(r: &Row) -> Result<Sheet> {
    Ok(Sheet {
        id: get(r, 0)?,
        environment_id: get(r, 1)?,
        name: get(r, 2)?,
        workbook_id: get(r, 3)?,
        created_at: get(r, 4)?,
    })
}

fn get<'r, T: postgres::types::FromSql<'r>>(row: &'r Row, i: usize) -> Result<T> {
    row.try_get(i).db()
}

fn bad_value(what: impl std::fmt::Display) -> Error {
    Error::Store(StoreError::new(format!("PostgreSQL holds a value jobhost cannot read: {what}")))
}

fn u32_of(v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| bad_value(format!("{v} is out of range")))
}

fn parse_enum<T: std::str::FromStr<Err = UnknownValue>>(text: &str) -> Result<T> {
    text.parse().map_err(bad_value)
}

fn json_value(text: Option<String>) -> Result<Value> {
    Ok(match text {
        Some(t) => serde_json::from_str(&t)?,
        None => Value::Null,
    })
}

const JOB_COLUMNS: &str = "id, environment_id, kind, operation, source, status, trigger_, mode, input, info, progress, \
    estimated_completion_at, outcome, parent_id, part_index, part_data, part_execution, predecessor_ids, run_at, \
    stale_timeout_ms, attempt, created_at, updated_at, started_at, finished_at, outcome_acknowledged_at, ready_at, \
    last_activity_at, split_at, parts_completed_at";

fn job_from_row(r: &Row) -> Result<Job> {
    let preds: Option<String> = get(r, 17)?;
    let parent_id: Option<String> = get(r, 13)?;
    Ok(Job {
        id: get(r, 0)?,
        environment_id: get(r, 1)?,
        kind: parse_enum(get(r, 2)?)?,
        operation: get(r, 3)?,
        source: get(r, 4)?,
        status: parse_enum(get(r, 5)?)?,
        trigger: parse_enum(get(r, 6)?)?,
        mode: parse_enum(get(r, 7)?)?,
        input: json_value(get(r, 8)?)?,
        info: get(r, 9)?,
        progress: u8::try_from(get::<i64>(r, 10)?).map_err(bad_value)?,
        estimated_completion_at: get(r, 11)?,
        outcome: json_value(get(r, 12)?)?,
        is_part: parent_id.is_some(),
        parent_id,
        part_index: get::<Option<i64>>(r, 14)?.map(u32_of).transpose()?,
        part_data: json_value(get(r, 15)?)?,
        part_execution: get::<Option<&str>>(r, 16)?.map(parse_enum).transpose()?,
        predecessor_ids: match preds {
            Some(t) => serde_json::from_str(&t)?,
            None => Vec::new(),
        },
        run_at: get(r, 18)?,
        stale_timeout_ms: get(r, 19)?,
        attempt: u32_of(get(r, 20)?)?,
        created_at: get(r, 21)?,
        updated_at: get(r, 22)?,
        started_at: get(r, 23)?,
        finished_at: get(r, 24)?,
        outcome_acknowledged_at: get(r, 25)?,
        ready_at: get(r, 26)?,
        last_activity_at: get(r, 27)?,
        split_at: get(r, 28)?,
        parts_completed_at: get(r, 29)?,
    })
}

const EVENT_COLUMNS: &str = "e.seq, e.id, e.topic, e.context, e.payload, e.created_at";

fn event_from_row(r: &Row, at: usize) -> Result<Event> {
    Ok(Event {
        seq: get(r, at)?,
        id: get(r, at + 1)?,
        topic: get(r, at + 2)?,
        context: serde_json::from_str(get(r, at + 3)?)?,
        payload: serde_json::from_str(get(r, at + 4)?)?,
        created_at: get(r, at + 5)?,
    })
}

const EXECUTION_COLUMNS: &str = "id, environment_id, plugin, plugin_version, route, event_id, topic, job_id, attempt, \
    started_at, duration_us, cpu_us, outcome, error, peak_memory, logs, http";

fn execution_from_row(r: &Row) -> Result<Execution> {
    Ok(Execution {
        id: get(r, 0)?,
        environment_id: get(r, 1)?,
        plugin: get(r, 2)?,
        plugin_version: get(r, 3)?,
        route: u32_of(get(r, 4)?)?,
        event_id: get(r, 5)?,
        topic: get(r, 6)?,
        job_id: get(r, 7)?,
        attempt: u32_of(get(r, 8)?)?,
        started_at: get(r, 9)?,
        duration_us: get(r, 10)?,
        cpu_us: get(r, 11)?,
        outcome: parse_enum(get(r, 12)?)?,
        error: get(r, 13)?,
        peak_memory: get::<i64>(r, 14)?.max(0) as u64,
        logs: get(r, 15)?,
        http: match get::<Option<&str>>(r, 16)? {
            Some(text) => serde_json::from_str(text).map_err(|e| bad_value(format!("an execution's http: {e}")))?,
            None => Vec::new(),
        },
    })
}

fn environment_from_row(r: &Row) -> Result<Environment> {
    Ok(Environment { id: get(r, 0)?, name: get(r, 1)?, created_at: get(r, 2)? })
}

fn token_from_row(r: &Row) -> Result<ApiToken> {
    Ok(ApiToken { id: get(r, 0)?, environment_id: get(r, 1)?, name: get(r, 2)?, created_at: get(r, 3)? })
}

/// Rows a loop-guard chain's count is spread over.
const CHAIN_SHARDS: i64 = 64;

/// An advisory-lock key for a name (FNV-1a).
fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

impl<C: GenericClient> ReadTx for Conn<'_, C> {
    fn executions(&mut self, env: &str, job_id: Option<&str>, limit: u32) -> Result<Vec<Execution>> {
        let rows = self.query(
            &format!(
                "SELECT {EXECUTION_COLUMNS} FROM executions WHERE environment_id = $1 \
                 AND ($2::text IS NULL OR job_id = $2::text) ORDER BY id LIMIT $3"
            ),
            &[&env, &job_id, &i64::from(limit)],
        )?;
        rows.iter().map(execution_from_row).collect()
    }

    fn environment(&mut self, id: &str) -> Result<Option<Environment>> {
        self.query_opt("SELECT id, name, created_at FROM environments WHERE id = $1", &[&id])?
            .as_ref()
            .map(environment_from_row)
            .transpose()
    }

    fn environment_named(&mut self, name: &str) -> Result<Option<Environment>> {
        self.query_opt(
            "SELECT id, name, created_at FROM environments WHERE name = $1 ORDER BY created_at, id LIMIT 1",
            &[&name],
        )?
        .as_ref()
        .map(environment_from_row)
        .transpose()
    }

    fn sheet(&mut self, env: &str, id: &str) -> Result<Option<Sheet>> {
        let row = self.query_opt(
            "SELECT id, environment_id, name, workbook_id, created_at FROM sheets WHERE id = $1 AND environment_id = $2",
            &[&id, &env],
        )?;
        row.map(|r| sheet_from_row(&r)).transpose()
    }

    fn sheets(&mut self, env: &str, offset: u64, limit: u32) -> Result<Vec<Sheet>> {
        let rows = self.query(
            "SELECT id, environment_id, name, workbook_id, created_at FROM sheets WHERE environment_id = $1 \
             ORDER BY key DESC LIMIT $2 OFFSET $3",
            &[&env, &i64::from(limit), &(offset as i64)],
        )?;
        rows.iter().map(sheet_from_row).collect()
    }

    fn last_event_seq(&mut self, env: &str) -> Result<i64> {
        let row =
            self.query_one("SELECT COALESCE(MAX(seq), 0)::bigint FROM events WHERE environment_id = $1", &[&env])?;
        get(&row, 0)
    }

    fn find_jobs(&mut self, env: &str, query: &JobQuery, offset: u64, limit: u32) -> Result<Vec<Job>> {
        let (conditions, values) = query.conditions(|n| format!("${n}"));
        // `jobs_env (environment_id, seq)` read backwards: newest first without a sort.
        let order = if query.parent.is_some() { "part_index" } else { "seq DESC" };
        let n = values.len();
        let (limit, offset) = (i64::from(limit), offset as i64);
        let mut bound: Vec<&(dyn ToSql + Sync)> = vec![&env];
        bound.extend(values.iter().map(sql_value));
        bound.push(&limit);
        bound.push(&offset);
        self.jobs_where(
            &format!("WHERE environment_id = $1{conditions} ORDER BY {order} LIMIT ${} OFFSET ${}", n + 2, n + 3),
            &bound,
        )
    }

    fn count_jobs(&mut self, env: &str, query: &JobQuery) -> Result<Vec<(JobStatus, u64)>> {
        let (conditions, values) = query.any_status().conditions(|n| format!("${n}"));
        let mut bound: Vec<&(dyn ToSql + Sync)> = vec![&env];
        bound.extend(values.iter().map(sql_value));
        let rows = self.query(
            &format!(
                "SELECT status, COUNT(*) FROM jobs WHERE environment_id = $1{conditions} GROUP BY status ORDER BY status"
            ),
            &bound,
        )?;
        rows.iter().map(|r| Ok((parse_enum(get::<&str>(r, 0)?)?, get::<i64>(r, 1)? as u64))).collect()
    }

    fn part_statuses(&mut self, env: &str, parent: &str) -> Result<Vec<JobStatus>> {
        let rows = self.query(
            "SELECT status FROM jobs WHERE parent_id = $1 AND environment_id = $2 ORDER BY part_index",
            &[&parent, &env],
        )?;
        rows.iter().map(|r| parse_enum(get::<&str>(r, 0)?)).collect()
    }

    fn record_counts(&mut self, sheet_id: &str) -> Result<RecordCounts> {
        let key = self.sheet_key(sheet_id)?;
        let row = self.query_one(
            "SELECT COALESCE(SUM(total), 0)::bigint, COALESCE(SUM(errors), 0)::bigint FROM record_counts \
             WHERE sheet_key = $1",
            &[&key],
        )?;
        let (total, error) = (get::<i64>(&row, 0)?.max(0) as u64, get::<i64>(&row, 1)?.max(0) as u64);
        Ok(RecordCounts { total, valid: total.saturating_sub(error), error })
    }

    fn record_rows(&mut self, sheet_id: &str, offset: u64, limit: u32) -> Result<Vec<RawRecord>> {
        let key = self.sheet_key(sheet_id)?;
        let rows = self.query(
            "SELECT id, vals, messages, metadata FROM records WHERE sheet_key = $1 AND ord >= $2 ORDER BY ord LIMIT $3",
            &[&key, &(offset as i64), &i64::from(limit)],
        )?;
        rows.iter()
            .map(|r| {
                Ok(RawRecord { rowid: get(r, 0)?, values: get(r, 1)?, messages: get(r, 2)?, metadata: get(r, 3)? })
            })
            .collect()
    }

    fn job(&mut self, env: &str, id: &str) -> Result<Option<Job>> {
        Ok(self.jobs_where("WHERE id = $1", &[&id])?.pop().filter(|j| j.environment_id == env))
    }

    fn jobs(&mut self, env: &str, parent: Option<&str>, offset: u64, limit: u32) -> Result<Vec<Job>> {
        let (offset, limit) = (offset as i64, i64::from(limit));
        match parent {
            Some(p) => self.jobs_where(
                "WHERE environment_id = $1 AND parent_id = $2 ORDER BY part_index LIMIT $3 OFFSET $4",
                &[&env, &p, &limit, &offset],
            ),
            None => {
                self.jobs_where("WHERE environment_id = $1 ORDER BY seq LIMIT $2 OFFSET $3", &[&env, &limit, &offset])
            }
        }
    }

    fn events(&mut self, env: &str, after_seq: i64, limit: u32) -> Result<Vec<Event>> {
        let rows = self.query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events e WHERE e.environment_id = $1 AND e.seq > $2 ORDER BY e.seq LIMIT $3"
            ),
            &[&env, &after_seq, &i64::from(limit)],
        )?;
        rows.iter().map(|r| event_from_row(r, 0)).collect()
    }

    fn job_events(&mut self, env: &str, job_id: &str) -> Result<Vec<Event>> {
        let rows = self.query(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events e WHERE e.job_id = $1 AND e.environment_id = $2 ORDER BY e.seq"
            ),
            &[&job_id, &env],
        )?;
        rows.iter().map(|r| event_from_row(r, 0)).collect()
    }

    fn dead_letters(&mut self, env: &str) -> Result<Vec<DeadLetter>> {
        let rows = self.query(
            &format!(
                "SELECT d.id, d.subscription_id, d.attempts, d.last_error, {EVENT_COLUMNS} FROM deliveries d \
                 JOIN events e ON e.key = d.event_key WHERE d.status = 'dead' AND e.environment_id = $1 ORDER BY d.id"
            ),
            &[&env],
        )?;
        rows.iter()
            .map(|r| {
                Ok(DeadLetter {
                    delivery_id: get(r, 0)?,
                    subscription_id: get(r, 1)?,
                    attempts: u32_of(get(r, 2)?)?,
                    last_error: get::<Option<String>>(r, 3)?.unwrap_or_default(),
                    event: event_from_row(r, 4)?,
                })
            })
            .collect()
    }

    fn open_deliveries(&mut self, env: &str, job_id: &str) -> Result<Vec<OpenDelivery>> {
        // Both branches read deliveries through their partial indexes (open, dead), never
        // the finished ones.
        let rows = self.query(
            "SELECT d.id, d.subscription_id, e.id, e.topic, d.status, d.attempts, d.due_at, d.lease_owner, d.last_error \
             FROM deliveries d JOIN events e ON e.key = d.event_key \
             WHERE d.status IN ('pending', 'leased') AND e.job_id = $2 AND e.environment_id = $1 \
             UNION ALL \
             SELECT d.id, d.subscription_id, e.id, e.topic, d.status, d.attempts, d.due_at, d.lease_owner, d.last_error \
             FROM deliveries d JOIN events e ON e.key = d.event_key \
             WHERE d.status = 'dead' AND e.job_id = $2 AND e.environment_id = $1 \
             ORDER BY 1",
            &[&env, &job_id],
        )?;
        rows.iter()
            .map(|r| {
                Ok(OpenDelivery {
                    delivery_id: get(r, 0)?,
                    subscription_id: get(r, 1)?,
                    event_id: get(r, 2)?,
                    topic: get(r, 3)?,
                    state: parse_enum(get::<&str>(r, 4)?)?,
                    attempts: u32_of(get(r, 5)?)?,
                    due_at: get(r, 6)?,
                    lease_owner: get(r, 7)?,
                    last_error: get(r, 8)?,
                })
            })
            .collect()
    }

    fn delivery_stats(&mut self) -> Result<DeliveryStats> {
        let mut stats = DeliveryStats::default();
        for r in self.query("SELECT status, COUNT(*) FROM deliveries GROUP BY status", &[])? {
            let n = get::<i64>(&r, 1)? as u64;
            match get::<&str>(&r, 0)? {
                "pending" => stats.pending = n,
                "leased" => stats.leased = n,
                "done" => stats.done = n,
                "dead" => stats.dead = n,
                _ => {}
            }
        }
        Ok(stats)
    }

    fn open_delivery_stats(&mut self) -> Result<DeliveryStats> {
        let mut stats = DeliveryStats::default();
        // Two queries whose conditions are the partial indexes' own: each reads its index only.
        for r in self.query(
            "SELECT status, COUNT(*) FROM deliveries WHERE status IN ('pending', 'leased') GROUP BY status",
            &[],
        )? {
            let n = get::<i64>(&r, 1)? as u64;
            match get::<&str>(&r, 0)? {
                "pending" => stats.pending = n,
                _ => stats.leased = n,
            }
        }
        let dead = self.query_one("SELECT COUNT(*) FROM deliveries WHERE status = 'dead'", &[])?;
        stats.dead = get::<i64>(&dead, 0)? as u64;
        Ok(stats)
    }

    fn size(&mut self) -> Result<StoreSize> {
        let bytes = self.query_one("SELECT pg_database_size(current_database())", &[])?;
        let mut size = StoreSize { bytes: get::<i64>(&bytes, 0)?.max(0) as u64, rows: Vec::new() };
        for table in ["events", "deliveries", "executions"] {
            // The planner's estimate (kept by autovacuum and ANALYZE); -1 before the first one.
            let row = self.query_one(
                "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = to_regclass($1::text)",
                &[&table],
            )?;
            size.rows.push((table, get::<i64>(&row, 0)?.max(0) as u64));
        }
        Ok(size)
    }

    fn job_status_counts(&mut self) -> Result<Vec<(String, u64)>> {
        let rows = self.query("SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status", &[])?;
        rows.iter().map(|r| Ok((get(r, 0)?, get::<i64>(r, 1)? as u64))).collect()
    }

    fn execution_stats(&mut self) -> Result<Vec<(String, u64, u64)>> {
        let rows = self.query(
            "SELECT outcome, COUNT(*), COALESCE(SUM(duration_us), 0)::bigint FROM executions GROUP BY outcome ORDER BY outcome",
            &[],
        )?;
        rows.iter().map(|r| Ok((get(r, 0)?, get::<i64>(r, 1)? as u64, get::<i64>(r, 2)?.max(0) as u64))).collect()
    }

    fn next_delivery_due(&mut self, subscriptions: &[String]) -> Result<Option<Millis>> {
        let row = self.query_one(
            "SELECT MIN(due_at) FROM deliveries WHERE status IN ('pending', 'leased') AND subscription_id = ANY($1)",
            &[&subscriptions],
        )?;
        get(&row, 0)
    }

    fn subscriptions_version(&mut self) -> Result<u64> {
        // Always read: another host may have changed a subscription.
        let row = self.query_opt("SELECT value FROM meta WHERE key = 'subscriptions_version'", &[])?;
        Ok(match row {
            Some(r) => get::<&str>(&r, 0)?.parse().map_err(bad_value)?,
            None => 0,
        })
    }

    fn active_subscriptions(&mut self) -> Result<Vec<Subscription>> {
        let rows =
            self.query("SELECT id, environment_id, topic, filter FROM subscriptions WHERE active ORDER BY id", &[])?;
        rows.iter()
            .map(|r| {
                Ok(Subscription {
                    id: get(r, 0)?,
                    environment_id: get(r, 1)?,
                    topic: get(r, 2)?,
                    filter: json_value(get(r, 3)?)?,
                })
            })
            .collect()
    }

    fn hosts(&mut self) -> Result<Vec<HostRecord>> {
        let rows = self.query("SELECT id, label, started_at, heartbeat_at FROM hosts ORDER BY started_at, id", &[])?;
        rows.iter()
            .map(|r| {
                Ok(HostRecord { id: get(r, 0)?, label: get(r, 1)?, started_at: get(r, 2)?, heartbeat_at: get(r, 3)? })
            })
            .collect()
    }

    fn environments(&mut self) -> Result<Vec<Environment>> {
        let rows = self.query("SELECT id, name, created_at FROM environments ORDER BY created_at, id", &[])?;
        rows.iter().map(environment_from_row).collect()
    }

    fn token(&mut self, hash: &str) -> Result<Option<ApiToken>> {
        self.query_opt("SELECT id, environment_id, name, created_at FROM tokens WHERE hash = $1", &[&hash])?
            .as_ref()
            .map(token_from_row)
            .transpose()
    }

    fn tokens(&mut self, env: &str) -> Result<Vec<ApiToken>> {
        let rows = self.query(
            "SELECT id, environment_id, name, created_at FROM tokens WHERE environment_id = $1 ORDER BY created_at, id",
            &[&env],
        )?;
        rows.iter().map(token_from_row).collect()
    }

    fn secret(&mut self, env: &str, name: &str) -> Result<Option<String>> {
        self.query_opt("SELECT value FROM secrets WHERE environment_id = $1 AND name = $2", &[&env, &name])?
            .map(|r| get(&r, 0))
            .transpose()
    }

    fn secret_names(&mut self, env: &str) -> Result<Vec<String>> {
        let rows = self.query("SELECT name FROM secrets WHERE environment_id = $1 ORDER BY name", &[&env])?;
        rows.iter().map(|r| get(r, 0)).collect()
    }

    fn all_secrets(&mut self) -> Result<Vec<StoredSecret>> {
        let rows = self.query("SELECT environment_id, name, value FROM secrets ORDER BY environment_id, name", &[])?;
        rows.iter()
            .map(|r| Ok(StoredSecret { environment_id: get(r, 0)?, name: get(r, 1)?, value: get(r, 2)? }))
            .collect()
    }

    fn deployments(&mut self, after_seq: i64, limit: u32) -> Result<Vec<Deployment>> {
        let rows = self.query(
            "SELECT seq, environment_id, name, version, deployed_at FROM plugin_deployments WHERE seq > $1 \
             ORDER BY seq LIMIT $2",
            &[&after_seq, &i64::from(limit)],
        )?;
        rows.iter().map(deployment_from_row).collect()
    }

    fn plugin_deployments(&mut self, env: &str, name: &str) -> Result<Vec<Deployment>> {
        let rows = self.query(
            "SELECT seq, environment_id, name, version, deployed_at FROM plugin_deployments \
             WHERE environment_id = $1 AND name = $2 ORDER BY seq",
            &[&env, &name],
        )?;
        rows.iter().map(deployment_from_row).collect()
    }

    fn plugin_blob(&mut self, version: &str) -> Result<Option<Vec<u8>>> {
        self.query_opt("SELECT bytes FROM plugin_blobs WHERE version = $1", &[&version])?
            .map(|r| get(&r, 0))
            .transpose()
    }
}

fn deployment_from_row(r: &Row) -> Result<Deployment> {
    Ok(Deployment {
        seq: get(r, 0)?,
        environment_id: get(r, 1)?,
        name: get(r, 2)?,
        version: get(r, 3)?,
        deployed_at: get(r, 4)?,
    })
}

impl<C: GenericClient> Tx for Conn<'_, C> {
    fn insert_execution(&mut self, e: &Execution) -> Result<i64> {
        let row = self.query_one(
            "INSERT INTO executions (environment_id, plugin, plugin_version, route, event_id, topic, job_id, attempt, \
             started_at, duration_us, cpu_us, outcome, error, peak_memory, logs, http) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) RETURNING id",
            &[
                &e.environment_id,
                &e.plugin,
                &e.plugin_version,
                &i64::from(e.route),
                &e.event_id,
                &e.topic,
                &e.job_id,
                &i64::from(e.attempt),
                &e.started_at,
                &e.duration_us,
                &e.cpu_us,
                &e.outcome.as_str(),
                &e.error,
                &(e.peak_memory.min(i64::MAX as u64) as i64),
                &e.logs,
                &(!e.http.is_empty()).then(|| serde_json::to_string(&e.http)).transpose()?,
            ],
        )?;
        get(&row, 0)
    }

    fn insert_token(&mut self, hash: &str, token: &ApiToken) -> Result<()> {
        self.execute(
            "INSERT INTO tokens (hash, id, environment_id, name, created_at) VALUES ($1, $2, $3, $4, $5)",
            &[&hash, &token.id, &token.environment_id, &token.name, &token.created_at],
        )?;
        Ok(())
    }

    fn delete_token(&mut self, env: &str, id: &str) -> Result<bool> {
        Ok(self.execute("DELETE FROM tokens WHERE environment_id = $1 AND id = $2", &[&env, &id])? > 0)
    }

    fn charge_chain(&mut self, chain: &str, events: u64, now: Millis) -> Result<u64> {
        // A chain's count is kept in shards, one per connection: the parts of one split all
        // charge one chain, and a single row would queue every part's transaction on it (a
        // random shard per charge would not do: a batch of many writes touches them all). The
        // total is this shard after the charge plus the others as committed, so under
        // concurrent writers the guard may pass its limit by what is not yet committed.
        let shard = self.shard;
        let row = self.query_one(
            "WITH charged AS ( \
                 INSERT INTO chains (id, shard, events, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id, shard) DO UPDATE SET events = chains.events + EXCLUDED.events, \
                 updated_at = EXCLUDED.updated_at RETURNING events) \
             SELECT (SELECT events FROM charged) \
                  + COALESCE((SELECT SUM(events) FROM chains WHERE id = $1 AND shard <> $2), 0)::bigint",
            &[&chain, &shard, &(events.min(i64::MAX as u64) as i64), &now],
        )?;
        Ok(get::<i64>(&row, 0)?.max(0) as u64)
    }

    fn history(&mut self, table: History, after: i64, before: Millis, limit: u32) -> Result<Vec<HistoryRow>> {
        let sql = match table {
            // Only events whose order is given (committed ones are; this transaction's own are not).
            History::Events => {
                "SELECT key, created_at, NULL::boolean FROM events WHERE key > $1 AND seq IS NOT NULL ORDER BY key LIMIT $2"
            }
            History::Deliveries => {
                "SELECT id, finished_at, status = 'done' FROM deliveries WHERE id > $1 ORDER BY id LIMIT $2"
            }
            History::Executions => {
                "SELECT id, started_at, NULL::boolean FROM executions WHERE id > $1 ORDER BY id LIMIT $2"
            }
        };
        let mut rows = self
            .query(sql, &[&after, &i64::from(limit)])?
            .iter()
            .map(|r| {
                let done: Option<bool> = get(r, 2)?;
                let at: Option<Millis> = get(r, 1)?;
                Ok(HistoryRow { key: get(r, 0)?, at: if done == Some(false) { None } else { at }, in_use: false })
            })
            .collect::<Result<Vec<_>>>()?;
        // The old rows at the head of the batch: only they can be deleted.
        let old = rows.iter().take_while(|r| r.at.is_some_and(|at| at < before)).count();
        if let (History::Events, Some(first), Some(last)) = (table, rows.first(), rows[..old].last()) {
            let (lo, hi) = (first.key, last.key);
            let mut in_use = std::collections::HashSet::new();
            for sql in [
                "SELECT event_key FROM deliveries WHERE status IN ('pending', 'leased') AND event_key BETWEEN $1 AND $2",
                "SELECT event_key FROM deliveries WHERE status = 'dead' AND event_key BETWEEN $1 AND $2",
            ] {
                for r in self.query(sql, &[&lo, &hi])? {
                    in_use.insert(get::<i64>(&r, 0)?);
                }
            }
            for row in &mut rows {
                row.in_use = in_use.contains(&row.key);
            }
        }
        Ok(rows)
    }

    fn delete_history(&mut self, table: History, keys: &[i64]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        let sql = match table {
            History::Events => "DELETE FROM events WHERE key = ANY($1)",
            History::Deliveries => "DELETE FROM deliveries WHERE id = ANY($1) AND status = 'done'",
            History::Executions => "DELETE FROM executions WHERE id = ANY($1)",
        };
        self.execute(sql, &[&keys])
    }

    fn prune_chains(&mut self, after: &str, before: Millis, limit: u32) -> Result<(u64, Option<String>)> {
        let seen = self.query(
            "SELECT id, MAX(updated_at) FROM chains WHERE id > $1 GROUP BY id ORDER BY id LIMIT $2",
            &[&after, &i64::from(limit)],
        )?;
        let mut old = Vec::new();
        let mut last = None;
        for r in &seen {
            let id: String = get(r, 0)?;
            if get::<i64>(r, 1)? < before {
                old.push(id.clone());
            }
            last = Some(id);
        }
        let n = if old.is_empty() { 0 } else { self.execute("DELETE FROM chains WHERE id = ANY($1)", &[&old])? };
        Ok((n, if seen.len() < limit as usize { None } else { last }))
    }

    fn put_secret(&mut self, env: &str, name: &str, value: Option<&str>, now: Millis) -> Result<()> {
        match value {
            Some(v) => {
                self.execute(
                    "INSERT INTO secrets (environment_id, name, value, updated_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (environment_id, name) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at",
                    &[&env, &name, &v, &now],
                )?;
            }
            None => {
                if self.execute("DELETE FROM secrets WHERE environment_id = $1 AND name = $2", &[&env, &name])? == 0 {
                    return Err(Error::not_found("secret", name));
                }
            }
        }
        Ok(())
    }

    fn insert_environment(&mut self, env: &Environment) -> Result<()> {
        self.execute(
            "INSERT INTO environments (id, name, created_at) VALUES ($1, $2, $3)",
            &[&env.id, &env.name, &env.created_at],
        )?;
        Ok(())
    }

    fn insert_sheet(&mut self, sheet: &Sheet) -> Result<()> {
        self.execute(
            "INSERT INTO sheets (id, environment_id, name, workbook_id, created_at) VALUES ($1, $2, $3, $4, $5)",
            &[&sheet.id, &sheet.environment_id, &sheet.name, &sheet.workbook_id, &sheet.created_at],
        )?;
        Ok(())
    }

    fn insert_records(
        &mut self,
        sheet_id: &str,
        records: &mut dyn Iterator<Item = EncodedRecord>,
        now: Millis,
    ) -> Result<u64> {
        let key = self.sheet_key_locked(sheet_id)?;
        let first: i64 =
            get(&self.query_one("SELECT COALESCE(MAX(ord) + 1, 0) FROM records WHERE sheet_key = $1", &[&key])?, 0)?;
        // COPY in binary: one stream instead of a statement per record.
        let sink = self
            .c
            .copy_in("COPY records (sheet_key, ord, vals, messages, metadata, has_error, updated_at) FROM STDIN BINARY")
            .db()?;
        let mut writer = BinaryCopyInWriter::new(
            sink,
            &[Type::INT8, Type::INT8, Type::TEXT, Type::TEXT, Type::TEXT, Type::BOOL, Type::INT8],
        );
        let (mut n, mut errors) = (0i64, 0i64);
        for (ord, r) in (first..).zip(records) {
            writer.write(&[&key, &ord, &r.values, &r.messages, &r.metadata, &r.has_error, &now]).db()?;
            n += 1;
            errors += i64::from(r.has_error);
        }
        writer.finish().db()?;
        self.add_record_counts(key, n, errors)?;
        Ok(n as u64)
    }

    fn stored_record(&mut self, sheet_id: &str, rowid: i64) -> Result<Option<StoredRecord>> {
        let key = self.sheet_key(sheet_id)?;
        // Locked: the caller merges into these values, and a concurrent merge must wait for
        // this one rather than overwrite it.
        let Some(row) = self.query_opt(
            "SELECT vals, messages FROM records WHERE id = $1 AND sheet_key = $2 FOR UPDATE",
            &[&rowid, &key],
        )?
        else {
            return Ok(None);
        };
        let messages: Option<&str> = get(&row, 1)?;
        Ok(Some(StoredRecord {
            values: serde_json::from_str(get(&row, 0)?)?,
            messages: messages.map(serde_json::from_str).transpose()?.unwrap_or_default(),
        }))
    }

    fn write_record_messages(
        &mut self,
        sheet_id: &str,
        rowid: i64,
        messages: Option<&str>,
        has_error: bool,
        now: Millis,
    ) -> Result<bool> {
        let missing = self.write_records_messages(sheet_id, &[(rowid, messages, has_error)], now)?;
        Ok(missing.is_none())
    }

    fn write_records_messages(
        &mut self,
        sheet_id: &str,
        records: &[(i64, Option<&str>, bool)],
        now: Millis,
    ) -> Result<Option<i64>> {
        if records.is_empty() {
            return Ok(None);
        }
        let key = self.sheet_key(sheet_id)?;
        // One statement for the page: a record named twice keeps its last messages, as the
        // updates one by one would leave it.
        let mut last: HashMap<i64, usize> = HashMap::with_capacity(records.len());
        for (i, (rowid, _, _)) in records.iter().enumerate() {
            last.insert(*rowid, i);
        }
        let mut order: Vec<usize> = last.values().copied().collect();
        order.sort_unstable();
        let ids: Vec<i64> = order.iter().map(|&i| records[i].0).collect();
        let messages: Vec<Option<&str>> = order.iter().map(|&i| records[i].1).collect();
        let errors: Vec<bool> = order.iter().map(|&i| records[i].2).collect();
        // The rows' error count before the update, read with the rows locked: no other writer
        // can change them before this transaction ends, so the count moves by exactly the
        // difference. (Joining the locked rows into the update instead planned as a nested
        // loop, 66 ms a page of 1,000.) The rows are found by id alone, the sheet checked on
        // them: with `sheet_key` in the condition the planner may AND in a scan of the whole
        // sheet's index (35 ms at 1M records).
        let before: i64 = get(
            &self.query_one(
                "SELECT COUNT(*) FILTER (WHERE has_error AND sheet_key = $1) FROM \
                 (SELECT has_error, sheet_key FROM records WHERE id = ANY($2) FOR UPDATE) locked",
                &[&key, &ids],
            )?,
            0,
        )?;
        let rows = self.query(
            "UPDATE records r SET messages = u.messages, has_error = u.has_error, updated_at = $5 \
             FROM unnest($2::bigint[], $3::text[], $4::bool[]) AS u(id, messages, has_error) \
             WHERE r.id = u.id AND r.sheet_key = $1 RETURNING r.id, r.has_error",
            &[&key, &ids, &messages, &errors, &now],
        )?;
        let after = rows.iter().map(|r| get::<bool>(r, 1).map(i64::from)).sum::<Result<i64>>()?;
        self.add_record_counts(key, 0, after - before)?;
        if rows.len() == ids.len() {
            return Ok(None);
        }
        let updated: std::collections::HashSet<i64> = rows.iter().map(|r| get(r, 0)).collect::<Result<_>>()?;
        Ok(records.iter().map(|r| r.0).find(|id| !updated.contains(id)))
    }

    fn write_record(&mut self, rowid: i64, record: &EncodedRecord, now: Millis) -> Result<()> {
        // As in `write_records_messages`: the replaced version is read locked.
        let Some(old) =
            self.query_opt("SELECT sheet_key, has_error FROM records WHERE id = $1 FOR UPDATE", &[&rowid])?
        else {
            return Ok(());
        };
        self.execute(
            "UPDATE records SET vals = $2, messages = $3, has_error = $4, updated_at = $5 WHERE id = $1",
            &[&rowid, &record.values, &record.messages, &record.has_error, &now],
        )?;
        let was_error = i64::from(get::<bool>(&old, 1)?);
        self.add_record_counts(get(&old, 0)?, 0, i64::from(record.has_error) - was_error)
    }

    fn delete_records(&mut self, sheet_id: &str, rowids: &[i64]) -> Result<Option<i64>> {
        let key = self.sheet_key_locked(sheet_id)?;
        // By id alone, the sheet checked on the rows (see `write_records_messages`).
        let rows = self.query("SELECT id, ord, sheet_key FROM records WHERE id = ANY($1)", &[&rowids])?;
        let found: HashMap<i64, i64> = rows
            .iter()
            .filter(|r| get::<i64>(r, 2).is_ok_and(|k| k == key))
            .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
            .collect::<Result<_>>()?;
        if let Some(missing) = rowids.iter().find(|id| !found.contains_key(id)) {
            return Ok(Some(*missing));
        }
        let mut ords: Vec<i64> = found.into_values().collect();
        ords.sort_unstable();
        let deleted = self
            .query("DELETE FROM records WHERE sheet_key = $1 AND ord = ANY($2) RETURNING has_error", &[&key, &ords])?;
        let errors = deleted.iter().map(|r| get::<bool>(r, 0).map(i64::from)).sum::<Result<i64>>()?;
        self.add_record_counts(key, -(deleted.len() as i64), -errors)?;
        // Each run of survivors between two deleted positions moves down by the number of
        // deletions before it. The unique index on (sheet_key, ord) is checked row by row, so
        // a run moved in place could collide with itself: park each run at its new place
        // negated (-new - 1, unique and below every live ord), then flip them all back.
        for (i, &from) in ords.iter().enumerate() {
            let until = ords.get(i + 1).copied().unwrap_or(i64::MAX);
            let moved_by = i as i64 + 1;
            self.execute(
                "UPDATE records SET ord = $4 - ord - 1 WHERE sheet_key = $1 AND ord > $2 AND ord < $3",
                &[&key, &from, &until, &moved_by],
            )?;
        }
        self.execute("UPDATE records SET ord = -ord - 1 WHERE sheet_key = $1 AND ord < 0", &[&key])?;
        Ok(None)
    }

    fn insert_job(&mut self, j: &Job) -> Result<()> {
        let predecessors = (!j.predecessor_ids.is_empty()).then(|| Value::from(j.predecessor_ids.clone()).to_string());
        self.execute(
            &format!(
                "INSERT INTO jobs ({JOB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                 $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30)"
            ),
            &[
                &j.id,
                &j.environment_id,
                &j.kind.as_str(),
                &j.operation,
                &j.source,
                &j.status.as_str(),
                &j.trigger.as_str(),
                &j.mode.as_str(),
                &json_text(&j.input),
                &j.info,
                &i64::from(j.progress),
                &j.estimated_completion_at,
                &json_text(&j.outcome),
                &j.parent_id,
                &j.part_index.map(i64::from),
                &json_text(&j.part_data),
                &j.part_execution.map(|p| p.as_str()),
                &predecessors,
                &j.run_at,
                &j.stale_timeout_ms,
                &i64::from(j.attempt),
                &j.created_at,
                &j.updated_at,
                &j.started_at,
                &j.finished_at,
                &j.outcome_acknowledged_at,
                &j.ready_at,
                &j.last_activity_at,
                &j.split_at,
                &j.parts_completed_at,
            ],
        )?;
        if !j.predecessor_ids.is_empty() {
            self.execute(
                "INSERT INTO job_predecessors (job_id, predecessor_id) SELECT $1, p FROM unnest($2::text[]) p \
                 ON CONFLICT DO NOTHING",
                &[&j.id, &j.predecessor_ids],
            )?;
        }
        Ok(())
    }

    fn job_for_update(&mut self, env: &str, id: &str) -> Result<Option<Job>> {
        // The one lock order: a part's parent before the part (parent_id never changes).
        let parent = self.query_opt("SELECT environment_id, parent_id FROM jobs WHERE id = $1", &[&id])?;
        let Some(parent) = parent.filter(|r| get::<&str>(r, 0).is_ok_and(|e| e == env)) else { return Ok(None) };
        if let Some(parent_id) = get::<Option<&str>>(&parent, 1)? {
            self.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", &[&parent_id])?;
        }
        self.job_for_update_alone(env, id)
    }

    fn job_for_update_alone(&mut self, env: &str, id: &str) -> Result<Option<Job>> {
        Ok(self.jobs_where("WHERE id = $1 FOR UPDATE", &[&id])?.pop().filter(|j| j.environment_id == env))
    }

    fn update_job(&mut self, j: &Job) -> Result<()> {
        let changed = self.execute(
            "UPDATE jobs SET status = $2, info = $3, progress = $4, estimated_completion_at = $5, outcome = $6, \
             part_execution = $7, attempt = $8, updated_at = $9, started_at = $10, finished_at = $11, \
             outcome_acknowledged_at = $12, ready_at = $13, last_activity_at = $14, split_at = $15, \
             parts_completed_at = $16 WHERE id = $1",
            &[
                &j.id,
                &j.status.as_str(),
                &j.info,
                &i64::from(j.progress),
                &j.estimated_completion_at,
                &json_text(&j.outcome),
                &j.part_execution.map(|p| p.as_str()),
                &i64::from(j.attempt),
                &j.updated_at,
                &j.started_at,
                &j.finished_at,
                &j.outcome_acknowledged_at,
                &j.ready_at,
                &j.last_activity_at,
                &j.split_at,
                &j.parts_completed_at,
            ],
        )?;
        if changed != 1 {
            return Err(Error::not_found("job", &j.id));
        }
        Ok(())
    }

    fn part_counts(&mut self, parent_id: &str) -> Result<PartStatusCounts> {
        // The parent's row plus the differences its parts' triggers appended since the last
        // fold, folded into the row here (schema version 5). A difference whose transaction
        // has not committed is not deleted, so a later call folds it: none is lost or counted
        // twice. The transactions that end parts hold the parent's lock, so they fold in turn.
        let r = self.query_one(
            "WITH folded AS (DELETE FROM part_count_deltas WHERE parent_id = $1 \
                 RETURNING total, active, complete, failed, canceled), \
             sums AS (SELECT COALESCE(SUM(total), 0) AS total, COALESCE(SUM(active), 0) AS active, \
                 COALESCE(SUM(complete), 0) AS complete, COALESCE(SUM(failed), 0) AS failed, \
                 COALESCE(SUM(canceled), 0) AS canceled FROM folded) \
             INSERT INTO part_counts AS c (parent_id, total, active, complete, failed, canceled) \
                 SELECT $1, total, active, complete, failed, canceled FROM sums \
             ON CONFLICT (parent_id) DO UPDATE SET total = c.total + excluded.total, \
                 active = c.active + excluded.active, complete = c.complete + excluded.complete, \
                 failed = c.failed + excluded.failed, canceled = c.canceled + excluded.canceled \
             RETURNING total, complete, failed, canceled, active",
            &[&parent_id],
        )?;
        let n = |i: usize| get::<i64>(&r, i).map(|n| n.max(0) as u64);
        Ok(PartStatusCounts { total: n(0)?, completed: n(1)?, failed: n(2)?, canceled: n(3)?, active: n(4)? })
    }

    fn parts_in(&mut self, parent_id: &str, statuses: &[JobStatus]) -> Result<Vec<Job>> {
        let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        self.jobs_where(
            "WHERE parent_id = $1 AND status = ANY($2) ORDER BY part_index FOR UPDATE",
            &[&parent_id, &statuses],
        )
    }

    fn waiting_dependents(&mut self, predecessor_id: &str) -> Result<Vec<Job>> {
        self.jobs_where(
            "WHERE status = 'waiting' AND id IN (SELECT job_id FROM job_predecessors WHERE predecessor_id = $1) \
             ORDER BY seq FOR UPDATE",
            &[&predecessor_id],
        )
    }

    fn predecessor_statuses(&mut self, job: &Job) -> Result<Vec<(String, JobStatus)>> {
        let rows = self.query(
            "SELECT p.predecessor_id, j.status FROM job_predecessors p JOIN jobs j ON j.id = p.predecessor_id \
             WHERE p.job_id = $1",
            &[&job.id],
        )?;
        rows.iter().map(|r| Ok((get(r, 0)?, parse_enum(get(r, 1)?)?))).collect()
    }

    fn overdue_jobs(&mut self, o: Overdue, limit: u32) -> Result<Vec<Job>> {
        self.jobs_where(
            "WHERE status IN ('scheduled', 'ready', 'executing') AND ( \
               (status = 'scheduled' AND run_at <= $1) \
               OR (status = 'ready' AND $2::bigint IS NOT NULL AND ready_at <= $2::bigint) \
               OR (status = 'executing' AND COALESCE(stale_timeout_ms, $3::bigint) IS NOT NULL \
                   AND last_activity_at + COALESCE(stale_timeout_ms, $3::bigint) <= $1 \
                   AND NOT EXISTS (SELECT 1 FROM jobs p WHERE p.parent_id = jobs.id \
                                   AND p.status NOT IN ('complete', 'failed', 'canceled')))) \
             ORDER BY seq LIMIT $4",
            &[&o.now, &o.ready_before, &o.stale_ms, &i64::from(limit)],
        )
    }

    fn insert_event(&mut self, event: &Event) -> Result<i64> {
        // Returns the event's key; its sequence number is given at commit (see the schema).
        let row = self.query_one(
            "INSERT INTO events (id, environment_id, topic, job_id, context, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING key",
            &[
                &event.id,
                &event.environment_id(),
                &event.topic,
                &event.job_id(),
                &event.context.to_string(),
                &event.payload.to_string(),
                &event.created_at,
            ],
        )?;
        get(&row, 0)
    }

    fn insert_deliveries(
        &mut self,
        event_key: i64,
        _event: Event,
        subscriptions: &[&str],
        due_at: Millis,
    ) -> Result<()> {
        if subscriptions.is_empty() {
            return Ok(());
        }
        self.execute(
            "INSERT INTO deliveries (event_key, subscription_id, status, attempts, due_at) \
             SELECT $1, s, 'pending', 0, $3 FROM unnest($2::text[]) s",
            &[&event_key, &subscriptions, &due_at],
        )?;
        self.new_deliveries += subscriptions.len();
        Ok(())
    }

    fn put_subscription(&mut self, sub: &Subscription, active: bool, now: Millis) -> Result<()> {
        self.execute(
            "INSERT INTO subscriptions (id, environment_id, topic, filter, active, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET environment_id = EXCLUDED.environment_id, topic = EXCLUDED.topic, \
             filter = EXCLUDED.filter, active = EXCLUDED.active, updated_at = EXCLUDED.updated_at",
            &[&sub.id, &sub.environment_id, &sub.topic, &json_text(&sub.filter), &active, &now],
        )?;
        self.bump_subscriptions()
    }

    fn set_subscription_active(&mut self, id: &str, active: bool, now: Millis) -> Result<()> {
        self.execute("UPDATE subscriptions SET active = $2, updated_at = $3 WHERE id = $1", &[&id, &active, &now])?;
        self.bump_subscriptions()
    }

    fn due_deliveries(&mut self, subscriptions: &[String], now: Millis, limit: u32) -> Result<Vec<DueDelivery>> {
        let rows = self.query(
            &format!(
                "SELECT d.id, d.subscription_id, d.attempts, d.last_error, {EVENT_COLUMNS} \
                 FROM deliveries d JOIN events e ON e.key = d.event_key \
                 WHERE d.status IN ('pending', 'leased') AND d.due_at <= $1 AND d.subscription_id = ANY($2) \
                   AND e.seq IS NOT NULL \
                 ORDER BY d.due_at, d.id LIMIT $3 FOR UPDATE OF d SKIP LOCKED"
            ),
            &[&now, &subscriptions, &i64::from(limit)],
        )?;
        rows.iter()
            .map(|r| {
                Ok(DueDelivery {
                    delivery_id: get(r, 0)?,
                    subscription_id: get(r, 1)?,
                    attempts: u32_of(get(r, 2)?)?,
                    last_error: get(r, 3)?,
                    event: event_from_row(r, 4)?,
                })
            })
            .collect()
    }

    fn lease_delivery(&mut self, id: i64, fence: &Fence, until: Millis) -> Result<()> {
        self.execute(
            "UPDATE deliveries SET status = 'leased', attempts = $2, due_at = $3, lease_owner = $4 WHERE id = $1",
            &[&id, &i64::from(fence.attempt), &until, &fence.owner],
        )?;
        Ok(())
    }

    fn finish_delivery(&mut self, id: i64, fence: Option<&Fence>, end: &DeliveryEnd, now: Millis) -> Result<bool> {
        if let Some(fence) = fence {
            let current = self
                .query_opt("SELECT status, attempts, lease_owner FROM deliveries WHERE id = $1 FOR UPDATE", &[&id])?;
            let current = match current {
                Some(r) => Some((get::<String>(&r, 0)?, get::<i64>(&r, 1)?, get::<Option<String>>(&r, 2)?)),
                None => None,
            };
            if current != Some(("leased".to_owned(), i64::from(fence.attempt), Some(fence.owner.clone()))) {
                return Ok(false);
            }
        }
        match end {
            DeliveryEnd::Done => {
                self.execute(
                    "UPDATE deliveries SET status = 'done', due_at = NULL, finished_at = $2 WHERE id = $1",
                    &[&id, &now],
                )?;
            }
            DeliveryEnd::Dead { error } => {
                self.execute(
                    "UPDATE deliveries SET status = 'dead', due_at = NULL, finished_at = $2, last_error = $3 WHERE id = $1",
                    &[&id, &now, error],
                )?;
            }
            DeliveryEnd::Retry { due_at, error } => {
                self.execute(
                    "UPDATE deliveries SET status = 'pending', due_at = $2, lease_owner = NULL, last_error = $3 WHERE id = $1",
                    &[&id, due_at, error],
                )?;
                self.new_deliveries += 1;
            }
        }
        Ok(true)
    }

    fn release_delivery(&mut self, id: i64, fence: &Fence, now: Millis) -> Result<bool> {
        let n = self.execute(
            "UPDATE deliveries SET status = 'pending', attempts = attempts - 1, due_at = $3, lease_owner = NULL \
             WHERE id = $1 AND status = 'leased' AND attempts = $2 AND lease_owner = $4",
            &[&id, &i64::from(fence.attempt), &now, &fence.owner],
        )?;
        self.new_deliveries += n as usize;
        Ok(n == 1)
    }

    fn redeliver_dead(&mut self, env: &str, delivery_id: i64, now: Millis) -> Result<bool> {
        let n = self.execute(
            "UPDATE deliveries d SET status = 'pending', attempts = 0, due_at = $3, lease_owner = NULL, finished_at = NULL \
             FROM events e WHERE d.id = $1 AND d.status = 'dead' AND e.key = d.event_key AND e.environment_id = $2",
            &[&delivery_id, &env, &now],
        )?;
        self.new_deliveries += n as usize;
        Ok(n == 1)
    }

    fn reclaim_leases_except(&mut self, live: &[String], now: Millis) -> Result<u64> {
        let n = self.execute(
            "UPDATE deliveries SET status = 'pending', due_at = $2, lease_owner = NULL \
             WHERE status = 'leased' AND lease_owner <> ALL($1)",
            &[&live, &now],
        )?;
        self.new_deliveries += n as usize;
        Ok(n)
    }

    fn heartbeat(&mut self, host: &HostRecord) -> Result<()> {
        self.execute(
            "INSERT INTO hosts (id, label, started_at, heartbeat_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
            &[&host.id, &host.label, &host.started_at, &host.heartbeat_at],
        )?;
        Ok(())
    }

    fn remove_host(&mut self, id: &str) -> Result<()> {
        self.execute("DELETE FROM hosts WHERE id = $1", &[&id])?;
        Ok(())
    }

    fn put_plugin_blob(&mut self, version: &str, bytes: &[u8], now: Millis) -> Result<()> {
        self.execute(
            "INSERT INTO plugin_blobs (version, bytes, size, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (version) DO NOTHING",
            &[&version, &bytes, &(bytes.len() as i64), &now],
        )?;
        Ok(())
    }

    fn insert_deployment(&mut self, env: &str, name: &str, version: Option<&str>, now: Millis) -> Result<i64> {
        // One deployment at a time across the fleet: `seq` is then commit order, and a host
        // following by `seq` never skips one committed late.
        self.lock_key("plugin-deployments")?;
        let row = self.query_one(
            "INSERT INTO plugin_deployments (environment_id, name, version, deployed_at) VALUES ($1, $2, $3, $4) \
             RETURNING seq",
            &[&env, &name, &version, &now],
        )?;
        get(&row, 0)
    }

    fn lock_key(&mut self, key: &str) -> Result<()> {
        self.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&format!("key:{key}"))])?;
        Ok(())
    }
}
