//! Generated call sequences against a model of `docs/job-model.md`.
//!
//! [`Model`] is the lifecycle table and the rules around it (parts, sequential parts,
//! `job:parts-completed` exactly once, cancel cascading to parts, retries of parts), written
//! as plain data with no store. A case is a random sequence of creates and calls on several
//! jobs and their parts; after every step the engine's answer (allowed or refused), every
//! job's state and the events the step wrote must equal the model's. A failing sequence is
//! shrunk to a shortest one that still fails, and reported with the seed that reproduces it
//! (`JOBHOST_PROPTEST_SEED`).

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::TestHost;
use crate::Env;
use crate::error::ErrorKind;
use crate::model::{Ack, JobStatus, JobType, NewJob, Outcome, PartCounts, Split, SplitParts, Trigger};

/// A call on a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `execute`.
    Execute,
    /// `ack`.
    Ack,
    /// `complete`.
    Complete,
    /// `fail`.
    Fail,
    /// `cancel`.
    Cancel,
    /// `retry`.
    Retry,
    /// `acknowledge outcome`.
    OutcomeAck,
    /// The next call of the job's happy path, as the model sees it: execute a created job,
    /// ack a ready one, split an executing top-level job (in parallel when `parallel`),
    /// complete a part (fail it when `parallel` is false) or a parent its parts all ended,
    /// retry a failed job, acknowledge the outcome of another terminal one.
    Advance {
        /// Parallel parts, or a failing part.
        parallel: bool,
    },
    /// `split` into `parts`, in parallel or one after another.
    Split {
        /// How many parts.
        parts: u32,
        /// `runInParallel`.
        parallel: bool,
    },
}

/// One step of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Create a top-level job, immediately triggered or manual.
    Create {
        /// `trigger: manual`.
        manual: bool,
    },
    /// `call` on a job: the `job`-th newest (modulo) of all jobs (parts included), or with
    /// `fitting` of those the model allows the call on (of all, when it allows it on none).
    On {
        /// Which job.
        job: usize,
        /// What.
        call: Call,
        /// Pick among the jobs the call fits: random picks alone are refused too often to
        /// reach split parents, sequential parts and `job:parts-completed`.
        fitting: bool,
    },
}

/// A job as the model knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    status: JobStatus,
    attempt: u32,
    parent: Option<usize>,
    parts: Vec<usize>,
    /// `Some(parallel)` once split.
    split: Option<bool>,
    parts_completed: bool,
    outcome_acknowledged: bool,
}

impl Job {
    fn new(status: JobStatus, parent: Option<usize>) -> Self {
        Self {
            status,
            attempt: 1,
            parent,
            parts: Vec::new(),
            split: None,
            parts_completed: false,
            outcome_acknowledged: false,
        }
    }
}

