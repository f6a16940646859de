//! The handlers. Each one authenticates through its extractor ([`Tenant`] or [`Admin`]),
//! checks what the engine does not (paging bounds), and makes one engine call. Responses are
//! `{"data": …}` as in Flatfile's API.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::ApiState;
use super::auth::{Admin, Tenant};
use super::error::{ApiError, ErrorBody, Json, JsonObject, Path, Query};
use crate::filter::TopicPattern;
use crate::model::{
    Ack, ApiToken, DeadLetter, Environment, Event, Execution, Job, NewJob, NewRecord, Outcome, RecordCounts,
    RecordPage, RecordUpdate, Sheet, Split, Waiting,
};
use crate::reload::{PluginInfo, ReloadEvent};

/// `{"data": …}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Data<T> {
    /// The result.
    pub data: T,
}

type Answer<T> = Result<axum::Json<Data<T>>, ApiError>;

fn ok<T>(data: T) -> Answer<T> {
    Ok(axum::Json(Data { data }))
}

/// Most items per listing page.
pub const MAX_LIST: u32 = 1000;

/// A name for a new environment, sheet or token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NameBody {
    /// The name: 1 to 200 characters, not all blank.
    #[schema(min_length = 1, max_length = 200, pattern = "\\S")]
    pub name: String,
}

impl NameBody {
    /// The name, refused when it is blank or longer than 200 characters.
    fn checked(&self, what: &str) -> Result<&str, ApiError> {
        if self.name.trim().is_empty() || self.name.chars().count() > 200 {
            return Err(ApiError::invalid(format!("{what} needs a name of 1 to 200 characters, not all blank")));
        }
        Ok(&self.name)
    }
}

/// A token as created: its record and, once only, the token itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token's record.
    #[serde(flatten)]
    pub record: ApiToken,
    /// The bearer token. Store it now: only its hash is kept.
    pub token: String,
}

/// `info` for a cancel.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Why.
    #[serde(default)]
    pub info: Option<String>,
}

/// How many records a write changed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Written {
    /// Records inserted, updated or deleted.
    pub count: u64,
}

/// Paging of records.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordsQuery {
    /// 1..=10000, default 1000.
    #[param(minimum = 1, maximum = 10000)]
    pub page_size: Option<u32>,
    /// 1-based, default 1.
    #[param(minimum = 1, maximum = 2147483647)]
    pub page_number: Option<u32>,
}

/// Paging of jobs.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobsQuery {
    /// Only the parts of this job.
    pub parent_id: Option<String>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub page_size: Option<u32>,
    /// 1-based, default 1.
    #[param(minimum = 1, maximum = 2147483647)]
    pub page_number: Option<u32>,
}

/// A cursor into the event log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this `seq` (default 0: from the start).
    #[param(minimum = 0)]
    pub since: Option<i64>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only events whose topic matches this pattern (`job:*`, `**`).
    #[param(min_length = 1, pattern = "^[^:]+(:[^:]+)*$")]
    pub topic: Option<String>,
}

/// Which execution records.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecutionsQuery {
    /// Only those of this job's events.
    pub job_id: Option<String>,
    /// 1..=1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

fn page(size: Option<u32>, number: Option<u32>, default: u32, max: u32) -> Result<(u32, u32), ApiError> {
    let size = size.unwrap_or(default);
    let number = number.unwrap_or(1);
    if size == 0 || size > max {
        return Err(ApiError::invalid(format!("pageSize must be 1..={max}, not {size}")));
    }
    if number == 0 || number > i32::MAX as u32 {
        return Err(ApiError::invalid(format!("pageNumber is 1..={}, not {number}", i32::MAX)));
    }
    Ok((size, number))
}

/// A cursor is a `seq`, never negative.
fn since(cursor: Option<i64>) -> Result<i64, ApiError> {
    match cursor.unwrap_or(0) {
        n if n < 0 => Err(ApiError::invalid(format!("since is an event seq (0 or more), not {n}"))),
        n => Ok(n),
    }
}

// ---- health ----

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the store answers a read.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "ready", body = String),
    (status = 503, description = "the store does not answer", body = ErrorBody),
))]
pub async fn readyz(State(state): State<ApiState>) -> Response {
    // A point lookup through the read pool: cheap at any store size; "not found" is an answer.
    // With a database server, it says whether this host reaches it now.
    match state.engine.environment("env_readiness_probe").await {
        Ok(_) => "ready".into_response(),
        Err(e) if e.kind() == crate::ErrorKind::NotFound => "ready".into_response(),
        Err(e) => ApiError { status: StatusCode::SERVICE_UNAVAILABLE, code: "unavailable", message: e.to_string() }
            .into_response(),
    }
}

