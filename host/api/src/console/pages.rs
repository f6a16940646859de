//! The console's handlers: one per page or action. Pages read through the session's
//! [`Env`](jobhost_engine::Env), exactly as the API does (another environment's ids are not
//! found); actions are forms posted with the session's CSRF token, answered with a redirect
//! back and a message in words — the engine's own refusal when it refuses.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use futures_util::stream::{Stream, StreamExt};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;

use super::ConsoleState;
use super::session::{self, Refused, Viewer, Who};
use super::view::{self, Nav};
use crate::model::{Job, JobStatus, JobType, Millis, PartCounts};
use jobhost_engine::store::JobQuery;

type Page = Result<Response, Refused>;

/// Jobs per page of the list.
const JOBS_PER_PAGE: u32 = 50;
/// Records per page of a sheet.
const RECORDS_PER_PAGE: u32 = 100;
/// Sheets per page.
const SHEETS_PER_PAGE: u32 = 50;
/// Executions shown on a job's page (the newest).
const EXECUTIONS_SHOWN: u32 = 200;
/// Characters of an execution's logs shown; the rest is cut with a note.
const LOG_CHARS: usize = 64 * 1024;
/// Characters of a job's info in the list.
const INFO_CHARS: usize = 120;

/// `%`-encodes everything but unreserved characters, for a query value.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn error_page(viewer: &Viewer, status: StatusCode, title: &str, text: String) -> Refused {
    (status, view::page(viewer, title, Nav::Jobs, html! { p.flash.error { (text) } })).into_response().into()
}

fn engine_error(viewer: &Viewer, e: jobhost_engine::Error) -> Refused {
    let e = crate::error::ApiError::from(e);
    let title = if e.status == StatusCode::NOT_FOUND { "Not found" } else { "Refused" };
    error_page(viewer, e.status, title, e.message)
}

/// After an action: back to `to`, with a message.
fn done(state: &ConsoleState, viewer: &Viewer, to: &str, result: Result<String, String>) -> Response {
    match result {
        Ok(text) => state.sessions.flash(&viewer.session, false, text),
        Err(text) => state.sessions.flash(&viewer.session, true, text),
    }
    Redirect::to(to).into_response()
}

/// A form with nothing but its CSRF token.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

// ---- sign-in ----

/// `/console/`: the jobs (or, for the admin, environments).
pub async fn home(viewer: Viewer) -> Redirect {
    Redirect::to(if viewer.is_admin() { "/console/admin" } else { "/console/jobs" })
}

/// Where to go after signing in.
#[derive(Debug, Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

/// Only a console path: never a redirect to elsewhere.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/console/") && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/console/".to_owned(),
    }
}

/// The sign-in page.
pub async fn sign_in_page(Query(q): Query<NextQuery>) -> Markup {
    view::sign_in_page(&safe_next(q.next.as_deref()), None)
}

/// The sign-in form.
#[derive(Debug, Deserialize)]
pub struct SignInForm {
    token: String,
    next: Option<String>,
}

/// Exchanges a token for a session cookie.
pub async fn sign_in(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<SignInForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    let token = form.token.trim();
    let refuse = |status: StatusCode, text: &str| (status, view::sign_in_page(&next, Some(text))).into_response();
    let admin = state
        .api
        .admin_token
        .as_deref()
        .is_some_and(|a| jobhost_engine::token_hash(a) == jobhost_engine::token_hash(token));
    let who = if admin {
        Who::Admin
    } else {
        let record = match state.api.engine.token(token).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "That token is not valid: revoked, mistyped, or not a token of this host.",
                );
            }
            Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &format!("The store does not answer: {e}")),
        };
        let name = match state.api.engine.environment(&record.environment_id).await {
            Ok(env) => env.name,
            Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &format!("The store does not answer: {e}")),
        };
        Who::Env {
            token_hash: jobhost_engine::token_hash(token),
            token_id: record.id,
            environment_id: record.environment_id,
            environment_name: name,
        }
    };
    let to = if admin && next == "/console/" { "/console/admin".to_owned() } else { next.clone() };
    match state.sessions.start(who) {
        Ok(id) => (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, session::set_cookie(Some(&id), session::over_https(&headers, &uri))),
                (header::LOCATION, to),
            ],
        )
            .into_response(),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &format!("Cannot start a session: {e}")),
    }
}

/// Ends the session.
pub async fn sign_out(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<CsrfForm>,
) -> Page {
    viewer.check_csrf(&form.csrf)?;
    state.sessions.end(&viewer.session);
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, session::set_cookie(None, session::over_https(&headers, &uri))),
            (header::LOCATION, "/console/sign-in".to_owned()),
        ],
    )
        .into_response())
}

// ---- the live stream ----