/// An event the model expects: topic, job (by index), and the counts of `job:parts-completed`.
type Expected = (&'static str, usize, Option<PartCounts>);

/// The job model as plain data.
#[derive(Debug, Clone, Default)]
pub struct Model {
    jobs: Vec<Job>,
}

impl Model {
    /// The job `op` acts on (`None` for a create, or with no job yet).
    fn target(&self, op: Op) -> Option<usize> {
        let Op::On { job, fitting, .. } = op else { return None };
        let all: Vec<usize> = (0..self.jobs.len()).collect();
        let fit: Vec<usize> = if fitting {
            all.iter().copied().filter(|&i| self.clone().apply(self.concrete(op, Some(i)), Some(i)).is_some()).collect()
        } else {
            Vec::new()
        };
        let from = if fit.is_empty() { &all } else { &fit };
        // Counted from the newest: work goes mostly to the jobs (and parts) made last.
        (!from.is_empty()).then(|| from[from.len() - 1 - job % from.len()])
    }

    /// `op` with [`Call::Advance`] made the call it stands for on job `target`.
    fn concrete(&self, op: Op, target: Option<usize>) -> Op {
        let (Op::On { job, fitting, call: Call::Advance { parallel } }, Some(i)) = (op, target) else { return op };
        let j = &self.jobs[i];
        let call = match j.status {
            JobStatus::Created => Call::Execute,
            JobStatus::Ready | JobStatus::Waiting | JobStatus::Scheduled => Call::Ack,
            JobStatus::Executing if j.parent.is_some() && !parallel => Call::Fail,
            JobStatus::Executing if j.parent.is_some() || j.parts_completed => Call::Complete,
            JobStatus::Executing if j.split.is_none() => Call::Split { parts: 2, parallel },
            JobStatus::Executing => Call::Ack,
            JobStatus::Failed if j.split.is_none() && !j.outcome_acknowledged => Call::Retry,
            _ => Call::OutcomeAck,
        };
        Op::On { job, fitting, call }
    }

    /// Applies `op` (on job `target`): the events it writes, or `None` when the engine must
    /// refuse it (and the model is left as it was).
    fn apply(&mut self, op: Op, target: Option<usize>) -> Option<Vec<Expected>> {
        let mut out = Vec::new();
        match op {
            Op::Create { manual } => {
                let i = self.jobs.len();
                self.jobs.push(Job::new(if manual { JobStatus::Created } else { JobStatus::Ready }, None));
                out.push(("job:created", i, None));
                if !manual {
                    out.push(("job:ready", i, None));
                }
            }
            Op::On { call, .. } => {
                let i = target?;
                let j = self.jobs[i].clone();
                let open_or_running = matches!(j.status, JobStatus::Ready | JobStatus::Executing);
                match call {
                    Call::Execute if j.status == JobStatus::Created => {
                        self.jobs[i].status = JobStatus::Ready;
                        out.push(("job:ready", i, None));
                    }
                    Call::Ack if open_or_running => {
                        self.jobs[i].status = JobStatus::Executing;
                        out.push(("job:updated", i, None));
                    }
                    Call::Complete if open_or_running => self.end(i, JobStatus::Complete, &mut out),
                    Call::Fail if open_or_running => self.end(i, JobStatus::Failed, &mut out),
                    Call::Cancel if !j.status.is_terminal() => self.cancel(i, &mut out),
                    Call::Retry if j.status == JobStatus::Failed && j.split.is_none() => {
                        let parent = j.parent.map(|p| self.jobs[p].clone());
                        if parent.as_ref().is_some_and(|p| p.status.is_terminal() || p.parts_completed) {
                            return None;
                        }
                        let sibling_running = parent.is_some_and(|p| {
                            p.split == Some(false)
                                && p.parts
                                    .iter()
                                    .any(|&s| matches!(self.jobs[s].status, JobStatus::Ready | JobStatus::Executing))
                        });
                        let job = &mut self.jobs[i];
                        job.attempt += 1;
                        if sibling_running {
                            job.status = JobStatus::Waiting;
                            out.push(("job:updated", i, None));
                        } else {
                            job.status = JobStatus::Ready;
                            out.push(("job:ready", i, None));
                        }
                    }
                    Call::OutcomeAck if j.status.is_terminal() && !j.outcome_acknowledged => {
                        self.jobs[i].outcome_acknowledged = true;
                        out.push(("job:outcome-acknowledged", i, None));
                    }
                    Call::Split { parts, parallel }
                        if j.status == JobStatus::Executing && j.parent.is_none() && j.split.is_none() =>
                    {
                        self.jobs[i].split = Some(parallel);
                        for k in 0..parts as usize {
                            let p = self.jobs.len();
                            let ready = parallel || k == 0;
                            self.jobs
                                .push(Job::new(if ready { JobStatus::Ready } else { JobStatus::Waiting }, Some(i)));
                            self.jobs[i].parts.push(p);
                            out.push(("job:created", p, None));
                            if ready {
                                out.push(("job:ready", p, None));
                            }
                        }
                    }
                    Call::Advance { .. } => unreachable!("made concrete before it is applied"),
                    _ => return None,
                }
            }
        }
        Some(out)
    }

    fn end(&mut self, i: usize, status: JobStatus, out: &mut Vec<Expected>) {
        self.jobs[i].status = status;
        out.push((if status == JobStatus::Complete { "job:completed" } else { "job:failed" }, i, None));
        self.after_terminal(i, out);
    }

    /// The job is canceled first, then its open parts in order (each with its own event), so
    /// no part's end promotes a sibling or reports to the canceled parent.
    fn cancel(&mut self, i: usize, out: &mut Vec<Expected>) {
        self.jobs[i].status = JobStatus::Canceled;
        out.push(("job:updated", i, None));
        for p in self.jobs[i].parts.clone() {
            if !self.jobs[p].status.is_terminal() {
                self.cancel(p, out);
            }
        }
        self.after_terminal(i, out);
    }

    /// A part ended: the next sequential part starts once none runs, else the parent gets
    /// `job:parts-completed` when no part is open, once, unless the parent already ended.
    fn after_terminal(&mut self, i: usize, out: &mut Vec<Expected>) {
        let Some(parent) = self.jobs[i].parent else { return };
        let p = &self.jobs[parent];
        if p.status.is_terminal() {
            return;
        }
        let parts: Vec<&Job> = p.parts.iter().map(|&k| &self.jobs[k]).collect();
        let active = parts.iter().any(|j| matches!(j.status, JobStatus::Ready | JobStatus::Executing));
        let waiting = p.parts.iter().copied().find(|&k| self.jobs[k].status == JobStatus::Waiting);
        let open = parts.iter().any(|j| !j.status.is_terminal());
        let count = |s: JobStatus| parts.iter().filter(|j| j.status == s).count() as u64;
        let counts = PartCounts {
            total: parts.len() as u64,
            completed: count(JobStatus::Complete),
            failed: count(JobStatus::Failed),
            canceled: count(JobStatus::Canceled),
        };
        if let (Some(false), false, Some(next)) = (p.split, active, waiting) {
            self.jobs[next].status = JobStatus::Ready;
            out.push(("job:ready", next, None));
        } else if !open && !p.parts_completed {
            self.jobs[parent].parts_completed = true;
            out.push(("job:parts-completed", parent, Some(counts)));
        }
    }
}

/// Sequences of up to 60 steps over a few jobs: creates are rarer than calls, so jobs get
/// deep into their lifecycles; splits make one to three parts.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    let call = prop_oneof![
        1 => Just(Call::Execute),
        4 => Just(Call::Ack),
        4 => Just(Call::Complete),
        2 => Just(Call::Fail),
        1 => Just(Call::Cancel),
        2 => Just(Call::Retry),
        1 => Just(Call::OutcomeAck),
        12 => any::<bool>().prop_map(|parallel| Call::Advance { parallel }),
        4 => (1u32..=3, any::<bool>()).prop_map(|(parts, parallel)| Call::Split { parts, parallel }),
    ];
    let op = prop_oneof![
        2 => any::<bool>().prop_map(|manual| Op::Create { manual }),
        8 => (prop_oneof![3 => 0usize..2, 1 => 0usize..16], call, prop::bool::weighted(0.75)).prop_map(|(job, call, fitting)| Op::On { job, call, fitting }),
    ];
    proptest::collection::vec(op, 1..60)
}

