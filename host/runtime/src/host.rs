//! The state of one instance (one `Store`) and the host side of the imports.
//!
//! Every import goes through the instance's [`Env`]: the engine API scoped to the
//! environment of the event being handled, acting as `plugin:<name>`. An id from another
//! environment is therefore answered `not-found` by the engine itself.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde_json::Value;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::jobhost::plugin::{completion, config, jobs, log, records, sheets, types as wit};
use super::convert;
use super::limits::Manifest;
use crate::Env;
use crate::model::{Ack, JobType, NewJob, NewRecord, Outcome, Split, SplitParts, Trigger};

/// Logs of one delivery, capped; shared by stdout, stderr and the `log` import.
#[derive(Debug)]
struct LogBuf {
    text: String,
    limit: usize,
    truncated: bool,
    /// Secrets this delivery read, as (name, value): their values are written as
    /// `[secret NAME]` in what the host keeps of the delivery (logs and error).
    secrets: Vec<(String, String)>,
}

/// Secrets shorter than this are not masked: masking a two-letter value would mangle every
/// log line, and it protects nothing.
const MASKED_MIN_BYTES: usize = 4;

impl LogBuf {
    fn mask<'a>(&self, s: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out = std::borrow::Cow::Borrowed(s);
        for (name, value) in &self.secrets {
            if out.contains(value.as_str()) {
                out = std::borrow::Cow::Owned(out.replace(value.as_str(), &format!("[secret {name}]")));
            }
        }
        out
    }

    fn push(&mut self, s: &str) {
        if self.truncated {
            return;
        }
        let s = &*self.mask(s);
        let room = self.limit.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
        } else {
            self.text.push_str(&s[..s.floor_char_boundary(room)]);
            self.text.push_str(&format!("\n[log truncated at {} bytes]\n", self.limit));
            self.truncated = true;
        }
    }
}

/// stdout/stderr of the guest: always accepts, keeps what fits.
#[derive(Clone)]
struct Capture(Arc<Mutex<LogBuf>>);

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if let Ok(mut log) = self.0.lock() {
            log.push(&String::from_utf8_lossy(buf));
        }
        // Accept everything: a guest whose output is cut must not fail to print.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Memory and table limits of one instance, counting every memory and table together.
#[derive(Debug)]
pub(super) struct Limiter {
    memory_limit: usize,
    memory_total: usize,
    memory_peak: usize,
    memory_refused: bool,
    table_limit: usize,
    table_total: usize,
    table_refused: bool,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.memory_total - current.min(self.memory_total) + desired;
        if total > self.memory_limit {
            self.memory_refused = true;
            return Ok(false);
        }
        self.memory_total = total;
        self.memory_peak = self.memory_peak.max(total);
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let total = self.table_total - current.min(self.table_total) + desired;
        if total > self.table_limit {
            self.table_refused = true;
            return Ok(false);
        }
        self.table_total = total;
        Ok(true)
    }
}

/// Time spent running guest code.
///
/// Epoch ticks count wall time: a guest waiting for a worker thread (because another guest is
/// busy on it) or blocked in a host call would be charged for it. So the meter marks the
/// moments the guest starts running wasm (a call, a return from a host call, a resume after a
/// yield) and stops (a return, a host call, an epoch check), and charges only the spans in
/// between, during which the guest holds its thread. The clock is the monotonic one (vDSO, a
/// few ns): the thread CPU clock is a system call, and at ~10 boundary crossings per
/// delivery it doubled the cost of a trivial dispatch. The difference is only time the OS
/// takes the thread away mid-span, which is charged; on a machine with more runnable threads
/// than cores that makes the budget stricter, never looser.
pub(super) struct CpuMeter {
    budget_ns: u64,
    used_ns: u64,
    /// The clock at the last entry into wasm; `NOT_IN_WASM` otherwise. Shared with the
    /// future that resumes the guest after a yield.
    mark: Arc<AtomicU64>,
    exceeded: bool,
    /// Depth of wasm calls from the host. Only the outermost call and the host calls it
    /// makes move the meter: wasm called from inside a host call (the guest's allocator, while
    /// a result is lowered into guest memory) would cost two clock reads per string of a page.
    depth: u32,
    in_host: bool,
}

const NOT_IN_WASM: u64 = u64::MAX;

/// Nanoseconds on the monotonic clock since the first call.
pub(super) fn running_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}