/// Prometheus metrics (text format 0.0.4): whether the store is reachable, jobs by status,
/// deliveries by status, plugin deliveries by outcome with their durations, loaded plugins. No
/// token; aggregated over all environments, never per tenant. While the store is unreachable
/// only the store's lines are there.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text", body = String)))]
pub async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    use std::fmt::Write;
    let mut out = String::new();
    // The store's reachability first: while the database is away, the rest cannot be read,
    // and this is the line an operator alerts on.
    let health = state.engine.store().backend().health();
    // Nothing here scans history: open deliveries come from their indexes, sizes from the
    // store's own bookkeeping, plugin deliveries from this host's counters. Only the jobs
    // gauge counts a table (jobs are not pruned).
    let stats = async {
        let engine = &state.engine;
        Ok::<_, jobhost_engine::Error>((
            engine.job_status_counts().await?,
            engine.open_delivery_stats().await?,
            engine.store_size().await?,
        ))
    };
    let stats = stats.await;
    let _ = writeln!(
        out,
        "# HELP jobhost_store_up Whether this host reaches its store (1) or not (0).\n# TYPE jobhost_store_up gauge\n\
         jobhost_store_up {}\n\
         # HELP jobhost_store_reconnects_total Store connections made again after one was lost.\n\
         # TYPE jobhost_store_reconnects_total counter\njobhost_store_reconnects_total {}",
        u8::from(health.error.is_none() && stats.is_ok()),
        health.reconnects
    );
    // Counted by this host's writers in memory: how writes group into transactions.
    let written = state.engine.store().backend().write_stats();
    let _ = writeln!(
        out,
        "# HELP jobhost_store_writes_total Writes this host committed.\n# TYPE jobhost_store_writes_total counter\n\
         jobhost_store_writes_total {}\n\
         # HELP jobhost_store_transactions_total Transactions this host committed (a group commit carries many writes).\n\
         # TYPE jobhost_store_transactions_total counter\njobhost_store_transactions_total {}\n\
         # HELP jobhost_store_careful_batches_total Write batches run again with a savepoint per write because one write in them failed.\n\
         # TYPE jobhost_store_careful_batches_total counter\njobhost_store_careful_batches_total {}",
        written.writes, written.transactions, written.careful_batches
    );
    if let Some(rows) = written.rows {
        let _ = writeln!(
            out,
            "# HELP jobhost_store_rows_written_total Rows inserted, updated or deleted by this host's transactions.\n\
             # TYPE jobhost_store_rows_written_total counter\njobhost_store_rows_written_total {rows}"
        );
    }
    if let Some(syncs) = written.syncs {
        let _ = writeln!(
            out,
            "# HELP jobhost_store_syncs_total Syncs of the store's log to disk (one makes every commit before it durable).\n\
             # TYPE jobhost_store_syncs_total counter\njobhost_store_syncs_total {syncs}"
        );
    }
    let pruned = state.engine.pruned_total();
    let _ = writeln!(
        out,
        "# HELP jobhost_retention_deleted_total Rows of history this host's retention sweeps deleted, by table.\n\
         # TYPE jobhost_retention_deleted_total counter"
    );
    for (table, n) in pruned.by_table() {
        let _ = writeln!(out, "jobhost_retention_deleted_total{{table=\"{table}\"}} {n}");
    }
    let retention = state.engine.config().retention.map_or(0.0, |r| r.as_secs_f64());
    let _ = writeln!(
        out,
        "# HELP jobhost_retention_seconds How long history is kept (0: forever).\n# TYPE jobhost_retention_seconds gauge\n\
         jobhost_retention_seconds {retention}"
    );
    let (jobs, deliveries, size) = match stats {
        Ok(s) => s,
        Err(_) => return Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()),
    };
    let _ = writeln!(out, "# HELP jobhost_jobs Jobs by status.\n# TYPE jobhost_jobs gauge");
    for (status, n) in &jobs {
        let _ = writeln!(out, "jobhost_jobs{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP jobhost_deliveries Deliveries of events to listeners by status.\n# TYPE jobhost_deliveries gauge"
    );
    for (status, n) in [("pending", deliveries.pending), ("leased", deliveries.leased), ("dead", deliveries.dead)] {
        let _ = writeln!(out, "jobhost_deliveries{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP jobhost_store_bytes Bytes the store takes (SQLite: the database file; PostgreSQL: the database).\n\
         # TYPE jobhost_store_bytes gauge\njobhost_store_bytes {}\n\
         # HELP jobhost_store_rows Rows of the history tables (SQLite: the span of keys kept, an upper bound; \
         PostgreSQL: the planner's estimate).\n# TYPE jobhost_store_rows gauge",
        size.bytes
    );
    for (table, n) in &size.rows {
        let _ = writeln!(out, "jobhost_store_rows{{table=\"{table}\"}} {n}");
    }
    if let Some(plugins) = &state.plugins {
        let _ = writeln!(
            out,
            "# HELP jobhost_plugins_loaded Plugins loaded, all environments.\n# TYPE jobhost_plugins_loaded gauge"
        );
        let _ = writeln!(out, "jobhost_plugins_loaded {}", plugins.loaded_count().await);
        let runtime = plugins.runtime();
        let stats = runtime.stats();
        let deliveries = stats.deliveries();
        let _ = writeln!(
            out,
            "# HELP jobhost_plugin_deliveries_total Plugin deliveries this host ran, by outcome.\n\
             # TYPE jobhost_plugin_deliveries_total counter"
        );
        for (outcome, n, _) in &deliveries {
            let _ = writeln!(out, "jobhost_plugin_deliveries_total{{outcome=\"{outcome}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP jobhost_plugin_delivery_seconds_total Time this host spent in plugin deliveries, by outcome.\n\
             # TYPE jobhost_plugin_delivery_seconds_total counter"
        );
        for (outcome, _, us) in &deliveries {
            let _ =
                writeln!(out, "jobhost_plugin_delivery_seconds_total{{outcome=\"{outcome}\"}} {}", *us as f64 / 1e6);
        }
        let _ = writeln!(
            out,
            "# HELP jobhost_instances_in_use Plugin instances running a delivery now.\n# TYPE jobhost_instances_in_use gauge\n\
             jobhost_instances_in_use {}\n\
             # HELP jobhost_instances_capacity Instances the pooling allocator holds.\n# TYPE jobhost_instances_capacity gauge\n\
             jobhost_instances_capacity {}\n\
             # HELP jobhost_instances_total Plugin instances created for deliveries.\n# TYPE jobhost_instances_total counter\n\
             jobhost_instances_total {}",
            stats.instances_in_use(),
            runtime.config().max_instances,
            stats.instances_total(),
        );
        let _ = writeln!(
            out,
            "# HELP jobhost_plugin_reloads_total Plugin (re)loads by result.\n# TYPE jobhost_plugin_reloads_total counter"
        );
        for (result, n) in stats.reloads() {
            let _ = writeln!(out, "jobhost_plugin_reloads_total{{result=\"{result}\"}} {n}");
        }
        let jobhost_runtime::PageStats { asked, ahead, discarded } = stats.pages();
        let _ = writeln!(
            out,
            "# HELP jobhost_plugin_record_pages_total Record pages given to plugins, by how they were read: when \
             asked, or ahead while the plugin worked on the page before.\n# TYPE jobhost_plugin_record_pages_total counter\n\
             jobhost_plugin_record_pages_total{{read=\"asked\"}} {asked}\n\
             jobhost_plugin_record_pages_total{{read=\"ahead\"}} {ahead}\n\
             # HELP jobhost_plugin_record_pages_discarded_total Record pages read ahead that no plugin asked for.\n\
             # TYPE jobhost_plugin_record_pages_discarded_total counter\n\
             jobhost_plugin_record_pages_discarded_total {discarded}"
        );
        let http = stats.http();
        let _ = writeln!(
            out,
            "# HELP jobhost_plugin_http_requests_total Plugins' outbound HTTP requests by plugin, origin and result \
             (ok, denied, limit, timeout, error).\n# TYPE jobhost_plugin_http_requests_total counter"
        );
        let label = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        for (plugin, origin, result, c) in &http {
            let _ = writeln!(
                out,
                "jobhost_plugin_http_requests_total{{plugin=\"{}\",origin=\"{}\",result=\"{result}\"}} {}",
                label(plugin),
                label(origin),
                c.requests
            );
        }
        let _ = writeln!(
            out,
            "# HELP jobhost_plugin_http_bytes_total Body bytes of plugins' outbound HTTP requests, sent and received.\n\
             # TYPE jobhost_plugin_http_bytes_total counter"
        );
        for (plugin, origin, result, c) in &http {
            for (direction, n) in [("sent", c.sent), ("received", c.received)] {
                let _ = writeln!(
                    out,
                    "jobhost_plugin_http_bytes_total{{plugin=\"{}\",origin=\"{}\",result=\"{result}\",direction=\"{direction}\"}} {n}",
                    label(plugin),
                    label(origin)
                );
            }
        }
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// Anything else.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

// ---- environments and tokens (admin) ----

/// Creates an environment (admin).
#[utoipa::path(post, path = "/v1/environments", tag = "admin", request_body = NameBody, security(("bearer" = [])),
    responses((status = 201, body = Data<Environment>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_environment(
    _: Admin,
    State(state): State<ApiState>,
    JsonObject(body): JsonObject<NameBody>,
) -> Result<(StatusCode, axum::Json<Data<Environment>>), ApiError> {
    let env = state.engine.create_environment(body.checked("an environment")?).await?;
    Ok((StatusCode::CREATED, axum::Json(Data { data: env })))
}

/// Lists environments (admin).
#[utoipa::path(get, path = "/v1/environments", tag = "admin", security(("bearer" = [])),
    responses((status = 200, body = Data<Vec<Environment>>), (status = 401, body = ErrorBody)))]
pub async fn list_environments(_: Admin, State(state): State<ApiState>) -> Answer<Vec<Environment>> {
    ok(state.engine.environments().await?)
}

/// Creates a token for an environment (admin). The token is in this answer only.
#[utoipa::path(post, path = "/v1/environments/{id}/tokens", tag = "admin", request_body = NameBody,
    params(("id" = String, Path, description = "environment id")), security(("bearer" = [])),
    responses((status = 201, body = Data<CreatedToken>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create_token(
    _: Admin,
    State(state): State<ApiState>,
    Path(id): Path<String>,
    JsonObject(body): JsonObject<NameBody>,
) -> Result<(StatusCode, axum::Json<Data<CreatedToken>>), ApiError> {
    let (record, token) = state.engine.create_token(&id, body.checked("a token")?).await?;
    Ok((StatusCode::CREATED, axum::Json(Data { data: CreatedToken { record, token } })))
}

/// Lists an environment's tokens, never the tokens themselves (admin).
#[utoipa::path(get, path = "/v1/environments/{id}/tokens", tag = "admin",
    params(("id" = String, Path, description = "environment id")), security(("bearer" = [])),
    responses((status = 200, body = Data<Vec<ApiToken>>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_tokens(_: Admin, State(state): State<ApiState>, Path(id): Path<String>) -> Answer<Vec<ApiToken>> {
    state.engine.environment(&id).await?;
    ok(state.engine.tokens(&id).await?)
}

/// Revokes a token (admin).
#[utoipa::path(delete, path = "/v1/environments/{id}/tokens/{token_id}", tag = "admin",
    params(("id" = String, Path, description = "environment id"), ("token_id" = String, Path, description = "token id")),
    security(("bearer" = [])),
    responses((status = 204, description = "revoked"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_token(
    _: Admin,
    State(state): State<ApiState>,
    Path((id, token_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    if state.engine.revoke_token(&id, &token_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("environment {id} has no token {token_id}")))
    }
}

// ---- sheets and records ----

/// Creates a sheet.
#[utoipa::path(post, path = "/v1/sheets", tag = "records", request_body = NameBody, security(("bearer" = [])),
    responses((status = 201, body = Data<Sheet>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_sheet(
    t: Tenant,
    JsonObject(body): JsonObject<NameBody>,
) -> Result<(StatusCode, axum::Json<Data<Sheet>>), ApiError> {
    let sheet = t.env.create_sheet(body.checked("a sheet")?).await?;
    Ok((StatusCode::CREATED, axum::Json(Data { data: sheet })))
}

/// A sheet.
#[utoipa::path(get, path = "/v1/sheets/{id}", tag = "records", params(("id" = String, Path, description = "sheet id")),
    security(("bearer" = [])), responses((status = 200, body = Data<Sheet>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_sheet(t: Tenant, Path(id): Path<String>) -> Answer<Sheet> {
    ok(t.env.sheet(&id).await?)
}

/// A sheet's record counts.
#[utoipa::path(get, path = "/v1/sheets/{id}/counts", tag = "records", params(("id" = String, Path, description = "sheet id")),
    security(("bearer" = [])), responses((status = 200, body = Data<RecordCounts>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn sheet_counts(t: Tenant, Path(id): Path<String>) -> Answer<RecordCounts> {
    ok(t.env.record_counts(&id).await?)
}

/// A page of a sheet's records, in stable order.
#[utoipa::path(get, path = "/v1/sheets/{id}/records", tag = "records",
    params(("id" = String, Path, description = "sheet id"), RecordsQuery), security(("bearer" = [])),
    responses((status = 200, body = Data<RecordPage>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_records(
    t: Tenant,
    Path(id): Path<String>,
    Query(q): Query<RecordsQuery>,
) -> Result<Response, ApiError> {
    let (size, number) = page(q.page_size, q.page_number, 1000, crate::model::MAX_PAGE_SIZE)?;
    // The page's JSON is written straight from the stored rows (the same bytes as a
    // `Data<RecordPage>`, without building the records first); it is most of what a page costs.
    let mut body = b"{\"data\":".to_vec();
    t.env.records_json(&id, size, number, &mut body).await?;
    body.push(b'}');
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Appends records to a sheet: all or none.
#[utoipa::path(post, path = "/v1/sheets/{id}/records", tag = "records", request_body = Vec<NewRecord>,
    params(("id" = String, Path, description = "sheet id")), security(("bearer" = [])),
    responses((status = 201, body = Data<Written>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn insert_records(
    t: Tenant,
    Path(id): Path<String>,
    Json(records): Json<Vec<NewRecord>>,
) -> Result<(StatusCode, axum::Json<Data<Written>>), ApiError> {
    let count = t.env.insert_records(&id, records).await?;
    Ok((StatusCode::CREATED, axum::Json(Data { data: Written { count } })))
}

/// Updates records by id (values merged; messages replaced when given): all or none.
#[utoipa::path(patch, path = "/v1/sheets/{id}/records", tag = "records", request_body = Vec<RecordUpdate>,
    params(("id" = String, Path, description = "sheet id")), security(("bearer" = [])),
    responses((status = 200, body = Data<Written>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn update_records(
    t: Tenant,
    Path(id): Path<String>,
    Json(updates): Json<Vec<RecordUpdate>>,
) -> Answer<Written> {
    ok(Written { count: t.env.update_records(&id, updates).await? })
}

/// Which records to delete.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteRecordsQuery {
    /// Record ids, comma-separated (`rec_1,rec_7`); at most 10,000.
    #[param(pattern = "^rec_[1-9][0-9]{0,17}(,rec_[1-9][0-9]{0,17})*$")]
    pub ids: String,
}

/// Deletes records by id: all or none (an id not in the sheet refuses the call). Later records
/// move up, so pages stay dense.
#[utoipa::path(delete, path = "/v1/sheets/{id}/records", tag = "records",
    params(("id" = String, Path, description = "sheet id"), DeleteRecordsQuery), security(("bearer" = [])),
    responses((status = 200, body = Data<Written>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn delete_records(t: Tenant, Path(id): Path<String>, Query(q): Query<DeleteRecordsQuery>) -> Answer<Written> {
    let ids: Vec<String> = q.ids.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    if ids.is_empty() {
        return Err(ApiError::invalid("ids must name at least one record"));
    }
    ok(Written { count: t.env.delete_records(&id, ids).await? })
}

// ---- jobs ----

/// Creates a job.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = NewJob, security(("bearer" = [])),
    responses((status = 201, body = Data<Job>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, description = "the source sheet or a predecessor is not there", body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create_job(
    t: Tenant,
    JsonObject(new): JsonObject<NewJob>,
) -> Result<(StatusCode, axum::Json<Data<Job>>), ApiError> {
    let job = t.env.create_job(new).await?;
    Ok((StatusCode::CREATED, axum::Json(Data { data: job })))
}

/// Jobs of the environment (or the parts of `parentId`), oldest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(JobsQuery), security(("bearer" = [])),
    responses((status = 200, body = Data<Vec<Job>>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_jobs(t: Tenant, Query(q): Query<JobsQuery>) -> Answer<Vec<Job>> {
    let (size, number) = page(q.page_size, q.page_number, 100, MAX_LIST)?;
    let offset = u64::from(number - 1) * u64::from(size);
    match q.parent_id {
        Some(parent) => {
            let parts = t.env.parts(&parent).await?;
            ok(parts.into_iter().skip(offset as usize).take(size as usize).collect())
        }
        None => ok(t.env.jobs(offset, size).await?),
    }
}

/// A job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path, description = "job id")),
    security(("bearer" = [])), responses((status = 200, body = Data<Job>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_job(t: Tenant, Path(id): Path<String>) -> Answer<Job> {
    ok(t.env.job(&id).await?)
}

/// What a job that has not ended waits for: one sentence, and the deliveries of its events
/// that have not finished (a retried one with its attempts, last error and `dueAt`, when the
/// next attempt is due). `data` is null once the job has ended.
#[utoipa::path(get, path = "/v1/jobs/{id}/waiting", tag = "jobs", params(("id" = String, Path, description = "job id")),
    security(("bearer" = [])), responses((status = 200, body = Data<Option<Waiting>>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn job_waiting(t: Tenant, Path(id): Path<String>) -> Answer<Option<Waiting>> {
    ok(t.env.waiting(&id).await?)
}

macro_rules! job_call {
    ($(#[$doc:meta])* $name:ident, $path:literal, |$env:ident, $id:ident| $call:expr) => {
        $(#[$doc])*
        #[utoipa::path(post, path = $path, tag = "jobs", params(("id" = String, Path, description = "job id")),
            security(("bearer" = [])),
            responses((status = 200, body = Data<Job>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
                (status = 409, body = ErrorBody)))]
        pub async fn $name(t: Tenant, Path($id): Path<String>) -> Answer<Job> {
            let $env = &t.env;
            ok($call.await?)
        }
    };
    ($(#[$doc:meta])* $name:ident, $path:literal, $body:ty, |$env:ident, $id:ident, $b:ident| $call:expr) => {
        $(#[$doc])*
        #[utoipa::path(post, path = $path, tag = "jobs", request_body = $body, params(("id" = String, Path, description = "job id")),
            security(("bearer" = [])),
            responses((status = 200, body = Data<Job>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
                (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
        pub async fn $name(t: Tenant, Path($id): Path<String>, JsonObject($b): JsonObject<$body>) -> Answer<Job> {
            let $env = &t.env;
            ok($call.await?)
        }
    };
}

job_call!(
    /// `created` → `ready` (or `waiting`/`scheduled`).
    execute_job, "/v1/jobs/{id}/execute", |env, id| env.execute(&id));
job_call!(
    /// `ready`/`executing` → `executing`, with info, progress and an estimate. Repeatable.
    ack_job, "/v1/jobs/{id}/ack", Ack, |env, id, body| env.ack(&id, body));
job_call!(
    /// `ready`/`executing` → `complete`, with an outcome.
    complete_job, "/v1/jobs/{id}/complete", Outcome, |env, id, body| env.complete(&id, body));
job_call!(
    /// `ready`/`executing` → `failed`, with an outcome.
    fail_job, "/v1/jobs/{id}/fail", Outcome, |env, id, body| env.fail(&id, body));
job_call!(
    /// Any open status → `canceled`, cascading to open parts.
    cancel_job, "/v1/jobs/{id}/cancel", CancelBody, |env, id, body| env.cancel(&id, body.info));
job_call!(
    /// `failed` → `ready`, attempt + 1.
    retry_job, "/v1/jobs/{id}/retry", |env, id| env.retry(&id));
job_call!(
    /// Records that a terminal job's outcome was seen.
    acknowledge_outcome, "/v1/jobs/{id}/outcome/acknowledge", |env, id| env.acknowledge_outcome(&id));

/// What a split made.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SplitAnswer {
    /// How many parts.
    pub parts: u32,
}

/// Splits an `executing` job into parts.
#[utoipa::path(post, path = "/v1/jobs/{id}/split", tag = "jobs", request_body = Split,
    params(("id" = String, Path, description = "job id")), security(("bearer" = [])),
    responses((status = 200, body = Data<SplitAnswer>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn split_job(t: Tenant, Path(id): Path<String>, JsonObject(split): JsonObject<Split>) -> Answer<SplitAnswer> {
    ok(SplitAnswer { parts: t.env.split(&id, split).await?.parts })
}

// ---- events and executions ----

fn topic_pattern(topic: Option<&str>) -> Result<Option<TopicPattern>, ApiError> {
    topic.map(|t| TopicPattern::parse(t).map_err(ApiError::from)).transpose()
}

/// Events scanned at most per `GET /v1/events` with a `topic`: a sparse filter over a long log
/// answers within a bounded time and says where it stopped (`Next-Since`).
pub const EVENTS_SCAN_BUDGET: usize = 100_000;

/// Events after a cursor, oldest first. With `topic`, the store is read past the first batch
/// until the page is full, the log ends, or [`EVENTS_SCAN_BUDGET`] events were scanned, so a
/// match beyond the first `limit` events is found. Every answer carries `Next-Since`, the
/// cursor for the next page (the last event scanned), and `Events-More`: `false` when the
/// scan reached the end of the log, `true` when the page filled or the budget stopped it.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery), security(("bearer" = [])),
    responses((status = 200, body = Data<Vec<Event>>, headers(
            ("Next-Since" = i64, description = "pass as `since` for the next page: the last event scanned"),
            ("Events-More" = bool, description = "false when the scan reached the end of the log"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list_events(t: Tenant, Query(q): Query<EventsQuery>) -> Result<Response, ApiError> {
    let (limit, _) = page(q.limit, None, 100, MAX_LIST)?;
    let pattern = topic_pattern(q.topic.as_deref())?;
    let scan = scan_events(&t.env, since(q.since)?, limit, pattern.as_ref(), EVENTS_SCAN_BUDGET).await?;
    let headers = [("next-since", scan.next_since.to_string()), ("events-more", scan.more.to_string())];
    Ok((headers, axum::Json(Data { data: scan.events })).into_response())
}

/// A page of [`scan_events`].
#[derive(Debug)]
pub struct EventScan {
    /// Up to `limit` matching events, oldest first.
    pub events: Vec<Event>,
    /// The last event scanned: the cursor for the next page.
    pub next_since: i64,
    /// False when the scan reached the end of the log.
    pub more: bool,
}

/// The events after `since` whose topic matches `pattern` (all without one): read in batches
/// until `limit` matched, the log ended, or `budget` events were scanned.
pub async fn scan_events(
    env: &jobhost_engine::Env,
    since: i64,
    limit: u32,
    pattern: Option<&TopicPattern>,
    budget: usize,
) -> jobhost_engine::Result<EventScan> {
    let (mut cursor, mut events, mut scanned) = (since, Vec::new(), 0usize);
    // The first read is `limit` events: without a pattern that is the page, and a dense match
    // needs little more. Each further read doubles, up to a page's most, so a sparse match
    // costs few reads.
    let mut batch = limit.min(budget.max(1) as u32);
    let more = loop {
        let read = env.events(cursor, batch).await?;
        let got = read.len();
        for e in read {
            cursor = e.seq;
            scanned += 1;
            if pattern.is_none_or(|p| p.matches(&e.topic)) {
                events.push(e);
                if events.len() == limit as usize {
                    break;
                }
            }
            if scanned >= budget {
                break;
            }
        }
        if events.len() == limit as usize || scanned >= budget {
            break true;
        }
        if got < batch as usize {
            break false;
        }
        batch = (batch * 2).min(MAX_LIST).min((budget - scanned) as u32);
    };
    Ok(EventScan { events, next_since: cursor, more })
}

/// A live stream of events (Server-Sent Events): every event after `since` whose topic matches
/// `topic`, as `event: <topic>`, `id: <seq>`, `data: <event JSON>`, as soon as it is stored.
#[utoipa::path(get, path = "/v1/events/stream", tag = "events", params(EventsQuery), security(("bearer" = [])),
    responses((status = 200, description = "text/event-stream of events", content_type = "text/event-stream", body = String),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn stream_events(
    t: Tenant,
    State(state): State<ApiState>,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let pattern = topic_pattern(q.topic.as_deref())?;
    let stream = event_stream(&state.engine, t.env, since(q.since)?).filter_map(move |e| {
        let sse = pattern.as_ref().is_none_or(|p| p.matches(&e.topic)).then(|| {
            Ok(SseEvent::default()
                .event(e.topic.clone())
                .id(e.seq.to_string())
                .data(serde_json::to_string(&e).unwrap_or_default()))
        });
        std::future::ready(sse)
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Every event of `env` after `cursor`, as soon as it is stored: read in batches, then woken by
/// the store's commits (the stream ends when the store closes).
pub fn event_stream(
    engine: &jobhost_engine::Engine,
    env: jobhost_engine::Env,
    cursor: i64,
) -> impl Stream<Item = Event> + use<> {
    let commits = engine.store().backend().notifications().commits;
    let start = (env, cursor, commits, std::collections::VecDeque::<Event>::new());
    futures_util::stream::unfold(start, |(env, mut cursor, mut commits, mut queue)| async move {
        loop {
            if let Some(e) = queue.pop_front() {
                return Some((e, (env, cursor, commits, queue)));
            }
            commits.borrow_and_update();
            match env.events(cursor, 500).await {
                Ok(batch) if !batch.is_empty() => {
                    cursor = batch.last().map_or(cursor, |e| e.seq);
                    queue.extend(batch);
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "event stream read failed; retrying on the next commit"),
            }
            // Nothing new: wait for the next commit (the store closing ends the stream).
            commits.changed().await.ok()?;
        }
    })
}

/// Execution records of plugin deliveries (optionally of one job's events), oldest first.
#[utoipa::path(get, path = "/v1/executions", tag = "events", params(ExecutionsQuery), security(("bearer" = [])),
    responses((status = 200, body = Data<Vec<Execution>>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list_executions(t: Tenant, Query(q): Query<ExecutionsQuery>) -> Answer<Vec<Execution>> {
    let (limit, _) = page(q.limit, None, 100, MAX_LIST)?;
    ok(t.env.executions(q.job_id.as_deref(), limit).await?)
}

/// Deliveries that used up their attempts, oldest first, with the last error.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "events", security(("bearer" = [])),
    responses((status = 200, body = Data<Vec<DeadLetter>>), (status = 401, body = ErrorBody)))]
pub async fn list_dead_letters(t: Tenant) -> Answer<Vec<DeadLetter>> {
    ok(t.env.dead_letters().await?)
}

/// Gives a dead letter a new round of attempts, due now: its listener gets the event again.
#[utoipa::path(post, path = "/v1/dead-letters/{id}/retry", tag = "events",
    params(("id" = i64, Path, description = "delivery id")), security(("bearer" = [])),
    responses((status = 204, description = "due again"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn retry_dead_letter(t: Tenant, Path(id): Path<i64>) -> Result<StatusCode, ApiError> {
    t.env.redeliver(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- plugins ----

fn plugins(state: &ApiState) -> Result<&super::plugins::Plugins, ApiError> {
    state.plugins.as_deref().ok_or_else(|| ApiError::not_found("this host runs no plugins"))
}

impl From<super::plugins::PluginError> for ApiError {
    fn from(e: super::plugins::PluginError) -> Self {
        use super::plugins::PluginError::*;
        let (status, code) = match &e {
            BadName(_) => (StatusCode::BAD_REQUEST, "invalid"),
            Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-plugin"),
            NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError { status, code, message: e.to_string() }
    }
}

/// The environment's plugins: versions and routes.
#[utoipa::path(get, path = "/v1/plugins", tag = "plugins", security(("bearer" = [])),
    responses((status = 200, body = Data<Vec<PluginInfo>>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn list_plugins(t: Tenant, State(state): State<ApiState>) -> Answer<Vec<PluginInfo>> {
    ok(plugins(&state)?.list(t.env.id()).await?)
}

/// Deploys a component (the request body) as plugin `name`: validated first (a component
/// that does not load changes nothing), then swapped in atomically like a file dropped in the
/// plugins directory. Deliveries in flight finish on the old version.
#[utoipa::path(put, path = "/v1/plugins/{name}", tag = "plugins",
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "the component"),
    params(("name" = String, Path, description = "plugin name")), security(("bearer" = [])),
    responses((status = 200, body = Data<ReloadEvent>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn deploy_plugin(
    t: Tenant,
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Answer<ReloadEvent> {
    ok(plugins(&state)?.deploy(t.env.id(), &name, body.to_vec()).await?)
}

/// Which version to roll back to.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// A kept version; default: the newest kept version that is not current.
    #[serde(default)]
    pub to: Option<String>,
}

/// Puts a kept version of a plugin back.
#[utoipa::path(post, path = "/v1/plugins/{name}/rollback", tag = "plugins", request_body = RollbackBody,
    params(("name" = String, Path, description = "plugin name")), security(("bearer" = [])),
    responses((status = 200, body = Data<ReloadEvent>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn rollback_plugin(
    t: Tenant,
    State(state): State<ApiState>,
    Path(name): Path<String>,
    JsonObject(body): JsonObject<RollbackBody>,
) -> Answer<ReloadEvent> {
    ok(plugins(&state)?.rollback(t.env.id(), &name, body.to.as_deref()).await?)
}

/// Unloads a plugin and deletes its file; its kept versions stay for a rollback. Events for
/// its routes keep being stored and wait for a plugin with those routes.
#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "plugins",
    params(("name" = String, Path, description = "plugin name")), security(("bearer" = [])),
    responses((status = 200, body = Data<ReloadEvent>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_plugin(t: Tenant, State(state): State<ApiState>, Path(name): Path<String>) -> Answer<ReloadEvent> {
    ok(plugins(&state)?.delete(t.env.id(), &name).await?)
}