/// Runs `ops` on a fresh environment of `host` and on the model, comparing after every step.
pub async fn run(host: &TestHost, ops: &[Op]) -> Result<(), String> {
    let env = host.env().await;
    let mut model = Model::default();
    let mut ids: Vec<String> = Vec::new();
    let mut cursor = 0;
    for (n, &op) in ops.iter().enumerate() {
        let target = model.target(op);
        if matches!(op, Op::On { .. }) && target.is_none() {
            continue; // nothing to call yet
        }
        let op = model.concrete(op, target);
        let step = |what: String| format!("step {n} ({op:?} on job {target:?}): {what}");
        let expected = model.apply(op, target);
        let got = act(&env, target.map(|i| ids[i].as_str()), op).await;
        match (&expected, got) {
            (Some(_), Ok(new_parts)) => ids.extend(new_parts),
            (None, Err(e)) if e.kind() == ErrorKind::Conflict => {}
            (None, Err(e)) => return Err(step(format!("refused as {:?}, not conflict: {e}", e.kind()))),
            (Some(_), Err(e)) => return Err(step(format!("the model allows it; the engine refused: {e}"))),
            (None, Ok(_)) => return Err(step("the model refuses it; the engine allowed it".into())),
        }
        if ids.len() != model.jobs.len() {
            return Err(step(format!("{} jobs in the engine, {} in the model", ids.len(), model.jobs.len())));
        }
        let events = env.events(cursor, u32::MAX).await.map_err(|e| step(format!("events: {e}")))?;
        cursor = events.last().map_or(cursor, |e| e.seq);
        let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
        let got: Vec<Expected> = events
            .iter()
            .map(|e| {
                let job = e.job_id().and_then(|id| index.get(id).copied()).unwrap_or(usize::MAX);
                let counts = e.payload.get("parts").and_then(|p| serde_json::from_value(p.clone()).ok());
                (topic(&e.topic), job, counts)
            })
            .collect();
        let want = expected.unwrap_or_default();

        if got != want {
            return Err(step(format!("events (topic, job, parts): engine {got:?}, model {want:?}")));
        }
        for (i, id) in ids.iter().enumerate() {
            let job = env.job(id).await.map_err(|e| step(format!("job {i}: {e}")))?;
            let m = &model.jobs[i];
            let engine =
                (job.status, job.attempt, job.parts_completed_at.is_some(), job.outcome_acknowledged_at.is_some());
            let wanted = (m.status, m.attempt, m.parts_completed, m.outcome_acknowledged);
            if engine != wanted {
                return Err(step(format!(
                    "job {i} (status, attempt, parts completed, outcome acknowledged): engine {engine:?}, model {wanted:?}"
                )));
            }
        }
    }
    Ok(())
}