impl CpuMeter {
    /// A call hook: keeps the meter running exactly while top-level guest code runs.
    pub(super) fn hook(&mut self, hook: wasmtime::CallHook) {
        use wasmtime::CallHook::*;
        match hook {
            CallingWasm => {
                self.depth += 1;
                if self.depth == 1 {
                    self.enter();
                }
            }
            ReturningFromWasm => {
                if self.depth == 1 {
                    self.leave();
                }
                self.depth = self.depth.saturating_sub(1);
            }
            CallingHost if self.depth == 1 && !self.in_host => {
                self.in_host = true;
                self.leave();
            }
            ReturningFromHost if self.depth == 1 && self.in_host => {
                self.in_host = false;
                self.enter();
            }
            _ => {}
        }
    }

    pub(super) fn enter(&self) {
        self.mark.store(running_ns(), Ordering::Relaxed);
    }

    pub(super) fn leave(&mut self) {
        let mark = self.mark.swap(NOT_IN_WASM, Ordering::Relaxed);
        if mark != NOT_IN_WASM {
            self.used_ns += running_ns().saturating_sub(mark);
        }
    }

    /// Called at every epoch check: charges the slice that just ran, and says whether the
    /// guest may go on.
    pub(super) fn check(&mut self) -> bool {
        self.leave();
        if self.used_ns > self.budget_ns {
            self.exceeded = true;
        }
        !self.exceeded
    }

    /// A future that marks the guest's re-entry into wasm when it resumes after a yield.
    pub(super) fn resume_mark(&self) -> Arc<AtomicU64> {
        self.mark.clone()
    }

    pub(super) fn used(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.used_ns)
    }
}

/// The jobs a delivery may move (ack, complete, fail, cancel, split): the event's job, its
/// parent, its parts, and jobs the plugin created in this delivery — unless the manifest
/// grants `any_job`.
#[derive(Debug, Default)]
struct JobScope {
    job: Option<String>,
    parent: Option<String>,
    created: Vec<String>,
}

/// Everything one instance owns: its WASI context (nothing but what the manifest grants), its
/// limits, its logs, and the environment API it acts through.
pub struct HostState {
    wasi: WasiCtx,
    http: wasmtime_wasi_http::WasiHttpCtx,
    /// The `wasi:http` hooks: grants, address checks, limits, the record of requests.
    outbound: crate::outbound::Outbound,
    table: ResourceTable,
    limiter: Limiter,
    cpu: CpuMeter,
    logs: Arc<Mutex<LogBuf>>,
    /// `None` while reading subscriptions at load: no host calls then.
    env: Option<Env>,
    plugin: Arc<str>,
    event_id: Arc<str>,
    manifest: Arc<Manifest>,
    scope: JobScope,
    records_written: u64,
    /// Jobs created in this delivery (`create`, and each part of a `split`).
    jobs_created: u64,
    /// Events written by this delivery's calls, charged by the engine inside each write.
    events: Arc<jobhost_engine::EventBudget>,
    /// Whether a host call was refused for a per-delivery budget (jobs or events): a failed
    /// delivery is then not retried, since a retry would only repeat the storm.
    over_budget: bool,
    /// Jobs this delivery acked and did not end, in call order: checked when the handler
    /// returns, so an execution record can say a job was left executing.
    acked_open: Vec<String>,
    /// The first limit or rule a host call refused, for the execution record.
    refused: Option<String>,
    /// `completion`: the handler's outcome comes by `settle` (`Some(None)`: deferred, not
    /// yet settled; `Some(Some(outcome))`: settled).
    deferred: Option<Option<Result<(), String>>>,
    /// The pages after the one the guest was last given, in order, being read meanwhile.
    read_ahead: std::collections::VecDeque<ReadAhead>,
    /// Host calls of this delivery that wrote to the store (job moves, record writes): a page
    /// read ahead before the latest of them is stale for this guest.
    writes: u64,
    /// The last page the guest asked for (sheet, size, number) and the delivery's effects
    /// then: reading ahead starts only when the guest asks for the page after it with no
    /// effect in between, i.e. is reading a sheet through.
    last_page: Option<(String, u32, u32, u64)>,
    pages: Arc<PageCounts>,
}

/// Record pages given to guests, by how they were read, and pages read ahead for nothing.
#[derive(Debug, Default)]
pub(super) struct PageCounts {
    asked: AtomicU64,
    ahead: AtomicU64,
    discarded: AtomicU64,
}

impl PageCounts {
    pub(super) fn get(&self) -> PageStats {
        PageStats {
            asked: self.asked.load(Ordering::Relaxed),
            ahead: self.ahead.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
        }
    }
}