/// The session's events from now on (or after `Last-Event-ID`), reduced to what a page needs
/// to know what to fetch again: `{seq, topic, jobId, parentId}`.
pub async fn stream(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Refused> {
    let env = viewer.env()?.clone();
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i64>().ok());
    let since = match resume {
        Some(seq) if seq >= 0 => seq,
        _ => env.last_event_seq().await.map_err(|e| engine_error(&viewer, e))?,
    };
    let events = crate::routes::event_stream(&state.api.engine, env, since).map(|e| {
        let data = json!({
            "seq": e.seq,
            "topic": e.topic,
            "jobId": e.job_id(),
            "parentId": e.payload.get("parentId"),
        });
        Ok(SseEvent::default().id(e.seq.to_string()).data(data.to_string()))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

// ---- jobs ----

/// The list's filters, as the form sends them.
#[derive(Debug, Default, Deserialize)]
pub struct JobsParams {
    status: Option<String>,
    job: Option<String>,
    parent: Option<String>,
    from: Option<String>,
    to: Option<String>,
    parts: Option<String>,
    page: Option<u32>,
    fragment: Option<String>,
}

const OPEN: [JobStatus; 5] =
    [JobStatus::Created, JobStatus::Scheduled, JobStatus::Waiting, JobStatus::Ready, JobStatus::Executing];
const ALL: [JobStatus; 8] = JobStatus::ALL;

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` or `YYYY-MM-DDTHH:MM:SS` (a space for the `T` too), UTC.
pub fn parse_time(text: &str) -> Result<Millis, String> {
    let bad = || format!("`{text}` is not a time: write YYYY-MM-DD or YYYY-MM-DD HH:MM (UTC)");
    let (date, clock) = match text.split_once(['T', ' ']) {
        Some((d, c)) => (d, Some(c)),
        None => (text, None),
    };
    let mut d = date.split('-');
    let (y, m, day) = (d.next().ok_or_else(bad)?, d.next().ok_or_else(bad)?, d.next().ok_or_else(bad)?);
    let (y, m, day): (i64, u32, u32) =
        (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?, day.parse().map_err(|_| bad())?);
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) || !(1970..=9999).contains(&y) {
        return Err(bad());
    }
    let mut secs = 0i64;
    if let Some(clock) = clock {
        let parts: Vec<&str> = clock.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(bad());
        }
        let n: Vec<i64> = parts.iter().map(|p| p.parse::<i64>().map_err(|_| bad())).collect::<Result<_, _>>()?;
        let (h, min, s) = (n[0], n[1], n.get(2).copied().unwrap_or(0));
        if !(0..24).contains(&h) || !(0..60).contains(&min) || !(0..60).contains(&s) {
            return Err(bad());
        }
        secs = h * 3600 + min * 60 + s;
    }
    let days = view::days_from_civil(y, m, day);
    if view::civil(days) != (y, m, day) {
        return Err(bad());
    }
    Ok((days * 86_400 + secs) * 1000)
}

impl JobsParams {
    /// The store query these filters mean, or what is wrong with them, in words.
    fn query(&self) -> Result<JobQuery, String> {
        let mut q = JobQuery { top_level: given(&self.parts).is_none(), ..JobQuery::default() };
        match given(&self.status) {
            None => {}
            Some("open") => q.statuses = OPEN.to_vec(),
            Some(s) => q.statuses = vec![s.parse::<JobStatus>().map_err(|e| e.to_string())?],
        }
        if let Some(job) = given(&self.job) {
            let (kind, operation) = job.split_once(':').unwrap_or((job, ""));
            if !kind.is_empty() && kind != "*" {
                q.kind = Some(kind.parse::<JobType>().map_err(|e| e.to_string())?);
            }
            if !operation.is_empty() && operation != "*" {
                q.operation = Some(operation.to_owned());
            }
        }
        q.parent = given(&self.parent).map(str::to_owned);
        q.created_from = given(&self.from).map(parse_time).transpose()?;
        q.created_before = given(&self.to).map(parse_time).transpose()?;
        Ok(q)
    }

    /// The query string of these filters on `page` (for links).
    fn href(&self, page: u32, status: Option<&str>) -> String {
        let mut out = String::from("/console/jobs?");
        let status = status.or(given(&self.status));
        for (k, v) in [
            ("status", status),
            ("job", given(&self.job)),
            ("parent", given(&self.parent)),
            ("from", given(&self.from)),
            ("to", given(&self.to)),
            ("parts", given(&self.parts)),
        ] {
            if let Some(v) = v {
                out.push_str(&format!("{k}={}&", url_encode(v)));
            }
        }
        out.push_str(&format!("page={page}"));
        out
    }
}

/// The jobs of the environment: filters, counts by status, a page of jobs; live.
pub async fn jobs(viewer: Viewer, Query(params): Query<JobsParams>) -> Page {
    let env = viewer.env()?;
    let page = params.page.unwrap_or(1).max(1);
    let filters = html! {
        form.filters method="get" action="/console/jobs" {
            label { "Status " select name="status" {
                option value="" selected[given(&params.status).is_none()] { "any" }
                option value="open" selected[given(&params.status) == Some("open")] { "open" }
                @for s in ALL { option value=(s) selected[given(&params.status) == Some(s.as_str())] { (s) } }
            } }
            label { "Type:operation " input name="job" placeholder="sheet:submitLargeSheet" value=[given(&params.job)]; }
            label { "Parent " input name="parent" placeholder="job_…" value=[given(&params.parent)]; }
            label { "From " input name="from" placeholder="YYYY-MM-DD HH:MM" value=[given(&params.from)]; }
            label { "Before " input name="to" placeholder="YYYY-MM-DD HH:MM" value=[given(&params.to)]; }
            label { input type="checkbox" name="parts" value="1" checked[given(&params.parts).is_some()]; " with parts" }
            button type="submit" { "Filter" }
            " " a href="/console/jobs" { "clear" }
            span.hint { "Times are UTC." }
        }
    };
    let query = match params.query() {
        Ok(q) => q,
        Err(text) => {
            let body = html! { (filters) p.flash.error role="alert" { (text) } };
            return Err((StatusCode::BAD_REQUEST, view::page(&viewer, "Jobs", Nav::Jobs, body)).into_response().into());
        }
    };
    let offset = u64::from(page - 1) * u64::from(JOBS_PER_PAGE);
    let (jobs, counts) = match tokio::try_join!(
        env.find_jobs(query.clone(), offset, JOBS_PER_PAGE + 1),
        env.count_jobs(query.clone())
    ) {
        Ok(found) => found,
        Err(e) => return Err(engine_error(&viewer, e)),
    };
    let more = jobs.len() > JOBS_PER_PAGE as usize;
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let live = html! {
        p.counts {
            a href=(params.href(1, Some(""))) class=[query.statuses.is_empty().then_some("current")] { "all " strong { (total) } }
            @for (status, n) in &counts {
                " " a href=(params.href(1, Some(status.as_str()))) class={ "status s-" (status) } { (status) " " strong { (n) } }
            }
        }
        @if jobs.is_empty() {
            p.none { "No jobs match." }
        } @else {
            table.jobs {
                thead { tr { th { "Job" } th { "Type:operation" } th { "Status" } th { "Progress" } th { "Info" } th { "Attempt" } th { "Created" } th { "Ended" } } }
                tbody {
                    @for j in jobs.iter().take(JOBS_PER_PAGE as usize) {
                        tr {
                            td { a href={ "/console/jobs/" (j.id) } { code { (j.id) } }
                                @if let Some(i) = j.part_index { " " span.hint { "part " (i) } } }
                            td { (j.job_name()) }
                            td { (view::status(j.status)) }
                            td { progress max="100" value=(j.progress) {} " " (j.progress) "%" }
                            td.info { @if let Some(info) = &j.info { (view::cut(info, INFO_CHARS).0) @if view::cut(info, INFO_CHARS).1 { "…" } } }
                            td { (j.attempt) }
                            td { (view::time(j.created_at)) }
                            td { (view::maybe_time(j.finished_at)) }
                        }
                    }
                }
            }
        }
        p.pager {
            @if page > 1 { a href=(params.href(page - 1, None)) { "← newer" } " " }
            "page " (page)
            @if more { " " a href=(params.href(page + 1, None)) { "older →" } }
        }
    };
    if given(&params.fragment).is_some() {
        return Ok(live.into_response());
    }
    let fragment = format!("{}&fragment=1", params.href(page, None));
    let body = html! {
        (filters)
        section #live data-live=(fragment) data-topics="job:" { (live) }
    };
    Ok(view::page(&viewer, "Jobs", Nav::Jobs, body).into_response())
}

/// Counts of a parent's parts by status.
fn part_counts(statuses: &[JobStatus]) -> (PartCounts, u64) {
    let mut c = PartCounts { total: statuses.len() as u64, ..PartCounts::default() };
    let mut open = 0;
    for s in statuses {
        match s {
            JobStatus::Complete => c.completed += 1,
            JobStatus::Failed => c.failed += 1,
            JobStatus::Canceled => c.canceled += 1,
            _ => open += 1,
        }
    }
    (c, open)
}

/// One letter per status, for the grid: lower case open, upper case ended.
fn status_code(s: JobStatus) -> char {
    match s {
        JobStatus::Created => 'c',
        JobStatus::Scheduled => 's',
        JobStatus::Waiting => 'w',
        JobStatus::Ready => 'r',
        JobStatus::Executing => 'x',
        JobStatus::Complete => 'C',
        JobStatus::Failed => 'F',
        _ => 'X',
    }
}

fn part_summary(job: &Job, statuses: &[JobStatus]) -> Markup {
    let (c, open) = part_counts(statuses);
    html! {
        p.partcounts #partcounts {
            "total " strong data-count="total" { (c.total) }
            " · completed " strong data-count="completed" { (c.completed) }
            " · failed " strong data-count="failed" { (c.failed) }
            " · canceled " strong data-count="canceled" { (c.canceled) }
            " · open " strong data-count="open" { (open) }
            " · " span data-count="done" { (c.completed + c.failed + c.canceled) " of " (c.total) " ended" }
        }
        p #partscompleted {
            "job:parts-completed: "
            @match job.parts_completed_at { Some(at) => (view::time(at)), None => span.none { "not yet" } }
        }
    }
}

/// A job: what it is, what happened to it, its parts, its executions; live.
pub async fn job(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    Path(id): Path<String>,
    Query(params): Query<JobsParams>,
) -> Page {
    let env = viewer.env()?;
    let job = env.job(&id).await.map_err(|e| engine_error(&viewer, e))?;
    let (events, executions, waiting) =
        tokio::try_join!(env.job_events(&id), env.executions(Some(&id), u32::MAX), env.waiting(&id))
            .map_err(|e| engine_error(&viewer, e))?;
    let shown = executions.len().saturating_sub(EXECUTIONS_SHOWN as usize);
    let live = html! {
        div.actions {
            @if !job.status.is_terminal() {
                (action_form(&viewer, &job.id, "cancel", "Cancel", "Cancel this job and its open parts?"))
            }
            @if job.status == JobStatus::Failed { (action_form(&viewer, &job.id, "retry", "Retry", "")) }
            @if job.status.is_terminal() && job.outcome_acknowledged_at.is_none() {
                (action_form(&viewer, &job.id, "acknowledge", "Acknowledge outcome", ""))
            }
        }
        table.facts {
            tr { th { "Status" } td #jobstatus { (view::status(job.status)) } }
            tr { th { "Progress" } td { progress max="100" value=(job.progress) {} " " (job.progress) "%" } }
            tr { th { "Info" } td.info { @match &job.info { Some(i) => (i), None => span.none { "—" } } } }
            tr { th { "Attempt" } td { (job.attempt) } }
            tr { th { "Trigger · mode" } td { (job.trigger) " · " (job.mode) } }
            @if let Some(source) = &job.source {
                tr { th { "Source" } td { @if job.kind == JobType::Sheet { a href={ "/console/sheets/" (source) } { code { (source) } } } @else { code { (source) } } } }
            }
            @if let Some(parent) = &job.parent_id {
                tr { th { "Parent" } td { a href={ "/console/jobs/" (parent) } { code { (parent) } } " part " (job.part_index.unwrap_or_default()) } }
            }
            @if !job.predecessor_ids.is_empty() {
                tr { th { "After" } td { @for p in &job.predecessor_ids { a href={ "/console/jobs/" (p) } { code { (p) } } " " } } }
            }
            tr { th { "Created" } td { (view::time(job.created_at)) } }
            tr { th { "Started" } td { (view::maybe_time(job.started_at)) } }
            tr { th { "Estimated completion" } td { (view::maybe_time(job.estimated_completion_at)) } }
            tr { th { "Ended" } td { (view::maybe_time(job.finished_at)) } }
            tr { th { "Outcome acknowledged" } td { (view::maybe_time(job.outcome_acknowledged_at)) } }
        }
        @if let Some(w) = &waiting {
            section.waiting {
                p #waiting { strong { "Waiting: " } (w.reason) }
                @if !w.deliveries.is_empty() {
                    table.deliveries {
                        thead { tr { th { "Delivery" } th { "Event" } th { "Subscriber" } th { "State" } th { "Attempts" } th { "Next attempt · lease ends" } th { "Last error" } } }
                        tbody {
                            @for d in &w.deliveries {
                                tr {
                                    td { (d.delivery_id) }
                                    td { code { (d.topic) } }
                                    td { code { (d.subscription_id) } }
                                    td { (d.state) }
                                    td { (d.attempts) }
                                    td { (view::maybe_time(d.due_at)) }
                                    td.info { @match &d.last_error { Some(e) => (e), None => span.none { "—" } } }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Outcome" } (view::json(&job.outcome))
        h2 { "Timeline" }
        table.timeline {
            thead { tr { th { "#" } th { "When" } th { "Event" } th { "Actor" } th { "Info" } } }
            tbody {
                @for e in &events {
                    tr {
                        td { (e.seq) }
                        td { (view::time(e.created_at)) }
                        td { code { (e.topic) } }
                        td { code { (e.context_str("actorId").unwrap_or("")) } }
                        td.info {
                            @if let Some(parts) = e.part_counts() {
                                (parts.completed) " completed, " (parts.failed) " failed, " (parts.canceled) " canceled of " (parts.total)
                            } @else if let Some(info) = e.payload.get("info").and_then(|i| i.as_str()) { (info) }
                        }
                    }
                }
            }
        }
        h2 { "Executions" }
        @if executions.is_empty() {
            p.none { "No plugin has run for this job's events yet." }
        } @else {
            @if shown > 0 { p.hint { "The newest " (EXECUTIONS_SHOWN) " of " (executions.len()) " executions." } }
            table.executions {
                thead { tr { th { "Started" } th { "Event" } th { "Plugin" } th { "Route" } th { "Attempt" } th { "Outcome" } th { "Duration" } th { "CPU" } th { "Peak memory" } } }
                @for x in executions.iter().skip(shown) {
                    tbody.execution #{ "execution-" (x.id) } {
                        tr {
                            td { (view::time(x.started_at)) }
                            td { code { (x.topic) } }
                            td { (x.plugin) " " code title=(x.plugin_version) { (view::short(&x.plugin_version)) } }
                            td { (x.route) }
                            td { (x.attempt) }
                            td { span class={ "outcome o-" (x.outcome) } { (x.outcome) } }
                            td { (view::micros(x.duration_us)) }
                            td { (view::micros(x.cpu_us)) }
                            td { (view::bytes(x.peak_memory)) }
                        }
                        tr.detail {
                            td colspan="9" {
                                @if let Some(error) = &x.error { p.error { strong { "Stopped: " } (error) } }
                                @let (logs, cut) = view::cut(&x.logs, LOG_CHARS);
                                details.logs open[x.outcome != crate::model::ExecutionOutcome::Ok] {
                                    summary { "Logs (" (view::bytes(x.logs.len() as u64)) ")" }
                                    @if x.logs.is_empty() { p.none { "Nothing was logged." } } @else { pre.logs { (logs) } }
                                    @if cut { p.hint { "Cut at " (LOG_CHARS) " characters; the store keeps what the host kept." } }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Input" } (view::json(&job.input))
        @if !job.part_data.is_null() { h2 { "Part data" } (view::json(&job.part_data)) }
    };
    if given(&params.fragment).is_some() {
        return Ok(live.into_response());
    }
    let statuses = if job.split_at.is_some() {
        env.part_statuses(&id).await.map_err(|e| engine_error(&viewer, e))?
    } else {
        Vec::new()
    };
    let _ = &state;
    let title = format!("{} {}", job.job_name(), job.id);
    let body = html! {
        // Every parent-to-be has the section: hidden until a split gives it parts, which the
        // page's script shows as soon as they exist (no reload).
        @if !job.is_part {
            section.parts hidden[job.split_at.is_none()] {
                h2 { "Parts" }
                (part_summary(&job, &statuses))
                p.legend {
                    @for s in ALL { span class={ "cell s-" (s) } {} " " (s) " " }
                    " · " a href={ "/console/jobs?parent=" (job.id) "&status=failed&parts=1" } { "failed parts" }
                    " · " a href={ "/console/jobs?parent=" (job.id) "&parts=1" } { "all parts" }
                }
                div #grid.grid
                    data-src={ "/console/jobs/" (job.id) "/grid" }
                    data-base={ "/console/jobs/" (job.id) "/parts/" }
                    data-statuses=(statuses.iter().map(|s| status_code(*s)).collect::<String>()) {}
            }
        }
        section #live data-live={ "/console/jobs/" (job.id) "?fragment=1" } data-job=(job.id) { (live) }
    };
    Ok(view::page(&viewer, &title, Nav::Jobs, body).into_response())
}

fn action_form(viewer: &Viewer, id: &str, action: &str, label: &str, confirm: &str) -> Markup {
    html! {
        form.inline method="post" action={ "/console/jobs/" (id) "/" (action) } data-confirm=[(!confirm.is_empty()).then_some(confirm)] {
            input type="hidden" name="csrf" value=(viewer.csrf);
            button type="submit" { (label) }
        }
    }
}

/// A parent's grid: its status and its parts' statuses, one letter each, with the counts.
pub async fn grid(viewer: Viewer, Path(id): Path<String>) -> Page {
    let env = viewer.env()?;
    let (job, statuses) =
        tokio::try_join!(env.job(&id), env.part_statuses(&id)).map_err(|e| engine_error(&viewer, e))?;
    let (counts, open) = part_counts(&statuses);
    let body = json!({
        "status": job.status,
        "progress": job.progress,
        "statuses": statuses.iter().map(|s| status_code(*s)).collect::<String>(),
        "counts": counts,
        "open": open,
        "partsCompletedAt": job.parts_completed_at.map(view::utc),
    });
    Ok(([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response())
}

/// Part `index` of a job: its page.
pub async fn part(viewer: Viewer, Path((id, index)): Path<(String, u32)>) -> Page {
    let env = viewer.env()?;
    let query = JobQuery { parent: Some(id.clone()), ..JobQuery::default() };
    let found = env.find_jobs(query, u64::from(index), 1).await.map_err(|e| engine_error(&viewer, e))?;
    match found.first() {
        Some(part) => Ok(Redirect::to(&format!("/console/jobs/{}", part.id)).into_response()),
        None => Err(error_page(&viewer, StatusCode::NOT_FOUND, "Not found", format!("job {id} has no part {index}"))),
    }
}

/// Cancel, retry or acknowledge a job's outcome.
pub async fn job_action(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Page {
    viewer.check_csrf(&form.csrf)?;
    let env = viewer.env()?;
    let (result, did) = match action.as_str() {
        "cancel" => (env.cancel(&id, Some("canceled from the console".into())).await, "Canceled"),
        "retry" => (env.retry(&id).await, "Retried"),
        "acknowledge" => (env.acknowledge_outcome(&id).await, "Acknowledged the outcome of"),
        _ => return Err(error_page(&viewer, StatusCode::NOT_FOUND, "Not found", format!("no action `{action}`"))),
    };
    let to = format!("/console/jobs/{id}");
    Ok(done(
        &state,
        &viewer,
        &to,
        result.map(|j| format!("{did} {}; it is {} now.", j.id, j.status)).map_err(|e| e.to_string()),
    ))
}

// ---- dead letters ----

/// Deliveries that used up their attempts, with a retry button each.
pub async fn dead_letters(viewer: Viewer) -> Page {
    let env = viewer.env()?;
    let dead = env.dead_letters().await.map_err(|e| engine_error(&viewer, e))?;
    let body = html! {
        @if dead.is_empty() {
            p.none { "No dead letters: every event reached its listeners." }
        } @else {
            table.dead {
                thead { tr { th { "Delivery" } th { "Event" } th { "Job" } th { "Listener" } th { "Attempts" } th { "Last error" } th {} } }
                tbody {
                    @for d in &dead {
                        tr {
                            td { (d.delivery_id) }
                            td { code { (d.event.topic) } " " (view::time(d.event.created_at)) }
                            td { @if let Some(job) = d.event.job_id() { a href={ "/console/jobs/" (job) } { code { (job) } } } }
                            td { code { (d.subscription_id) } }
                            td { (d.attempts) }
                            td.info { (d.last_error) }
                            td {
                                form.inline method="post" action={ "/console/dead-letters/" (d.delivery_id) "/retry" } {
                                    input type="hidden" name="csrf" value=(viewer.csrf);
                                    button type="submit" { "Retry" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(view::page(&viewer, "Dead letters", Nav::DeadLetters, body).into_response())
}

/// Gives a dead letter a new round of attempts.
pub async fn retry_dead_letter(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    Path(id): Path<i64>,
    Form(form): Form<CsrfForm>,
) -> Page {
    viewer.check_csrf(&form.csrf)?;
    let result = viewer.env()?.redeliver(id).await;
    Ok(done(
        &state,
        &viewer,
        "/console/dead-letters",
        result.map(|()| format!("Delivery {id} is due again.")).map_err(|e| e.to_string()),
    ))
}

// ---- sheets ----

/// Paging.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    page: Option<u32>,
}

/// The environment's sheets with their counts.
pub async fn sheets(viewer: Viewer, Query(q): Query<PageQuery>) -> Page {
    let env = viewer.env()?;
    let page = q.page.unwrap_or(1).max(1);
    let sheets = env
        .sheets(u64::from(page - 1) * u64::from(SHEETS_PER_PAGE), SHEETS_PER_PAGE + 1)
        .await
        .map_err(|e| engine_error(&viewer, e))?;
    let mut rows = Vec::new();
    for s in sheets.iter().take(SHEETS_PER_PAGE as usize) {
        rows.push((s, env.record_counts(&s.id).await.map_err(|e| engine_error(&viewer, e))?));
    }
    let body = html! {
        @if rows.is_empty() { p.none { "No sheets yet." } } @else {
            table.sheets {
                thead { tr { th { "Sheet" } th { "Name" } th { "Records" } th { "Valid" } th { "With errors" } th { "Created" } } }
                tbody {
                    @for (s, c) in &rows {
                        tr {
                            td { a href={ "/console/sheets/" (s.id) } { code { (s.id) } } }
                            td { (s.name) }
                            td { (c.total) } td { (c.valid) } td { (c.error) }
                            td { (view::time(s.created_at)) }
                        }
                    }
                }
            }
        }
        p.pager {
            @if page > 1 { a href={ "/console/sheets?page=" (page - 1) } { "← newer" } " " }
            "page " (page)
            @if sheets.len() > SHEETS_PER_PAGE as usize { " " a href={ "/console/sheets?page=" (page + 1) } { "older →" } }
        }
    };
    Ok(view::page(&viewer, "Sheets", Nav::Sheets, body).into_response())
}

/// A sheet: its counts and a page of its records, error cells marked with their messages.
pub async fn sheet(viewer: Viewer, Path(id): Path<String>, Query(q): Query<PageQuery>) -> Page {
    let env = viewer.env()?;
    let page = q.page.unwrap_or(1).max(1);
    let (sheet, counts, records) =
        tokio::try_join!(env.sheet(&id), env.record_counts(&id), env.records(&id, RECORDS_PER_PAGE, page))
            .map_err(|e| engine_error(&viewer, e))?;
    let fields: BTreeSet<&str> = records.records.iter().flat_map(|r| r.values.keys().map(String::as_str)).collect();
    let pages = counts.total.div_ceil(u64::from(RECORDS_PER_PAGE)).max(1);
    let body = html! {
        p.counts { "records " strong { (counts.total) } " · valid " strong { (counts.valid) } " · with errors " strong { (counts.error) } }
        @if records.records.is_empty() { p.none { "No records on this page." } } @else {
            table.records {
                thead { tr { th { "Record" } @for f in &fields { th { (f) } } th { "Messages" } } }
                tbody {
                    @for r in &records.records {
                        tr class=[(!r.valid).then_some("invalid")] {
                            td { code { (r.id) } }
                            @for f in &fields {
                                @match r.values.get(*f) {
                                    Some(cell) => td class=[(!cell.valid).then_some("err")] {
                                        @match &cell.value { serde_json::Value::String(s) => (s), serde_json::Value::Null => "", v => (v.to_string()) }
                                        @for m in &cell.messages { br; small class={ "msg m-" (m.kind) } { (m.message) } }
                                    },
                                    None => td {},
                                }
                            }
                            td { @for m in &r.messages { small class={ "msg m-" (m.kind) } { (m.message) } br; } }
                        }
                    }
                }
            }
        }
        p.pager {
            @if page > 1 { a href={ "/console/sheets/" (id) "?page=" (page - 1) } { "← previous" } " " }
            "page " (page) " of " (pages)
            @if u64::from(page) < pages { " " a href={ "/console/sheets/" (id) "?page=" (page + 1) } { "next →" } }
        }
    };
    Ok(view::page(&viewer, &format!("Sheet {} {}", sheet.name, sheet.id), Nav::Sheets, body).into_response())
}

// ---- plugins ----

/// The environment's plugins: versions, routes, load errors; deploy, roll back, delete.
pub async fn plugins(State(state): State<ConsoleState>, viewer: Viewer) -> Page {
    let env = viewer.env()?;
    let Some(registry) = state.api.plugins.as_deref() else {
        return Err(error_page(&viewer, StatusCode::NOT_FOUND, "Plugins", "This host runs no plugins.".into()));
    };
    let plugin_error = |e: crate::plugins::PluginError| {
        error_page(&viewer, StatusCode::INTERNAL_SERVER_ERROR, "Plugins", e.to_string())
    };
    let (list, errors) =
        tokio::try_join!(registry.list(env.id()), registry.load_errors(env.id())).map_err(plugin_error)?;
    let body = html! {
        section.deploy {
            h2 { "Deploy" }
            p.hint { "A component (.wasm) built against jobhost's WIT. It is checked before it is swapped in: one that does not load changes nothing. Deliveries in flight finish on the version they started with." }
            form #deploy method="post" {
                label { "Name " input name="name" required pattern="[A-Za-z0-9_-]{1,64}" placeholder="submit-large-sheet"; }
                label { "Component " input type="file" name="component" accept=".wasm,application/wasm" required; }
                button type="submit" { "Deploy" }
                output #deploy-result {}
            }
        }
        @if !errors.is_empty() {
            h2 { "Did not load" }
            ul.errors { @for e in &errors { li { strong { (e.name) } " " @if let Some(v) = &e.version { code { (view::short(v)) } " " } (e.reason) } } }
        }
        h2 { "Loaded" }
        @if list.is_empty() { p.none { "No plugins are loaded in this environment." } }
        @for p in &list {
            section.plugin #{ "plugin-" (p.name) } {
                h3 { (p.name) " " code.version title=(p.version) { (view::short(&p.version)) } }
                table.routes {
                    thead { tr { th { "Route" } th { "Topic" } th { "Filter" } } }
                    tbody { @for (i, r) in p.routes.iter().enumerate() { tr { td { (i) } td { code { (r.topic) } } td { code { (r.filter) } } } } }
                }
                @let others: Vec<&String> = p.kept.iter().filter(|k| **k != p.version).collect();
                div.actions {
                    @if others.is_empty() { span.hint { "No other kept version to roll back to." } } @else {
                        form.inline method="post" action={ "/console/plugins/" (p.name) "/rollback" } {
                            input type="hidden" name="csrf" value=(viewer.csrf);
                            label { "Roll back to " select name="to" { @for k in &others { option value=(k) { (view::short(k)) } } } }
                            " " button type="submit" { "Roll back" }
                        }
                    }
                    form.inline method="post" action={ "/console/plugins/" (p.name) "/delete" } data-confirm={ "Unload and delete plugin " (p.name) "? Its events wait for a plugin with the same routes." } {
                        input type="hidden" name="csrf" value=(viewer.csrf);
                        button.danger type="submit" { "Delete" }
                    }
                }
                p.hint { "Kept versions (newest first): " @for k in &p.kept { code title=(k) { (view::short(k)) } " " } }
            }
        }
    };
    Ok(view::page(&viewer, "Plugins", Nav::Plugins, body).into_response())
}

fn reload_words(event: &crate::reload::ReloadEvent) -> Result<String, String> {
    use crate::reload::ReloadEvent::*;
    match event {
        Loaded { name, version, previous } => Ok(match previous {
            Some(p) => format!("Plugin {name} is version {} now (was {}).", view::short(version), view::short(p)),
            None => format!("Plugin {name} is loaded, version {}.", view::short(version)),
        }),
        Unchanged { name, version } => {
            Ok(format!("Plugin {name} already is version {}: nothing changed.", view::short(version)))
        }
        Failed { name, reason, .. } => Err(format!("Plugin {name} did not change: {reason}")),
        Removed { name, version } => Ok(format!(
            "Plugin {name} (version {}) is unloaded and deleted; its kept versions stay for a rollback.",
            view::short(version)
        )),
    }
}

/// Deploys the request body as plugin `name` (the page's script sends the file with the CSRF
/// token in `X-CSRF-Token`); answers `{ok, message}`.
pub async fn deploy_plugin(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Page {
    viewer.check_csrf(headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or(""))?;
    let env = viewer.env()?;
    let answer = |status: StatusCode, ok: bool, message: String| {
        (status, [(header::CONTENT_TYPE, "application/json")], json!({ "ok": ok, "message": message }).to_string())
            .into_response()
    };
    let Some(registry) = state.api.plugins.as_deref() else {
        return Ok(answer(StatusCode::NOT_FOUND, false, "This host runs no plugins.".into()));
    };
    if body.is_empty() {
        return Ok(answer(StatusCode::BAD_REQUEST, false, "Choose a .wasm component to deploy.".into()));
    }
    Ok(match registry.deploy(env.id(), &name, body.to_vec()).await {
        Ok(event) => match reload_words(&event) {
            Ok(text) => {
                state.sessions.flash(&viewer.session, false, text.clone());
                answer(StatusCode::OK, true, text)
            }
            Err(text) => answer(StatusCode::UNPROCESSABLE_ENTITY, false, text),
        },
        Err(e) => {
            let message = format!("Not deployed: {e}");
            answer(crate::error::ApiError::from(e).status, false, message)
        }
    })
}

/// The rollback form.
#[derive(Debug, Deserialize)]
pub struct RollbackForm {
    csrf: String,
    to: Option<String>,
}

/// Runs a rollback or delete of a plugin and goes back to the plugins page with what it did.
async fn plugin_action<F, Fut>(state: &ConsoleState, viewer: &Viewer, csrf: &str, refused: &str, act: F) -> Page
where
    F: FnOnce(std::sync::Arc<crate::plugins::Plugins>, String) -> Fut,
    Fut: std::future::Future<Output = Result<crate::reload::ReloadEvent, crate::plugins::PluginError>>,
{
    viewer.check_csrf(csrf)?;
    let env = viewer.env()?.id().to_owned();
    let Some(registry) = state.api.plugins.clone() else {
        return Ok(Redirect::to("/console/plugins").into_response());
    };
    let words = match act(registry, env).await {
        Ok(event) => reload_words(&event),
        Err(e) => Err(format!("{refused}: {e}")),
    };
    Ok(done(state, viewer, "/console/plugins", words))
}

/// Puts a kept version of a plugin back.
pub async fn rollback_plugin(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    Path(name): Path<String>,
    Form(form): Form<RollbackForm>,
) -> Page {
    let to = given(&form.to).map(str::to_owned);
    plugin_action(&state, &viewer, &form.csrf, "Not rolled back", |registry, env| async move {
        registry.rollback(&env, &name, to.as_deref()).await
    })
    .await
}

/// Unloads and deletes a plugin.
pub async fn delete_plugin(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    Path(name): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Page {
    plugin_action(&state, &viewer, &form.csrf, "Not deleted", |registry, env| async move {
        registry.delete(&env, &name).await
    })
    .await
}

// ---- admin ----

fn admin_only(viewer: &Viewer) -> Result<(), Refused> {
    if viewer.is_admin() {
        Ok(())
    } else {
        Err(error_page(
            viewer,
            StatusCode::FORBIDDEN,
            "Admin only",
            "Environments and tokens need the admin token: sign in with it.".into(),
        ))
    }
}

async fn admin_page(state: &ConsoleState, viewer: &Viewer, created: Option<(&str, &str, &str)>) -> Page {
    let engine = &state.api.engine;
    let envs = engine.environments().await.map_err(|e| engine_error(viewer, e))?;
    let mut tokens = Vec::new();
    for e in &envs {
        tokens.push(engine.tokens(&e.id).await.map_err(|err| engine_error(viewer, err))?);
    }
    let body = html! {
        @if let Some((env, name, token)) = created {
            div.created role="status" {
                p { "Token " strong { (name) } " of environment " code { (env) } " — copy it now, it is not shown again:" }
                pre.token #new-token { (token) }
            }
        }
        section {
            h2 { "New environment" }
            form.inline method="post" action="/console/admin/environments" {
                input type="hidden" name="csrf" value=(viewer.csrf);
                label { "Name " input name="name" required maxlength="200"; }
                " " button type="submit" { "Create" }
            }
        }
        @for (e, toks) in envs.iter().zip(&tokens) {
            section.environment #{ "env-" (e.id) } {
                h2 { (e.name) " " code { (e.id) } }
                p.hint { "Created " (view::time(e.created_at)) }
                @if toks.is_empty() { p.none { "No tokens." } } @else {
                    table.tokens {
                        thead { tr { th { "Token" } th { "Name" } th { "Created" } th {} } }
                        tbody {
                            @for t in toks {
                                tr {
                                    td { code { (t.id) } }
                                    td { (t.name) }
                                    td { (view::time(t.created_at)) }
                                    td {
                                        form.inline method="post" action={ "/console/admin/environments/" (e.id) "/tokens/" (t.id) "/revoke" }
                                            data-confirm={ "Revoke token " (t.name) "? Its API calls and console sessions stop at once." } {
                                            input type="hidden" name="csrf" value=(viewer.csrf);
                                            button.danger type="submit" { "Revoke" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                form.inline method="post" action={ "/console/admin/environments/" (e.id) "/tokens" } {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    label { "New token named " input name="name" required maxlength="200"; }
                    " " button type="submit" { "Create token" }
                }
            }
        }
    };
    Ok(view::page(viewer, "Environments & tokens", Nav::Admin, body).into_response())
}

/// Environments and their tokens (admin).
pub async fn admin(State(state): State<ConsoleState>, viewer: Viewer) -> Page {
    admin_only(&viewer)?;
    admin_page(&state, &viewer, None).await
}

/// A name form.
#[derive(Debug, Deserialize)]
pub struct NameForm {
    csrf: String,
    name: String,
}

fn check_name(name: &str, what: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.chars().count() > 200 {
        Err(format!("{what} needs a name of 1 to 200 characters, not all blank."))
    } else {
        Ok(())
    }
}

/// Creates an environment (admin).
pub async fn create_environment(State(state): State<ConsoleState>, viewer: Viewer, Form(form): Form<NameForm>) -> Page {
    viewer.check_csrf(&form.csrf)?;
    admin_only(&viewer)?;
    let result = match check_name(&form.name, "An environment") {
        Ok(()) => state
            .api
            .engine
            .create_environment(&form.name)
            .await
            .map(|e| format!("Created environment {} ({}).", e.name, e.id))
            .map_err(|e| e.to_string()),
        Err(text) => Err(text),
    };
    Ok(done(&state, &viewer, "/console/admin", result))
}

/// Creates a token (admin): the page shows it this once.
pub async fn create_token(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    Path(env): Path<String>,
    Form(form): Form<NameForm>,
) -> Page {
    viewer.check_csrf(&form.csrf)?;
    admin_only(&viewer)?;
    if let Err(text) = check_name(&form.name, "A token") {
        return Ok(done(&state, &viewer, "/console/admin", Err(text)));
    }
    match state.api.engine.create_token(&env, &form.name).await {
        Ok((record, token)) => admin_page(&state, &viewer, Some((&env, &record.name, &token))).await,
        Err(e) => Ok(done(&state, &viewer, "/console/admin", Err(e.to_string()))),
    }
}

/// Revokes a token (admin): its sessions end with it.
pub async fn revoke_token(
    State(state): State<ConsoleState>,
    viewer: Viewer,
    Path((env, token)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Page {
    viewer.check_csrf(&form.csrf)?;
    admin_only(&viewer)?;
    let result = match state.api.engine.revoke_token(&env, &token).await {
        Ok(true) => Ok(format!("Revoked token {token}: its API calls and console sessions are refused from now on.")),
        Ok(false) => Err(format!("Environment {env} has no token {token}.")),
        Err(e) => Err(e.to_string()),
    };
    Ok(done(&state, &viewer, "/console/admin", result))
}