/// A topic as the model spells it (`"?"` for one it does not know, which never matches).
fn topic(t: &str) -> &'static str {
    const KNOWN: [&str; 8] = [
        "job:created",
        "job:ready",
        "job:updated",
        "job:completed",
        "job:failed",
        "job:outcome-acknowledged",
        "job:parts-completed",
        "job:scheduled",
    ];
    KNOWN.into_iter().find(|k| *k == t).unwrap_or("?")
}

/// Performs `op` on the engine; returns the ids of the jobs it created (a create's job, or a
/// split's parts in part order).
async fn act(env: &Env, target: Option<&str>, op: Op) -> crate::Result<Vec<String>> {
    let (id, call) = match (op, target) {
        (Op::On { call, .. }, Some(id)) => (id, call),
        _ => {
            let manual = matches!(op, Op::Create { manual: true });
            let base = NewJob::new(JobType::Space, "work");
            let new = if manual { base.trigger(Trigger::Manual) } else { base };
            return Ok(vec![env.create_job(new).await?.id]);
        }
    };
    let job = perform(env, id, call).await?;
    match call {
        Call::Split { .. } => Ok(env.parts(&job.id).await?.into_iter().map(|p| p.id).collect()),
        _ => Ok(vec![]),
    }
}

/// Makes `call` on job `id`; returns the job after it (for a split, the parent).
pub async fn perform(env: &Env, id: &str, call: Call) -> crate::Result<crate::model::Job> {
    match call {
        Call::Execute => env.execute(id).await,
        Call::Ack => env.ack(id, Ack::progress("working", 30)).await,
        Call::Complete => env.complete(id, Outcome::message("done")).await,
        Call::Fail => env.fail(id, Outcome::message("broken")).await,
        Call::Cancel => env.cancel(id, Some("stop".into())).await,
        Call::Retry => env.retry(id).await,
        Call::OutcomeAck => env.acknowledge_outcome(id).await,
        Call::Advance { .. } => unreachable!("made concrete before it is made"),
        Call::Split { parts, parallel } => {
            let split = Split { parts: SplitParts::Count(parts), run_in_parallel: Some(parallel) };
            env.split(id, split).await.map(|r| r.parent)
        }
    }
}