/// Record pages since start (see [`crate::RuntimeStats::pages`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    /// Pages given to guests, read when the guest asked.
    pub asked: u64,
    /// Pages given to guests, read ahead while the guest worked on the page before.
    pub ahead: u64,
    /// Pages read ahead that no guest asked for (its next call was another one, or the
    /// delivery ended): store reads spent for nothing.
    pub discarded: u64,
}

/// A page read ahead while the guest works on an earlier one, so the host's half of paging
/// (the store read and the conversion) runs on the other cores beside the guest's half.
///
/// It is used only when the guest asks for exactly that page next and made no call in between
/// that writes or reaches outside (a job move, a record write, an outbound request): so a
/// guest always sees its own writes and anything a call of its could have caused. What it can
/// miss is only a write by someone else in the short span between reading ahead and asking,
/// which is the page it would have got had it asked that much sooner. Counting effects, not
/// host calls, matters: wasmtime's call hook also fires for libcalls (an epoch check, a
/// `memory.grow`), which on a loaded machine made a page read ahead look stale.
struct ReadAhead {
    sheet_id: String,
    page_size: u32,
    page_number: u32,
    /// The delivery's effects (`HostState::effects`) when this was started.
    effects: u64,
    /// The page in the shape the call asked for (`wit::RecordPage`, `wit::PackedPage` or
    /// `wit::PageBuffers`); a call that asks for another shape reads its page again.
    task: tokio::task::JoinHandle<crate::error::Result<Box<dyn std::any::Any + Send>>>,
    /// Counts the page as discarded when it is dropped unused.
    counts: Arc<PageCounts>,
    used: bool,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.task.abort();
        if !self.used {
            self.counts.discarded.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl HostState {
    fn new(
        manifest: Arc<Manifest>,
        env: Option<Env>,
        plugin: &str,
        event_id: &str,
        shared: Option<crate::outbound::Shared>,
    ) -> wasmtime::Result<Self> {
        let limits = &manifest.limits;
        let logs = Arc::new(Mutex::new(LogBuf {
            text: String::new(),
            limit: limits.max_log_bytes,
            truncated: false,
            secrets: Vec::new(),
        }));
        // The builder starts with nothing: no preopened directories, no environment variables,
        // no arguments, no network; stdin is empty. Only what the manifest grants is added.
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(Capture(logs.clone())).stderr(Capture(logs.clone()));
        if env.is_some() {
            for (k, v) in &manifest.grants.env {
                wasi.env(k, v);
            }
            for d in &manifest.grants.dirs {
                wasi.preopened_dir(&d.host, &d.guest, wasmtime_wasi::FsPerms::ReadOnly).map_err(|e| {
                    wasmtime::Error::msg(format!("cannot open the granted directory {}: {e}", d.host.display()))
                })?;
            }
        }
        let note_logs = logs.clone();
        let note: crate::outbound::Note = Arc::new(move |line: &str| {
            if let Ok(mut l) = note_logs.lock() {
                l.push(&format!("{line}\n"));
            }
        });
        let outbound = crate::outbound::Outbound::new(
            Arc::from(plugin),
            manifest.outbound.clone(),
            limits.http.clone(),
            shared.filter(|_| env.is_some()),
            note,
        );
        Ok(Self {
            wasi: wasi.build(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            outbound,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_limit: limits.memory,
                memory_total: 0,
                memory_peak: 0,
                memory_refused: false,
                table_limit: limits.table_elements,
                table_total: 0,
                table_refused: false,
            },
            cpu: CpuMeter {
                budget_ns: limits.cpu.as_nanos() as u64,
                used_ns: 0,
                mark: Arc::new(AtomicU64::new(NOT_IN_WASM)),
                exceeded: false,
                depth: 0,
                in_host: false,
            },
            logs,
            env,
            plugin: Arc::from(plugin),
            event_id: Arc::from(event_id),
            scope: JobScope::default(),
            records_written: 0,
            jobs_created: 0,
            events: Arc::new(jobhost_engine::EventBudget::new(limits.max_events_per_delivery)),
            over_budget: false,
            acked_open: Vec::new(),
            refused: None,
            deferred: None,
            read_ahead: Default::default(),
            writes: 0,
            last_page: None,
            pages: Arc::default(),
            manifest,
        })
    }

    /// Counts the pages this instance gives its guest into the runtime's `counts`.
    pub(super) fn counting_pages(mut self, counts: Arc<PageCounts>) -> Self {
        self.pages = counts;
        self
    }

    pub(super) fn for_load(manifest: Arc<Manifest>) -> Self {
        // Nothing is granted at load, so nothing can fail.
        Self::new(manifest, None, "loading", "-", None).unwrap_or_else(|_| unreachable!("no grants at load"))
    }

    pub(super) fn for_event(
        manifest: Arc<Manifest>,
        env: Env,
        plugin: &str,
        event: &crate::model::Event,
        shared: crate::outbound::Shared,
    ) -> wasmtime::Result<Self> {
        let env = env.as_actor(format!("plugin:{plugin}"));
        let mut state = Self::new(manifest, Some(env), plugin, &event.id, Some(shared))?;
        state.env = state.env.take().map(|e| e.with_event_budget(state.events.clone()));
        state.scope.job = event.job_id().map(str::to_owned);
        state.scope.parent = event.payload.get("parentId").and_then(Value::as_str).map(str::to_owned);
        Ok(state)
    }

    /// The limit or rule a host call refused first, if any.
    pub(super) fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Whether a host call was refused for a per-delivery budget of jobs or events.
    pub(super) fn over_budget(&self) -> bool {
        self.over_budget
    }

    /// An engine error as the guest's error. A limit the engine enforces (the delivery's
    /// event budget, the loop guard) is noted and attributed like the host's own refusals.
    fn engine_error(&mut self, e: crate::error::Error) -> wit::Error {
        let crate::error::Error::Limit(why) = &e else { return convert::error(e) };
        self.over_budget |= self.events.refused();
        self.note_refusal("limit", why, &e.to_string());
        convert::error(e)
    }

    /// Charges `n` new jobs to the delivery's budget, before the call that creates them.
    fn charge_jobs(&mut self, n: u64) -> R<()> {
        let max = self.manifest.limits.max_jobs_per_delivery;
        if self.jobs_created.saturating_add(n) > max {
            self.over_budget = true;
            let done = self.jobs_created;
            return Err(self.limit(format!(
                "{done} jobs created in this delivery and {n} more asked; the plugin's max_jobs_per_delivery is {max}"
            )));
        }
        Ok(())
    }

    /// `completion`: `None` when the handler did not defer; `Some(None)` when it deferred
    /// and never settled; otherwise how it settled.
    pub(super) fn deferred(&self) -> Option<&Option<Result<(), String>>> {
        self.deferred.as_ref()
    }

    /// The table limit, when a growth past it was refused.
    pub(super) fn table_exceeded(&self) -> Option<usize> {
        self.limiter.table_refused.then_some(self.limiter.table_limit)
    }

    /// Notes a refusal in the delivery's log (the guest may swallow the error; the record
    /// still says what happened) and returns it as the guest's error.
    fn refuse(&mut self, kind: wit::ErrorKind, message: String) -> wit::Error {
        let tag = if kind == wit::ErrorKind::Limit { "limit" } else { "denied" };
        self.note_refusal(tag, &message, &message);
        wit::Error { kind, message, job_status: None }
    }

    /// Logs `[jobhost] {tag}: {logged}` and keeps `recorded` as the first refusal.
    fn note_refusal(&mut self, tag: &str, logged: &str, recorded: &str) {
        if let Ok(mut logs) = self.logs.lock() {
            logs.push(&format!("[jobhost] {tag}: {logged}\n"));
        }
        self.refused.get_or_insert_with(|| recorded.to_owned());
    }

    fn limit(&mut self, message: String) -> wit::Error {
        self.refuse(wit::ErrorKind::Limit, message)
    }

    /// Refuses JSON text (outcome, info, input, partData) larger than `max_outcome_bytes`.
    fn check_size(&mut self, what: &str, text: Option<&str>) -> R<()> {
        let max = self.manifest.limits.max_outcome_bytes;
        match text {
            Some(t) if t.len() > max => {
                Err(self.limit(format!("{what} of {} bytes is over the plugin's max_outcome_bytes ({max})", t.len())))
            }
            _ => Ok(()),
        }
    }

    /// Charges `n` records to the delivery's write budget.
    fn charge_records(&mut self, n: usize) -> R<()> {
        let limits = &self.manifest.limits;
        let (per_write, per_delivery) = (limits.max_records_per_write, limits.max_records_per_delivery);
        if n > per_write {
            return Err(
                self.limit(format!("{n} records in one call; the plugin's max_records_per_write is {per_write}"))
            );
        }
        if self.records_written + n as u64 > per_delivery {
            let done = self.records_written;
            return Err(self.limit(format!(
                "{done} records written in this delivery and {n} more asked; the plugin's max_records_per_delivery is {per_delivery}"
            )));
        }
        self.records_written += n as u64;
        Ok(())
    }

    /// Checks that this delivery may move job `id` (see [`JobScope`]).
    async fn may_move(&mut self, id: &str) -> R<()> {
        let scope = &self.scope;
        if self.manifest.grants.any_job
            || scope.job.as_deref() == Some(id)
            || scope.parent.as_deref() == Some(id)
            || scope.created.iter().any(|c| c == id)
        {
            return Ok(());
        }
        // Not-found for another environment's id comes first: nothing leaks.
        let job = self.env()?.job(id).await.map_err(convert::error)?;
        if job.parent_id.is_some() && job.parent_id == self.scope.job {
            return Ok(());
        }
        let about = match &self.scope.job {
            Some(j) => format!("the event's job {j}, its parent, its parts"),
            None => "jobs of the event (it has none)".to_owned(),
        };
        Err(self.refuse(
            wit::ErrorKind::Denied,
            format!(
                "job {id} is not one this delivery may move: a plugin acts on {about} and jobs it created in this \
                 delivery (grant `any_job` in its manifest to lift this)"
            ),
        ))
    }

    pub(super) fn limiter(&mut self) -> &mut Limiter {
        &mut self.limiter
    }

    pub(super) fn cpu(&mut self) -> &mut CpuMeter {
        &mut self.cpu
    }

    /// True when the guest used up its CPU time.
    pub(super) fn cpu_exceeded(&self) -> bool {
        self.cpu.exceeded
    }

    /// Time spent running guest code.
    pub(super) fn cpu_used(&self) -> std::time::Duration {
        self.cpu.used()
    }

    /// The memory limit, when a growth past it was refused.
    pub(super) fn memory_exceeded(&self) -> Option<usize> {
        self.limiter.memory_refused.then_some(self.limiter.memory_limit)
    }

    pub(super) fn peak_memory(&self) -> usize {
        self.limiter.memory_peak
    }

    /// The delivery's outbound HTTP requests.
    pub(super) fn http_calls(&self) -> Vec<crate::model::HttpCall> {
        self.outbound.calls()
    }

    /// After the handler returned: each job it acked and left executing without parts (a
    /// split job waits for its parts, and anything may end a job later, so this is a note in
    /// the logs, not a failure). Read from the store, so a job another writer ended is not named.
    pub(super) fn jobs_left_open(&self) -> impl std::future::Future<Output = ()> + Send + use<> {
        // Owned pieces: the store state itself is not `Send` across the reads.
        let (env, ids, logs) = (self.env.clone(), self.acked_open.clone(), self.logs.clone());
        async move {
            let Some(env) = env else { return };
            for id in ids {
                if let Ok(job) = env.job(&id).await
                    && job.status == crate::model::JobStatus::Executing
                    && job.split_at.is_none()
                    && let Ok(mut logs) = logs.lock()
                {
                    logs.push(&format!(
                        "[jobhost] the handler returned but job {id} is still executing: nothing ends it unless a \
                         later event's listener does; the watchdog fails it after the stale timeout\n"
                    ));
                }
            }
        }
    }

    pub(super) fn take_logs(&self) -> String {
        // Masked again as a whole: a secret written in two pieces is masked here.
        self.logs
            .lock()
            .map(|mut l| {
                let text = std::mem::take(&mut l.text);
                l.mask(&text).into_owned()
            })
            .unwrap_or_default()
    }

    /// `text` with the values of the secrets this delivery read written as `[secret NAME]`.
    pub(super) fn mask(&self, text: &str) -> String {
        match self.logs.lock() {
            Ok(l) => l.mask(text).into_owned(),
            Err(_) => text.to_owned(),
        }
    }

    fn env(&self) -> Result<&Env, wit::Error> {
        self.env.as_ref().ok_or_else(|| wit::Error {
            kind: wit::ErrorKind::Denied,
            message: "host calls are not allowed while the plugin lists its subscriptions".into(),
            job_status: None,
        })
    }
}

impl wasmtime_wasi_http::WasiHttpView for HostState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

type R<T> = Result<T, wit::Error>;

fn json_arg(what: &str, text: Option<String>) -> R<Value> {
    match text {
        None => Ok(Value::Null),
        Some(t) => serde_json::from_str(&t).map_err(|e| convert::invalid(format!("{what} is not JSON: {e}"))),
    }
}

impl wit::Host for HostState {}

impl jobs::Host for HostState {
    async fn get(&mut self, id: String) -> R<wit::Job> {
        self.env()?.job(&id).await.map(convert::job).map_err(convert::error)
    }

    async fn ack(&mut self, id: String, info: Option<String>, progress: Option<u8>, eta: Option<i64>) -> R<wit::Job> {
        self.check_size("info", info.as_deref())?;
        self.may_move(&id).await?;
        self.writes += 1;
        let ack = Ack { info, progress, estimated_completion_at: eta };
        let job = self.env()?.ack(&id, ack).await.map(convert::job).map_err(|e| self.engine_error(e))?;
        if !self.acked_open.contains(&id) {
            self.acked_open.push(id);
        }
        Ok(job)
    }

    async fn complete(&mut self, id: String, outcome: Option<String>, info: Option<String>) -> R<wit::Job> {
        self.check_size("outcome", outcome.as_deref())?;
        self.check_size("info", info.as_deref())?;
        self.may_move(&id).await?;
        self.writes += 1;
        let o = Outcome { outcome: json_arg("outcome", outcome)?, info };
        let job = self.env()?.complete(&id, o).await.map(convert::job).map_err(|e| self.engine_error(e))?;
        self.acked_open.retain(|j| *j != id);
        Ok(job)
    }

    async fn fail(&mut self, id: String, outcome: Option<String>, info: Option<String>) -> R<wit::Job> {
        self.check_size("outcome", outcome.as_deref())?;
        self.check_size("info", info.as_deref())?;
        self.may_move(&id).await?;
        self.writes += 1;
        let o = Outcome { outcome: json_arg("outcome", outcome)?, info };
        let job = self.env()?.fail(&id, o).await.map(convert::job).map_err(|e| self.engine_error(e))?;
        self.acked_open.retain(|j| *j != id);
        Ok(job)
    }

    async fn cancel(&mut self, id: String, info: Option<String>) -> R<wit::Job> {
        self.check_size("info", info.as_deref())?;
        self.may_move(&id).await?;
        self.writes += 1;
        self.env()?.cancel(&id, info).await.map(convert::job).map_err(|e| self.engine_error(e))
    }

    async fn split(&mut self, id: String, parts: jobs::SplitParts, run_in_parallel: bool) -> R<u32> {
        let max = self.manifest.limits.max_split_parts;
        let n = match &parts {
            jobs::SplitParts::Count(n) => *n as usize,
            jobs::SplitParts::Data(list) => list.len(),
        };
        if n > max as usize {
            return Err(self.limit(format!("split into {n} parts; the plugin's max_split_parts is {max}")));
        }
        if let jobs::SplitParts::Data(list) = &parts {
            let total: usize = list.iter().map(String::len).sum();
            let max_bytes = self.manifest.limits.max_outcome_bytes.saturating_mul(16);
            if total > max_bytes {
                return Err(self.limit(format!(
                    "partData of {total} bytes in all; the plugin may pass 16 × max_outcome_bytes ({max_bytes})"
                )));
            }
        }
        self.may_move(&id).await?;
        self.writes += 1;
        self.charge_jobs(n as u64)?;
        let parts = match parts {
            jobs::SplitParts::Count(n) => SplitParts::Count(n),
            jobs::SplitParts::Data(list) => {
                SplitParts::Data(list.into_iter().map(|t| json_arg("partData", Some(t))).collect::<R<Vec<_>>>()?)
            }
        };
        let split = Split { parts, run_in_parallel: Some(run_in_parallel) };
        let parts = self.env()?.split(&id, split).await.map(|r| r.parts).map_err(|e| self.engine_error(e))?;
        self.jobs_created += u64::from(parts);
        Ok(parts)
    }

    async fn create(&mut self, job: jobs::NewJob) -> R<wit::Job> {
        self.check_size("input", job.input.as_deref())?;
        let kind: JobType = job.kind.parse().map_err(|e: crate::model::UnknownValue| convert::error(e.into()))?;
        let new = NewJob {
            source: job.source,
            input: json_arg("input", job.input)?,
            trigger: Some(if job.manual { Trigger::Manual } else { Trigger::Immediate }),
            ..NewJob::new(kind, job.operation)
        };
        self.charge_jobs(1)?;
        self.writes += 1;
        let created = self.env()?.create_job(new).await.map_err(|e| self.engine_error(e))?;
        self.jobs_created += 1;
        self.scope.created.push(created.id.clone());
        Ok(convert::job(created))
    }

    async fn list_parts(&mut self, id: String) -> R<Vec<wit::Job>> {
        self.env()?.parts(&id).await.map(|v| v.into_iter().map(convert::job).collect()).map_err(convert::error)
    }
}

impl HostState {
    /// Calls so far that wrote to the store or reached outside: a page read ahead before
    /// any of them is not used.
    fn effects(&self) -> u64 {
        self.writes + u64::from(self.outbound.attempts())
    }

    /// A page of records in the shape `shape` builds: the one read ahead when it is exactly
    /// this page and nothing since could have changed it for this guest, else read now. A full
    /// page that follows the one asked for before, with no effect in between, keeps
    /// [`READ_AHEAD_PAGES`] of the next pages being read.
    async fn page_in_shape<P: Send + 'static>(
        &mut self,
        sheet_id: String,
        page_size: u32,
        page_number: u32,
        read: ReadShape<P>,
        len: fn(&P) -> usize,
    ) -> R<P> {
        let max = self.manifest.limits.max_page_size;
        if page_size > max {
            return Err(self.limit(format!("page size {page_size}; the plugin's max_page_size is {max}")));
        }
        let effects = self.effects();
        let wanted = |a: &ReadAhead| {
            a.effects == effects && a.sheet_id == sheet_id && a.page_size == page_size && a.page_number == page_number
        };
        let ahead = match self.read_ahead.front() {
            Some(a) if wanted(a) => self.read_ahead.pop_front(),
            // Anything else makes every page read ahead stale or unwanted.
            _ => {
                self.read_ahead.clear();
                None
            }
        };
        // A failed read ahead is read again now, so an error is always the present one.
        let ready = match ahead {
            Some(mut a) => {
                let page = (&mut a.task).await.ok().and_then(Result::ok).and_then(|p| p.downcast::<P>().ok());
                a.used = page.is_some();
                page
            }
            None => None,
        };
        let page = match ready {
            Some(page) => {
                self.pages.ahead.fetch_add(1, Ordering::Relaxed);
                *page
            }
            None => {
                let page = read(self.env()?.clone(), sheet_id.clone(), page_size, page_number).await;
                self.pages.asked.fetch_add(1, Ordering::Relaxed);
                page.map_err(convert::error)?
            }
        };
        // Read ahead only for a guest reading page after page and writing nothing between
        // them: most guests (a part of a split job) read one page and write, and a guest that
        // writes between pages would see every page read ahead discarded by its write. A short
        // page is the last one.
        let sequential =
            self.last_page.replace((sheet_id.clone(), page_size, page_number, effects)).is_some_and(|(s, z, n, e)| {
                s == sheet_id && z == page_size && n.checked_add(1) == Some(page_number) && e == effects
            });
        if sequential && len(&page) == page_size as usize {
            let env = self.env()?.clone();
            while self.read_ahead.len() < READ_AHEAD_PAGES {
                let after = self.read_ahead.back().map_or(page_number, |a| a.page_number);
                let Some(next) = after.checked_add(1) else { break };
                let (env, sheet) = (env.clone(), sheet_id.clone());
                let task = tokio::spawn(async move {
                    let page = read(env, sheet, page_size, next).await?;
                    Ok(Box::new(page) as Box<dyn std::any::Any + Send>)
                });
                let (sheet_id, counts) = (sheet_id.clone(), self.pages.clone());
                self.read_ahead.push_back(ReadAhead {
                    sheet_id,
                    page_size,
                    page_number: next,
                    effects,
                    task,
                    counts,
                    used: false,
                });
            }
        }
        Ok(page)
    }
}

/// Reads one page of a sheet (the environment, the sheet, the page size and number) in the
/// shape a guest asked for.
type ReadShape<P> = fn(Env, String, u32, u32) -> PageRead<P>;

fn read_record_page(env: Env, sheet: String, size: u32, number: u32) -> PageRead<wit::RecordPage> {
    Box::pin(async move { convert::page(env.record_rows(&sheet, size, number).await?) })
}

fn read_packed_page(env: Env, sheet: String, size: u32, number: u32) -> PageRead<wit::PackedPage> {
    Box::pin(async move { convert::packed_page(env.record_rows(&sheet, size, number).await?) })
}

/// The shape the Rust SDK reads: built on the store's read thread from rows borrowed from
/// SQLite's buffers, no `String` per row (ARCHITECTURE.md, "A page is built where it is read").
fn read_page_buffers(env: Env, sheet: String, size: u32, number: u32) -> PageRead<wit::PageBuffers> {
    Box::pin(async move {
        env.record_page_into(&sheet, size, number, convert::BuffersSink::new(size as usize)).await?.finish()
    })
}

type PageRead<P> = Pin<Box<dyn Future<Output = crate::error::Result<P>> + Send>>;

/// Pages a guest reading a sheet through has read ahead of it. Two, so that on two cores two
/// pages are read and converted at once: the host's half of paging (the store read and the
/// conversion, ~1 µs a record) is most of a page's time, the guest's half a fifth of it.
/// Three measured the same on two cores; each page held ahead is ~0.3 MB at 1,000 records,
/// and every page beyond two is read past the end of the sheet for nothing.
const READ_AHEAD_PAGES: usize = 2;

impl records::Host for HostState {
    async fn counts(&mut self, sheet_id: String) -> R<wit::RecordCounts> {
        let c = self.env()?.record_counts(&sheet_id).await.map_err(convert::error)?;
        Ok(wit::RecordCounts { total: c.total, valid: c.valid, error: c.error })
    }

    async fn page(&mut self, sheet_id: String, page_size: u32, page_number: u32) -> R<wit::RecordPage> {
        self.page_in_shape(sheet_id, page_size, page_number, read_record_page, |p| p.rows.len()).await
    }

    async fn page_packed(&mut self, sheet_id: String, page_size: u32, page_number: u32) -> R<wit::PackedPage> {
        self.page_in_shape(sheet_id, page_size, page_number, read_packed_page, |p| p.rows.len()).await
    }

    async fn read_page(&mut self, sheet_id: String, page_size: u32, page_number: u32) -> R<wit::PageBuffers> {
        self.page_in_shape(sheet_id, page_size, page_number, read_page_buffers, |p| p.ids.len()).await
    }

    async fn update(&mut self, sheet_id: String, updates: Vec<wit::RecordUpdate>) -> R<u64> {
        self.charge_records(updates.len())?;
        self.writes += 1;
        let updates = updates.into_iter().map(convert::update).collect();
        self.env()?.update_records(&sheet_id, updates).await.map_err(|e| self.engine_error(e))
    }

    async fn insert(&mut self, sheet_id: String, new: Vec<wit::NewRecord>) -> R<u64> {
        self.charge_records(new.len())?;
        self.writes += 1;
        let records = new
            .into_iter()
            .map(|r| NewRecord {
                values: r.values.into_iter().map(|fv| (fv.field, convert::value_from_wit(fv.value))).collect(),
                messages: r.messages.into_iter().map(convert::message_from_wit).collect(),
                metadata: Value::Null,
            })
            .collect();
        self.env()?.insert_records(&sheet_id, records).await.map_err(|e| self.engine_error(e))
    }
}

impl sheets::Host for HostState {
    async fn get(&mut self, id: String) -> R<wit::Sheet> {
        let s = self.env()?.sheet(&id).await.map_err(convert::error)?;
        Ok(wit::Sheet { id: s.id, name: s.name })
    }
}

impl log::Host for HostState {
    async fn log(&mut self, level: log::Level, message: String) {
        let message = self.mask(&message);
        let (plugin, event) = (&*self.plugin, &*self.event_id);
        let tag = match level {
            log::Level::Trace => {
                tracing::trace!(plugin, event, "{message}");
                "TRACE"
            }
            log::Level::Debug => {
                tracing::debug!(plugin, event, "{message}");
                "DEBUG"
            }
            log::Level::Info => {
                tracing::info!(plugin, event, "{message}");
                "INFO"
            }
            log::Level::Warn => {
                tracing::warn!(plugin, event, "{message}");
                "WARN"
            }
            log::Level::Error => {
                tracing::error!(plugin, event, "{message}");
                "ERROR"
            }
        };
        if let Ok(mut logs) = self.logs.lock() {
            logs.push(&format!("{tag} {message}\n"));
        }
    }
}

impl completion::Host for HostState {
    async fn defer(&mut self) {
        self.deferred.get_or_insert(None);
    }

    async fn settle(&mut self, error: Option<String>) {
        // The first outcome counts: a guest cannot turn a failure into a success later.
        if !matches!(self.deferred, Some(Some(_))) {
            self.deferred = Some(Some(error.map_or(Ok(()), Err)));
        }
    }
}

impl config::Host for HostState {
    async fn get(&mut self, key: String) -> Option<String> {
        self.manifest.config.get(&key).cloned()
    }

    async fn secret(&mut self, name: String) -> R<String> {
        if !self.manifest.grants.secrets.contains(&name) {
            return Err(self.refuse(
                wit::ErrorKind::Denied,
                format!("secret `{name}` is not granted to this plugin (list it under [grants] secrets)"),
            ));
        }
        let value = self.env()?.secret(&name).await.map_err(convert::error)?;
        if value.len() >= MASKED_MIN_BYTES
            && let Ok(mut logs) = self.logs.lock()
            && !logs.secrets.iter().any(|(n, _)| *n == name)
        {
            logs.secrets.push((name, value.clone()));
        }
        Ok(value)
    }
}