/// Runs `cases` generated cases of `strategy` through `test`, one after another on the
/// caller's runtime. A failing case is shrunk (proptest's simplify/complicate search) to the
/// simplest value that still fails, and the panic names it and the seed.
pub async fn check<S, F>(name: &str, cases: u32, strategy: S, mut test: F)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    F: AsyncFnMut(&S::Value) -> Result<(), String>,
{
    let seed: u64 = std::env::var("JOBHOST_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), name));
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config { cases, ..Config::default() }, rng);
    for case in 0..cases {
        let mut tree = strategy.new_tree(&mut runner).expect("the strategy makes values");
        let Err(first) = test(&tree.current()).await else { continue };
        let (mut value, mut why) = (tree.current(), first);
        // Shrink: keep the simplest value seen failing. `complicate` steps back towards the
        // last failure when a simplification passed.
        let mut steps = 0;
        if tree.simplify() {
            loop {
                steps += 1;
                if steps > 2_000 {
                    break;
                }
                match test(&tree.current()).await {
                    Err(e) => {
                        (value, why) = (tree.current(), e);
                        if !tree.simplify() {
                            break;
                        }
                    }
                    Ok(()) => {
                        if !tree.complicate() {
                            break;
                        }
                    }
                }
            }
        }
        panic!(
            "{name}: case {case} failed (JOBHOST_PROPTEST_SEED={seed} reproduces it); shrunk in {steps} steps to\n{value:#?}\n{why}"
        );
    }
}

/// 96 generated sequences per run, each on a fresh environment.
pub async fn generated_call_sequences_leave_the_store_and_its_events_as_the_model_says() {
    let host = TestHost::new();
    check("the job model", 96, ops(), async |ops: &Vec<Op>| run(&host, ops).await).await;
}

/// Records as inserted, then an update of each (values merged, `null` clearing a field).
fn records_and_updates() -> impl Strategy<Value = Vec<(RecordValues, RecordValues)>> {
    let cells = || jobhost_core::generate::record_values(5);
    proptest::collection::vec((cells(), cells()), 1..12)
}

type RecordValues = serde_json::Map<String, serde_json::Value>;

/// What the store gives back for `values`, field by field. The page's JSON as the API serves
/// it (written straight from the rows) must be the serialized page, byte for byte.
async fn stored(env: &Env, sheet: &str) -> Result<Vec<RecordValues>, String> {
    let page = env.records(sheet, 1000, 1).await.map_err(|e| format!("page: {e}"))?;
    let mut json = Vec::new();
    env.records_json(sheet, 1000, 1, &mut json).await.map_err(|e| format!("page as JSON: {e}"))?;
    let serialized = serde_json::to_vec(&page).map_err(|e| e.to_string())?;
    if json != serialized {
        return Err(format!(
            "the page's JSON {} is not the serialized page {}",
            String::from_utf8_lossy(&json),
            String::from_utf8_lossy(&serialized)
        ));
    }
    Ok(page.records.into_iter().map(|r| r.values.into_iter().map(|(k, c)| (k, c.value)).collect()).collect())
}

/// Generated records go into the store and come back equal: every key and value, after the
/// insert and after an update.
pub async fn generated_records_come_back_from_the_store_as_written() {
    let host = TestHost::new();
    let env = host.env().await;
    check("record values", 48, records_and_updates(), async |cases: &Vec<(RecordValues, RecordValues)>| {
        let sheet = env.create_sheet("generated").await.map_err(|e| e.to_string())?.id;
        let new: Vec<crate::model::NewRecord> = cases
            .iter()
            .map(|(values, _)| crate::model::NewRecord { values: values.clone(), ..Default::default() })
            .collect();
        env.insert_records(&sheet, new).await.map_err(|e| format!("insert: {e}"))?;
        let inserted: Vec<RecordValues> = cases.iter().map(|(v, _)| v.clone()).collect();
        let got = stored(&env, &sheet).await?;
        if got != inserted {
            return Err(format!("after the insert: stored {got:?}, written {inserted:?}"));
        }
        let ids: Vec<String> =
            env.records(&sheet, 1000, 1).await.map_err(|e| e.to_string())?.records.into_iter().map(|r| r.id).collect();
        let updates = ids
            .iter()
            .zip(cases)
            .map(|(id, (_, change))| crate::model::RecordUpdate {
                id: id.clone(),
                values: change.clone(),
                messages: None,
            })
            .collect();
        env.update_records(&sheet, updates).await.map_err(|e| format!("update: {e}"))?;
        let merged: Vec<RecordValues> = cases
            .iter()
            .map(|(before, change)| {
                let mut m = before.clone();
                for (k, v) in change {
                    if v.is_null() {
                        m.remove(k);
                    } else {
                        m.insert(k.clone(), v.clone());
                    }
                }
                m
            })
            .collect();
        let got = stored(&env, &sheet).await?;
        if got != merged {
            return Err(format!("after the update: stored {got:?}, expected {merged:?}"));
        }
        Ok(())
    })
    .await;
}

/// How a generated job ends up before the listings are read.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Manual,
    Ready,
    Executing,
    Complete,
    Failed,
    Canceled,
    /// Acked and split into this many parts, the first of which completes.
    Split(u32),
}

/// A job to make: type, operation, fate.
type Spec = (JobType, &'static str, Fate);

fn specs() -> impl Strategy<Value = Vec<Spec>> {
    let kind = proptest::sample::select(vec![JobType::Space, JobType::File]);
    let operation = proptest::sample::select(vec!["a", "b", "c"]);
    let fate = prop_oneof![
        Just(Fate::Manual),
        Just(Fate::Ready),
        Just(Fate::Executing),
        Just(Fate::Complete),
        Just(Fate::Failed),
        Just(Fate::Canceled),
        (1u32..4).prop_map(Fate::Split),
    ];
    proptest::collection::vec((kind, operation, fate), 0..20)
}

/// A query's shape, resolved against the made jobs: statuses, type, operation, a parent (by
/// index among the made jobs, if it was split), top level only, a creation-time window (by
/// index among the jobs' creation times), and the page size to read it with.
type QuerySpec =
    (Vec<JobStatus>, Option<JobType>, Option<&'static str>, Option<usize>, bool, (Option<usize>, Option<usize>), u32);

fn queries() -> impl Strategy<Value = Vec<QuerySpec>> {
    let statuses = proptest::sample::subsequence(JobStatus::ALL.to_vec(), 0..4);
    let kind = proptest::option::of(proptest::sample::select(vec![JobType::Space, JobType::File, JobType::Sheet]));
    let operation = proptest::option::of(proptest::sample::select(vec!["a", "b", "c"]));
    let parent = proptest::option::weighted(0.3, 0usize..40);
    let window = (proptest::option::weighted(0.3, 0usize..40), proptest::option::weighted(0.3, 0usize..40));
    proptest::collection::vec((statuses, kind, operation, parent, any::<bool>(), window, 1u32..8), 1..6)
}

/// Makes the jobs of `specs` on `env`; returns every job made (parts included), oldest first.
async fn make(env: &Env, specs: &[Spec]) -> crate::Result<Vec<crate::model::Job>> {
    for &(kind, operation, fate) in specs {
        let new = NewJob::new(kind, operation);
        let job = env.create_job(if matches!(fate, Fate::Manual) { new.trigger(Trigger::Manual) } else { new }).await?;
        let id = job.id.as_str();
        match fate {
            Fate::Manual | Fate::Ready => {}
            Fate::Executing => drop(env.ack(id, Ack::default()).await?),
            Fate::Complete => drop(env.complete(id, Outcome::default()).await?),
            Fate::Failed => drop(env.fail(id, Outcome::default()).await?),
            Fate::Canceled => drop(env.cancel(id, None).await?),
            Fate::Split(n) => {
                env.ack(id, Ack::default()).await?;
                env.split(id, Split { parts: SplitParts::Count(n), run_in_parallel: Some(true) }).await?;
                let first = env.parts(id).await?.remove(0);
                env.complete(&first.id, Outcome::default()).await?;
            }
        }
    }
    env.jobs(0, u32::MAX).await
}

/// Every filtered listing, read page by page until a short page, returns exactly the jobs
/// that match, each once, in the documented order; the counts per status agree.
pub async fn generated_job_listings_return_every_match_across_their_pages() {
    let host = TestHost::new();
    let strategy = (specs(), queries());
    check("job listings", 32, strategy, async |(specs, queries): &(Vec<Spec>, Vec<QuerySpec>)| {
        let env = host.env().await;
        let all = make(&env, specs).await.map_err(|e| format!("making the jobs: {e}"))?;
        let times: Vec<i64> = all.iter().map(|j| j.created_at).collect();
        let parents: Vec<&crate::model::Job> = all.iter().filter(|j| j.split_at.is_some()).collect();
        for (statuses, kind, operation, parent, top_level, (from, before), size) in queries {
            let query = crate::store::JobQuery {
                statuses: statuses.clone(),
                kind: *kind,
                operation: operation.map(str::to_owned),
                parent: parent.and_then(|p| parents.get(p % parents.len().max(1))).map(|j| j.id.clone()),
                top_level: *top_level,
                created_from: from.and_then(|i| times.get(i % times.len().max(1)).copied()),
                created_before: before.and_then(|i| times.get(i % times.len().max(1)).copied()),
            };
            let matches = |j: &&crate::model::Job| {
                (query.statuses.is_empty() || query.statuses.contains(&j.status))
                    && query.kind.is_none_or(|k| j.kind == k)
                    && query.operation.as_deref().is_none_or(|o| j.operation == o)
                    && match &query.parent {
                        Some(p) => j.parent_id.as_ref() == Some(p),
                        None => !query.top_level || !j.is_part,
                    }
                    && query.created_from.is_none_or(|t| j.created_at >= t)
                    && query.created_before.is_none_or(|t| j.created_at < t)
            };
            let mut want: Vec<&crate::model::Job> = all.iter().filter(matches).collect();
            if query.parent.is_some() {
                want.sort_by_key(|j| j.part_index);
            } else {
                want.reverse(); // newest first
            }
            let want: Vec<&str> = want.iter().map(|j| j.id.as_str()).collect();
            let mut got: Vec<String> = Vec::new();
            for page in 0u64.. {
                let rows = env
                    .find_jobs(query.clone(), page * u64::from(*size), *size)
                    .await
                    .map_err(|e| format!("{query:?} page {page}: {e}"))?;
                let short = rows.len() < *size as usize;
                got.extend(rows.into_iter().map(|j| j.id));
                if short || page > 100 {
                    break;
                }
            }
            if got != want {
                return Err(format!("{query:?} in pages of {size}: listed {got:?}, matching {want:?}"));
            }
            let counted: u64 = env
                .count_jobs(crate::store::JobQuery { statuses: vec![], ..query.clone() })
                .await
                .map_err(|e| format!("count: {e}"))?
                .into_iter()
                .filter(|(s, _)| query.statuses.is_empty() || query.statuses.contains(s))
                .map(|(_, n)| n)
                .sum();
            if counted != want.len() as u64 {
                return Err(format!("{query:?}: counted {counted}, matching {}", want.len()));
            }
        }
        Ok(())
    })
    .await;
}
