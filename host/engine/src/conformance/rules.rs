//! Every rule of `docs/job-model.md`, through the engine: every transition, multi-part jobs,
//! records, deliveries and the watchdog, on the installed backend.
#![allow(missing_docs)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::generated::{Call, perform};
use super::{TestHost, all_events, events_of, test_config, until_status, until_terminal};
use crate::error::ErrorKind;
use crate::listener::Listener;
use crate::model::{
    Ack, Job, JobStatus, JobType, MAX_PARTS, Message, MessageType, NewJob, NewRecord, Outcome, RecordUpdate, Split,
    SplitParts, Trigger,
};
use crate::scenario::{self, Options};
use crate::{EngineConfig, Env};
use serde_json::{Value, json};

// ---------------------------------------------------------------- lifecycle table

const CALLS: [Call; 8] = [
    Call::Execute,
    Call::Ack,
    Call::Complete,
    Call::Fail,
    Call::Cancel,
    Call::Retry,
    Call::OutcomeAck,
    Call::Split { parts: 2, parallel: true },
];

const STATUSES: [JobStatus; 8] = JobStatus::ALL;

/// `docs/job-model.md`'s table: the status a call leads to from a status, or `None` if refused,
/// and the topics the call writes.
fn expected(from: JobStatus, call: Call) -> Option<(JobStatus, &'static [&'static str])> {
    use JobStatus::*;
    match (call, from) {
        (Call::Execute, Created) => Some((Ready, &["job:ready"])),
        (Call::Ack, Ready | Executing) => Some((Executing, &["job:updated"])),
        (Call::Complete, Ready | Executing) => Some((Complete, &["job:completed"])),
        (Call::Fail, Ready | Executing) => Some((Failed, &["job:failed"])),
        (Call::Cancel, Created | Scheduled | Waiting | Ready | Executing) => Some((Canceled, &["job:updated"])),
        (Call::Retry, Failed) => Some((Ready, &["job:ready"])),
        (Call::OutcomeAck, Complete | Failed | Canceled) => Some((from, &["job:outcome-acknowledged"])),
        (Call::Split { .. }, Executing) => Some((Executing, &["job:created", "job:ready", "job:created", "job:ready"])),
        _ => None,
    }
}

/// A fresh job in `status`, reached through the public API.
async fn job_in(env: &Env, status: JobStatus) -> Job {
    let base = NewJob::new(crate::model::JobType::Space, "work");
    let job = match status {
        JobStatus::Created => env.create_job(base.trigger(Trigger::Manual)).await,
        JobStatus::Scheduled => env.create_job(NewJob { run_at: Some(env.engine().now() + 3_600_000), ..base }).await,
        JobStatus::Waiting => {
            let pred = env.create_job(base.clone()).await.unwrap();
            env.create_job(NewJob { predecessor_ids: vec![pred.id], ..base }).await
        }
        JobStatus::Ready => env.create_job(base).await,
        JobStatus::Executing => {
            let j = env.create_job(base).await.unwrap();
            env.ack(&j.id, Ack::default()).await
        }
        JobStatus::Complete | JobStatus::Failed | JobStatus::Canceled => {
            let j = env.create_job(base).await.unwrap();
            match status {
                JobStatus::Complete => env.complete(&j.id, Outcome::default()).await,
                JobStatus::Failed => env.fail(&j.id, Outcome::default()).await,
                _ => env.cancel(&j.id, None).await,
            }
        }
        other => panic!("no recipe for {other}"),
    }
    .unwrap();
    assert_eq!(job.status, status);
    job
}

pub async fn every_call_from_every_status_is_allowed_or_refused_with_nothing_changed() {
    let host = TestHost::new();
    let env = host.env().await;
    for status in STATUSES {
        for c in CALLS {
            let job = job_in(&env, status).await;
            let cursor = all_events(&env).await.last().map_or(0, |e| e.seq);
            let result = perform(&env, &job.id, c).await;
            let new_events = env.events(cursor, 1000).await.unwrap();
            match expected(status, c) {
                Some((to, topics)) => {
                    let after = result.unwrap_or_else(|e| panic!("{c:?} from {status} should be allowed: {e}"));
                    assert_eq!(after.status, to, "{c:?} from {status}");
                    assert_eq!(env.job(&job.id).await.unwrap(), after, "{c:?} from {status}: stored = returned");
                    let got: Vec<&str> = new_events.iter().map(|e| e.topic.as_str()).collect();
                    assert_eq!(got, topics, "{c:?} from {status}: events");
                }
                None => {
                    let err = result.expect_err(&format!("{c:?} from {status} must be refused"));
                    assert_eq!(err.kind(), ErrorKind::Conflict, "{c:?} from {status}: {err}");
                    assert!(err.to_string().contains(&job.id), "error names the job: {err}");
                    assert!(err.to_string().contains(status.as_str()), "error names the status: {err}");
                    assert_eq!(env.job(&job.id).await.unwrap(), job, "{c:?} from {status} changed the job");
                    assert!(new_events.is_empty(), "{c:?} from {status} wrote events: {new_events:?}");
                }
            }
        }
    }
}

pub async fn refusals_say_what_and_why() {
    let host = TestHost::new();
    let env = host.env().await;
    let job = job_in(&env, JobStatus::Complete).await;
    let err = env.ack(&job.id, Ack::default()).await.unwrap_err();
    assert_eq!(err.to_string(), format!("job {} is complete; ack needs ready or executing", job.id));
    assert!(err.is_already_terminal());
}

pub async fn create_writes_created_then_ready_or_only_created() {
    let host = TestHost::new();
    let env = host.env().await;
    let immediate = env.create_job(NewJob::new(crate::model::JobType::File, "parse")).await.unwrap();
    let topics: Vec<String> = env.job_events(&immediate.id).await.unwrap().into_iter().map(|e| e.topic).collect();
    assert_eq!(topics, ["job:created", "job:ready"]);
    let manual =
        env.create_job(NewJob::new(crate::model::JobType::File, "parse").trigger(Trigger::Manual)).await.unwrap();
    let topics: Vec<String> = env.job_events(&manual.id).await.unwrap().into_iter().map(|e| e.topic).collect();
    assert_eq!(topics, ["job:created"]);

    let ev = &env.job_events(&immediate.id).await.unwrap()[1];
    assert_eq!(ev.context["environmentId"], json!(env.id()));
    assert_eq!(ev.context["jobId"], json!(immediate.id));
    assert_eq!(ev.payload["job"], json!("file:parse"));
    assert_eq!(ev.payload["domain"], json!("file"));
    assert_eq!(ev.payload["operation"], json!("parse"));
    assert_eq!(ev.payload["isPart"], json!(false));
    assert_eq!(ev.payload["status"], json!("ready"));
}

pub async fn ack_is_repeatable_and_updates_info_progress_and_estimate() {
    let host = TestHost::new();
    let env = host.env().await;
    let job = job_in(&env, JobStatus::Ready).await;
    let a = env
        .ack(&job.id, Ack { info: Some("one".into()), progress: Some(10), estimated_completion_at: Some(5) })
        .await
        .unwrap();
    assert_eq!((a.info.as_deref(), a.progress, a.estimated_completion_at), (Some("one"), 10, Some(5)));
    let started = a.started_at;
    let b = env.ack(&job.id, Ack::progress("two", 55)).await.unwrap();
    assert_eq!((b.info.as_deref(), b.progress, b.estimated_completion_at), (Some("two"), 55, Some(5)));
    assert_eq!(b.started_at, started, "startedAt is the first ack");
    let err = env.ack(&job.id, Ack { progress: Some(101), ..Ack::default() }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(env.job(&job.id).await.unwrap(), b, "a refused ack changes nothing");
    let c = env.complete(&job.id, Outcome::message("ok")).await.unwrap();
    assert_eq!(c.progress, 100);
    assert_eq!(c.outcome, json!({"message": "ok"}));
}

pub async fn retry_increments_attempt_and_outcome_ack_is_once() {
    let host = TestHost::new();
    let env = host.env().await;
    let job = job_in(&env, JobStatus::Failed).await;
    let r = env.retry(&job.id).await.unwrap();
    assert_eq!((r.status, r.attempt), (JobStatus::Ready, 2));
    let done = env.complete(&job.id, Outcome::default()).await.unwrap();
    let acked = env.acknowledge_outcome(&done.id).await.unwrap();
    assert!(acked.outcome_acknowledged_at.is_some());
    let err = env.acknowledge_outcome(&done.id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
}

pub async fn scheduled_and_waiting_jobs_start_when_their_condition_is_met() {
    let host = TestHost::new();
    let env = host.env().await;
    let base = NewJob::new(crate::model::JobType::Space, "work");
    let a = env.create_job(base.clone()).await.unwrap();
    let b = env.create_job(base.clone()).await.unwrap();
    let after_both =
        env.create_job(NewJob { predecessor_ids: vec![a.id.clone(), b.id.clone()], ..base.clone() }).await.unwrap();
    assert_eq!(after_both.status, JobStatus::Waiting);
    env.complete(&a.id, Outcome::default()).await.unwrap();
    assert_eq!(env.job(&after_both.id).await.unwrap().status, JobStatus::Waiting, "one predecessor is not enough");
    env.fail(&b.id, Outcome::default()).await.unwrap();
    assert_eq!(
        env.job(&after_both.id).await.unwrap().status,
        JobStatus::Waiting,
        "a failed predecessor may be retried"
    );
    env.retry(&b.id).await.unwrap();
    env.complete(&b.id, Outcome::default()).await.unwrap();
    assert_eq!(env.job(&after_both.id).await.unwrap().status, JobStatus::Ready);
    assert_eq!(events_of(&env, &after_both.id, "job:ready").await.len(), 1);

    // A canceled predecessor cancels its dependent: it could never run.
    let c = env.create_job(base.clone()).await.unwrap();
    let dep = env.create_job(NewJob { predecessor_ids: vec![c.id.clone()], ..base.clone() }).await.unwrap();
    env.cancel(&c.id, None).await.unwrap();
    let dep = env.job(&dep.id).await.unwrap();
    assert_eq!(dep.status, JobStatus::Canceled);
    assert!(dep.info.unwrap().contains(&c.id));
    let err = env.create_job(NewJob { predecessor_ids: vec![c.id.clone()], ..base.clone() }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);

    // A predecessor from another environment does not exist here.
    let other = host.env().await;
    let foreign = other.create_job(base.clone()).await.unwrap();
    let err = env.create_job(NewJob { predecessor_ids: vec![foreign.id], ..base }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

// ---------------------------------------------------------------- multi-part jobs

async fn executing_parent(env: &Env) -> Job {
    job_in(env, JobStatus::Executing).await
}

pub async fn split_gives_parts_their_data_and_refuses_bad_splits() {
    let host = TestHost::new();
    let env = host.env().await;
    let parent = executing_parent(&env).await;
    let r = env.split(&parent.id, Split::count(3)).await.unwrap();
    assert_eq!(r.parts, 3);
    let parts = env.parts(&parent.id).await.unwrap();
    assert_eq!(parts.len(), 3);
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p.part_data, json!({"part": i, "total": 3}));
        assert_eq!(p.parent_id.as_deref(), Some(parent.id.as_str()));
        assert_eq!(
            (p.kind, p.operation.as_str(), p.status),
            (parent.kind, parent.operation.as_str(), JobStatus::Ready)
        );
        let ready = &events_of(&env, &p.id, "job:ready").await[0];
        assert_eq!(ready.payload["isPart"], json!(true));
        assert_eq!(ready.payload["parentId"], json!(parent.id));
        assert_eq!(ready.payload["partData"], json!({"part": i, "total": 3}));
    }
    let err = env.split(&parent.id, Split::count(2)).await.unwrap_err();
    assert!(err.to_string().contains("already split"), "{err}");
    let part = &parts[0];
    env.ack(&part.id, Ack::default()).await.unwrap();
    let err = env.split(&part.id, Split::count(2)).await.unwrap_err();
    assert!(err.to_string().contains("is a part"), "{err}");

    let other = executing_parent(&env).await;
    let before = all_events(&env).await.len();
    for bad in [
        Split::count(0),
        Split::count(MAX_PARTS + 1),
        Split { parts: SplitParts::Data(vec![]), run_in_parallel: None },
        Split { parts: SplitParts::Data(vec![json!({"a": 1}), json!(7)]), run_in_parallel: None },
    ] {
        let err = env.split(&other.id, bad.clone()).await.unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::Invalid | ErrorKind::Limit), "{bad:?}: {err}");
    }
    assert_eq!(env.parts(&other.id).await.unwrap().len(), 0);
    assert_eq!(all_events(&env).await.len(), before, "refused splits wrote nothing");
    assert_eq!(env.job(&other.id).await.unwrap(), other);

    let data = vec![json!({"region": "eu"}), json!({"region": "us"})];
    env.split(&other.id, Split { parts: SplitParts::Data(data.clone()), run_in_parallel: None }).await.unwrap();
    let got: Vec<Value> = env.parts(&other.id).await.unwrap().into_iter().map(|p| p.part_data).collect();
    assert_eq!(got, data);
}

pub async fn parts_completed_fires_once_with_counts_derived_from_the_parts() {
    let host = TestHost::new();
    let env = host.env().await;
    let parent = executing_parent(&env).await;
    env.split(&parent.id, Split::count(4)).await.unwrap();
    let parts = env.parts(&parent.id).await.unwrap();
    env.complete(&parts[0].id, Outcome::default()).await.unwrap();
    env.fail(&parts[1].id, Outcome::default()).await.unwrap();
    env.cancel(&parts[2].id, None).await.unwrap();
    assert!(events_of(&env, &parent.id, "job:parts-completed").await.is_empty(), "one part is still open");
    // Retrying a failed part while siblings are open is allowed; it ends again later.
    env.retry(&parts[1].id).await.unwrap();
    env.fail(&parts[1].id, Outcome::default()).await.unwrap();
    env.ack(&parts[3].id, Ack::default()).await.unwrap();
    env.complete(&parts[3].id, Outcome::default()).await.unwrap();

    let pc = events_of(&env, &parent.id, "job:parts-completed").await;
    assert_eq!(pc.len(), 1);
    assert_eq!(pc[0].payload["parts"], json!({"total": 4, "completed": 2, "failed": 1, "canceled": 1}));
    assert_eq!(pc[0].payload["isPart"], json!(false));
    let parent_now = env.job(&parent.id).await.unwrap();
    assert_eq!(parent_now.status, JobStatus::Executing, "the host never ends the parent itself");

    // After parts-completed, a part cannot be retried (the parent was already told).
    let err = env.retry(&parts[1].id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    // And the split parent, once failed, cannot be retried either.
    env.fail(&parent.id, Outcome::default()).await.unwrap();
    let err = env.retry(&parent.id).await.unwrap_err();
    assert!(err.to_string().contains("was split"), "{err}");
}

pub async fn many_parts_ending_at_the_same_moment_yield_exactly_one_parts_completed() {
    let host = TestHost::new();
    let env = host.env().await;
    for round in 0..3 {
        let parent = executing_parent(&env).await;
        env.split(&parent.id, Split::count(200)).await.unwrap();
        let parts = env.parts(&parent.id).await.unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, p) in parts.into_iter().enumerate() {
            let env = env.clone();
            tasks.spawn(async move {
                match i % 3 {
                    0 => env.complete(&p.id, Outcome::default()).await,
                    1 => env.fail(&p.id, Outcome::default()).await,
                    _ => env.cancel(&p.id, None).await,
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap().unwrap();
        }
        let pc = events_of(&env, &parent.id, "job:parts-completed").await;
        assert_eq!(pc.len(), 1, "round {round}");
        assert_eq!(pc[0].payload["parts"], json!({"total": 200, "completed": 67, "failed": 67, "canceled": 66}));
    }
}

pub async fn cancel_cascades_to_open_parts_and_suppresses_parts_completed() {
    let host = TestHost::new();
    let env = host.env().await;
    let parent = executing_parent(&env).await;
    env.split(&parent.id, Split::count(4)).await.unwrap();
    let parts = env.parts(&parent.id).await.unwrap();
    env.complete(&parts[0].id, Outcome::default()).await.unwrap();
    env.ack(&parts[1].id, Ack::default()).await.unwrap();
    // A job waiting on a part is canceled with it.
    let waiting = NewJob { predecessor_ids: vec![parts[2].id.clone()], ..NewJob::new(JobType::Space, "after") };
    let dependent = env.create_job(waiting).await.unwrap();
    assert_eq!(dependent.status, JobStatus::Waiting);
    env.cancel(&parent.id, Some("user stopped it".into())).await.unwrap();
    let statuses: Vec<JobStatus> = env.parts(&parent.id).await.unwrap().iter().map(|p| p.status).collect();
    assert_eq!(statuses, [JobStatus::Complete, JobStatus::Canceled, JobStatus::Canceled, JobStatus::Canceled]);
    assert_eq!(env.job(&parent.id).await.unwrap().status, JobStatus::Canceled);
    assert!(events_of(&env, &parent.id, "job:parts-completed").await.is_empty());
    for part in &parts[1..] {
        let part = env.job(&part.id).await.unwrap();
        assert_eq!(part.info.as_deref(), Some(format!("canceled with parent job {}", parent.id).as_str()));
        assert!(part.finished_at.is_some());
        assert_eq!(events_of(&env, &part.id, "job:updated").await.last().unwrap().payload["status"], "canceled");
    }
    let dependent = env.job(&dependent.id).await.unwrap();
    assert_eq!(dependent.status, JobStatus::Canceled);
    assert!(dependent.info.unwrap().contains(&parts[2].id));
}

pub async fn sequential_parts_run_strictly_one_after_another() {
    let host = TestHost::new();
    let env = host.env().await;
    let log: Arc<Mutex<Vec<(u64, &'static str)>>> = Arc::default();
    let l = log.clone();
    let listener = Listener::new("seq", env.id()).filter(json!({"isPart": true}), move |f| {
        f.on("job:ready", move |event| {
            let log = l.clone();
            async move {
                let part = event.event.payload.pointer("/partData/part").and_then(Value::as_u64).unwrap();
                let id = event.job_id()?.to_owned();
                log.lock().unwrap().push((part, "start"));
                event.api.ack(&id, Ack::default()).await?;
                tokio::task::yield_now().await;
                log.lock().unwrap().push((part, "end"));
                if part == 2 {
                    event.api.fail(&id, Outcome::message("part 2 fails")).await?;
                } else {
                    event.api.complete(&id, Outcome::default()).await?;
                }
                Ok(())
            }
        })
    });
    let running = host.engine.run(vec![listener]).await.unwrap();
    let parent = executing_parent(&env).await;
    env.split(&parent.id, Split { parts: SplitParts::Count(5), run_in_parallel: Some(false) }).await.unwrap();
    let parts = env.parts(&parent.id).await.unwrap();
    // The listener may already be working on part 0 (or have ended it and started part 1):
    // whatever it did, at most one part runs and the later ones wait.
    // By part index: ended parts, then at most one running, then waiting ones.
    let rank = |p: &Job| match p.status {
        s if s.is_terminal() => 0,
        JobStatus::Ready | JobStatus::Executing => 1,
        _ => 2,
    };
    let ranks: Vec<u8> = parts.iter().map(rank).collect();
    assert!(ranks.is_sorted() && ranks.iter().filter(|r| **r == 1).count() <= 1, "{parts:?}");
    assert!(parts.iter().all(|p| rank(p) != 2 || p.status == JobStatus::Waiting), "{parts:?}");
    let pc = super::wait_for(&host.engine, "job:parts-completed of the parent", || {
        let (env, id) = (env.clone(), parent.id.clone());
        async move { Ok(events_of(&env, &id, "job:parts-completed").await.into_iter().next()) }
    })
    .await
    .unwrap();
    running.shutdown().await;
    assert_eq!(pc.payload["parts"], json!({"total": 5, "completed": 4, "failed": 1, "canceled": 0}));
    let expected: Vec<(u64, &str)> = (0..5).flat_map(|p| [(p, "start"), (p, "end")]).collect();
    assert_eq!(*log.lock().unwrap(), expected);
    // In the store's own order: part i+1 became ready only after part i ended.
    let events = all_events(&env).await;
    let seq_of =
        |job: &str, topic: &str| events.iter().find(|e| e.job_id() == Some(job) && e.topic == topic).unwrap().seq;
    for w in parts.windows(2) {
        let ended = seq_of(&w[0].id, if w[0].part_index == Some(2) { "job:failed" } else { "job:completed" });
        assert!(seq_of(&w[1].id, "job:ready") > ended);
    }
}

// ---------------------------------------------------------------- the seeds' scenario

struct Scenario {
    host: TestHost,
    env: Env,
    sheet: String,
    expected_invalid: u64,
}

async fn scenario_setup(records: u64, options: Options) -> (Scenario, crate::Running) {
    let host = TestHost::new();
    let env = host.env().await;
    let running = host.engine.run(scenario::listeners(env.id(), options)).await.unwrap();
    let sheet = env.create_sheet("people").await.unwrap();
    let (rows, expected_invalid) = scenario::sample_records(records);
    env.insert_records(&sheet.id, rows).await.unwrap();
    (Scenario { host, env, sheet: sheet.id, expected_invalid }, running)
}

pub async fn seeds_scenario_with_native_listeners() {
    let (s, running) = scenario_setup(10_000, Options::default()).await;
    let job = s.env.create_job(NewJob::sheet(scenario::OPERATION, &s.sheet)).await.unwrap();
    let job = until_terminal(&s.env, &job.id).await;
    running.shutdown().await;

    assert_eq!(job.status, JobStatus::Complete, "{:?}", job.outcome);
    let parts = s.env.parts(&job.id).await.unwrap();
    assert_eq!(parts.len(), 10);
    assert!(parts.iter().all(|p| p.status == JobStatus::Complete));
    let pc = events_of(&s.env, &job.id, "job:parts-completed").await;
    assert_eq!(pc.len(), 1);
    assert_eq!(pc[0].payload["parts"], json!({"total": 10, "completed": 10, "failed": 0, "canceled": 0}));
    let counts = s.env.record_counts(&s.sheet).await.unwrap();
    assert_eq!((counts.total, counts.error, counts.valid), (10_000, s.expected_invalid, 10_000 - s.expected_invalid));
    assert!(s.expected_invalid > 1000, "the sample has invalid rows");
    assert_eq!(job.outcome["parts"]["completed"], json!(10));
    assert_eq!(job.outcome["records"]["error"], json!(s.expected_invalid));
    // The parent went through the seeds' acks.
    let updates: Vec<Option<String>> = events_of(&s.env, &job.id, "job:updated")
        .await
        .into_iter()
        .map(|e| e.payload["info"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(updates, [Some("Splitting Job".to_owned()), Some("Job split into 10 parts.".to_owned())]);

    // Invalid cells carry their messages; the page of every part was really read.
    let page = s.env.records(&s.sheet, 1000, 1).await.unwrap();
    let r3 = &page.records[3];
    assert!(!r3.valid);
    assert!(!r3.values["email"].valid);
    assert!(r3.values["email"].messages[0].message.contains("not an email"));
    assert!(r3.values["firstName"].valid);
    let total_invalid_seen: u64 = parts.iter().map(|p| p.outcome["invalid"].as_u64().unwrap()).sum();
    assert_eq!(total_invalid_seen, s.expected_invalid);
    assert_eq!(s.env.dead_letters().await.unwrap().len(), 0);
    let stats = s.host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.pending, stats.leased, stats.dead), (0, 0, 0));
}

pub async fn seeds_scenario_with_failed_and_canceled_parts_fails_the_parent() {
    let options = Options { fail_parts: HashSet::from([2, 5]), skip_parts: HashSet::from([7, 8]) };
    let (s, running) = scenario_setup(10_000, options).await;
    let job = s.env.create_job(NewJob::sheet(scenario::OPERATION, &s.sheet)).await.unwrap();
    // Wait until the eight handled parts ended, then cancel the two the listener leaves alone.
    let engine = s.host.engine.clone();
    let parts = super::wait_for(&engine, "the eight handled parts ending", || {
        let (env, id) = (s.env.clone(), job.id.clone());
        async move {
            let parts = env.parts(&id).await?;
            Ok((parts.len() == 10 && parts.iter().filter(|p| p.status.is_terminal()).count() == 8).then_some(parts))
        }
    })
    .await
    .unwrap();
    for p in parts.iter().filter(|p| !p.status.is_terminal()) {
        assert_eq!(p.status, JobStatus::Ready);
        s.env.cancel(&p.id, Some("operator".into())).await.unwrap();
    }
    let job = until_terminal(&s.env, &job.id).await;
    running.shutdown().await;
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.outcome["parts"], json!({"total": 10, "completed": 6, "failed": 2, "canceled": 2}));
    assert!(job.outcome["message"].as_str().unwrap().contains("2 failed, 2 canceled"));
    assert_eq!(events_of(&s.env, &job.id, "job:parts-completed").await.len(), 1);
}

// ---------------------------------------------------------------- deliveries

pub async fn a_failing_handler_is_retried_then_succeeds() {
    let host = TestHost::new();
    let env = host.env().await;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let a = attempts.clone();
    let listener = Listener::new("flaky", env.id()).on("job:ready", move |event| {
        let a = a.clone();
        async move {
            a.lock().unwrap().push(event.attempt);
            if event.attempt < 3 {
                return Err(format!("not yet (attempt {})", event.attempt).into());
            }
            event.api.complete(event.job_id()?, Outcome::default()).await?;
            Ok(())
        }
    });
    let running = host.engine.run(vec![listener]).await.unwrap();
    let job = job_in(&env, JobStatus::Ready).await;
    let job = until_terminal(&env, &job.id).await;
    running.shutdown().await;
    assert_eq!(job.status, JobStatus::Complete);
    assert_eq!(*attempts.lock().unwrap(), [1, 2, 3]);
    assert!(env.dead_letters().await.unwrap().is_empty());
}

async fn until_dead_letter(host: &TestHost, env: &Env) -> Vec<crate::model::DeadLetter> {
    super::wait_for(&host.engine, "a dead letter", || {
        let env = env.clone();
        async move { Ok(Some(env.dead_letters().await?).filter(|d| !d.is_empty())) }
    })
    .await
    .unwrap()
}

pub async fn exhausted_deliveries_are_dead_lettered_with_the_reason() {
    let host = TestHost::with_config(EngineConfig { max_attempts: 3, ..test_config() });
    let env = host.env().await;
    let listener = Listener::new("broken", env.id()).on("job:ready", |_| async { Err("cannot parse input".into()) });
    let running = host.engine.run(vec![listener]).await.unwrap();
    let job = job_in(&env, JobStatus::Ready).await;
    let dead = until_dead_letter(&host, &env).await;
    running.shutdown().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].event.job_id(), Some(job.id.as_str()));
    assert_eq!(dead[0].subscription_id, format!("{}/broken#0", env.id()));
    assert!(dead[0].last_error.contains("cannot parse input"));
}

pub async fn a_retried_dead_letter_is_delivered_again_once() {
    let host = TestHost::with_config(EngineConfig { max_attempts: 2, ..test_config() });
    let env = host.env().await;
    let other = host.env().await;
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = fixed.clone();
    let listener = Listener::new("fixable", env.id()).on("job:ready", move |event| {
        let fixed = seen.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            if !fixed {
                return Err("not yet".into());
            }
            event.api.complete(event.job_id()?, Outcome::message("after the retry")).await?;
            Ok(())
        }
    });
    let running = host.engine.run(vec![listener]).await.unwrap();
    let job = job_in(&env, JobStatus::Ready).await;
    let dead = until_dead_letter(&host, &env).await;
    let id = dead[0].delivery_id;
    // Another environment cannot reach it; an id that is no dead letter is not found.
    assert_eq!(other.redeliver(id).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(env.redeliver(id + 1_000).await.unwrap_err().kind(), ErrorKind::NotFound);
    fixed.store(true, std::sync::atomic::Ordering::SeqCst);
    env.redeliver(id).await.unwrap();
    let job = until_terminal(&env, &job.id).await;
    running.shutdown().await;
    assert_eq!((job.status, job.outcome), (JobStatus::Complete, json!({"message": "after the retry"})));
    assert!(env.dead_letters().await.unwrap().is_empty());
    // Retried once: a second retry finds no dead letter.
    assert_eq!(env.redeliver(id).await.unwrap_err().kind(), ErrorKind::NotFound);
}

pub async fn listings_filter_count_and_page_within_an_environment() {
    use crate::store::JobQuery;
    let host = TestHost::new();
    let env = host.env().await;
    let other = host.env().await;
    other.create_job(NewJob::new(JobType::Space, "work")).await.unwrap();
    let mut made = Vec::new();
    for i in 0..5 {
        let op = if i % 2 == 0 { "even" } else { "odd" };
        made.push(env.create_job(NewJob::new(JobType::File, op)).await.unwrap());
    }
    env.create_job(NewJob::new(JobType::Space, "even").trigger(Trigger::Manual)).await.unwrap();
    let parent = made[4].clone();
    env.ack(&parent.id, Ack::default()).await.unwrap();
    env.split(&parent.id, Split::count(4)).await.unwrap();
    let parts = env.parts(&parent.id).await.unwrap();
    env.ack(&parts[1].id, Ack::default()).await.unwrap();
    env.fail(&parts[1].id, Outcome::message("no")).await.unwrap();
    env.cancel(&parts[3].id, None).await.unwrap();

    let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    // Newest first: the manual job, the four parts (made by the split), then made[4..0].
    let all = ids(env.find_jobs(JobQuery::default(), 0, 100).await.unwrap());
    assert_eq!(all.len(), 10, "{all:?}");
    assert_eq!(all[6..], [made[3].id.clone(), made[2].id.clone(), made[1].id.clone(), made[0].id.clone()]);
    assert_eq!(ids(env.find_jobs(JobQuery::default(), 7, 2).await.unwrap()), [made[2].id.clone(), made[1].id.clone()]);
    // Parts carry their parent's type and operation; `top_level` leaves them out.
    let file_even = JobQuery { kind: Some(JobType::File), operation: Some("even".into()), ..JobQuery::default() };
    assert_eq!(env.find_jobs(file_even.clone(), 0, 100).await.unwrap().len(), 7);
    let file_even = JobQuery { top_level: true, ..file_even };
    assert_eq!(
        ids(env.find_jobs(file_even.clone(), 0, 100).await.unwrap()),
        [made[4].id.clone(), made[2].id.clone(), made[0].id.clone()]
    );
    let created = JobQuery { statuses: vec![JobStatus::Created], ..JobQuery::default() };
    assert_eq!(env.find_jobs(created, 0, 100).await.unwrap()[0].operation, "even");
    // Time range: nothing before the first job, everything from it on.
    let from = JobQuery { created_from: Some(made[0].created_at), ..JobQuery::default() };
    assert_eq!(env.find_jobs(from, 0, 100).await.unwrap().len(), 10);
    let before = JobQuery { created_before: Some(made[0].created_at), ..JobQuery::default() };
    assert!(env.find_jobs(before, 0, 100).await.unwrap().is_empty());
    // A parent's parts come by index; their counts ignore the status filter.
    let of_parent = JobQuery { parent: Some(parent.id.clone()), ..JobQuery::default() };
    assert_eq!(ids(env.find_jobs(of_parent.clone(), 0, 100).await.unwrap()), ids(parts.clone()));
    let failed_parts = JobQuery { statuses: vec![JobStatus::Failed, JobStatus::Canceled], ..of_parent.clone() };
    assert_eq!(
        ids(env.find_jobs(failed_parts.clone(), 0, 100).await.unwrap()),
        [parts[1].id.clone(), parts[3].id.clone()]
    );
    assert_eq!(
        env.count_jobs(failed_parts).await.unwrap(),
        [(JobStatus::Canceled, 1), (JobStatus::Failed, 1), (JobStatus::Ready, 2)]
    );
    assert_eq!(
        env.part_statuses(&parent.id).await.unwrap(),
        [JobStatus::Ready, JobStatus::Failed, JobStatus::Ready, JobStatus::Canceled]
    );
    let counts: u64 = env.count_jobs(JobQuery::default()).await.unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(counts, 10);
    assert_eq!(env.count_jobs(file_even).await.unwrap(), [(JobStatus::Executing, 1), (JobStatus::Ready, 2)]);
    // Another environment's parent is not found; its jobs are not counted here.
    assert_eq!(other.part_statuses(&parent.id).await.unwrap_err().kind(), ErrorKind::NotFound);
    let theirs = JobQuery { parent: Some(parent.id.clone()), ..JobQuery::default() };
    assert_eq!(other.find_jobs(theirs, 0, 10).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(other.count_jobs(JobQuery::default()).await.unwrap(), [(JobStatus::Ready, 1)]);
    // The newest event's seq: the last one listed.
    let last = super::all_events(&env).await.last().map(|e| e.seq).unwrap();
    assert_eq!(env.last_event_seq().await.unwrap(), last);
    let fresh = host.env().await;
    assert_eq!(fresh.last_event_seq().await.unwrap(), 0);
    // Sheets, newest first, this environment's only.
    let a = env.create_sheet("a").await.unwrap();
    let b = env.create_sheet("b").await.unwrap();
    other.create_sheet("theirs").await.unwrap();
    let sheets: Vec<_> = env.sheets(0, 10).await.unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(sheets, [b.id.clone(), a.id.clone()]);
    assert_eq!(env.sheets(1, 10).await.unwrap()[0].id, a.id);
}

pub async fn a_handler_that_outlives_its_lease_gets_the_event_again() {
    let host = TestHost::with_config(EngineConfig { lease: Duration::from_millis(200), ..test_config() });
    let env = host.env().await;
    let listener = Listener::new("slow-once", env.id()).on("job:ready", |event| async move {
        if event.attempt == 1 {
            std::future::pending::<()>().await;
        }
        event.api.complete(event.job_id()?, Outcome::message(format!("attempt {}", event.attempt))).await?;
        Ok(())
    });
    let running = host.engine.run(vec![listener]).await.unwrap();
    let job = job_in(&env, JobStatus::Ready).await;
    let job = until_terminal(&env, &job.id).await;
    running.shutdown().await;
    assert_eq!(job.outcome, json!({"message": "attempt 2"}));
}

pub async fn a_panicking_handler_fails_only_its_delivery() {
    let host = TestHost::new();
    let env = host.env().await;
    let listener = Listener::new("panics-once", env.id()).on("job:ready", |event| async move {
        assert!(event.attempt > 1, "first attempt panics");
        event.api.complete(event.job_id()?, Outcome::default()).await?;
        Ok(())
    });
    let running = host.engine.run(vec![listener]).await.unwrap();
    let job = job_in(&env, JobStatus::Ready).await;
    assert_eq!(until_terminal(&env, &job.id).await.status, JobStatus::Complete);
    running.shutdown().await;
}

pub async fn events_stored_while_a_listener_is_down_are_delivered_when_it_returns() {
    let host = TestHost::new();
    let env = host.env().await;
    let make = |env: &Env| {
        Listener::new("late", env.id()).on("job:ready", |event| async move {
            event.api.complete(event.job_id()?, Outcome::default()).await?;
            Ok(())
        })
    };
    host.engine.run(vec![make(&env)]).await.unwrap().shutdown().await;
    let job = job_in(&env, JobStatus::Ready).await;
    assert_eq!(host.engine.delivery_stats().await.unwrap().pending, 1);
    let running = host.engine.run(vec![make(&env)]).await.unwrap();
    assert_eq!(until_terminal(&env, &job.id).await.status, JobStatus::Complete);
    running.shutdown().await;
}

pub async fn listeners_only_see_their_environment_and_their_filter() {
    let host = TestHost::new();
    let (a, b) = (host.env().await, host.env().await);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let listener = Listener::new("only-a-parts", a.id()).filter(json!({"isPart": true, "job": "space:*"}), move |f| {
        f.on("job:*", move |event| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(format!("{} {}", event.event.topic, event.job_id()?));
                Ok(())
            }
        })
    });
    let running = host.engine.run(vec![listener]).await.unwrap();
    let pa = executing_parent(&a).await;
    let pb = executing_parent(&b).await;
    a.split(&pa.id, Split::count(1)).await.unwrap();
    b.split(&pb.id, Split::count(1)).await.unwrap();
    let part = a.parts(&pa.id).await.unwrap().remove(0);
    a.complete(&part.id, Outcome::default()).await.unwrap();
    super::wait_for(&host.engine, "three events seen by the listener", || {
        let s = seen.clone();
        async move { Ok((s.lock().unwrap().len() == 3).then_some(())) }
    })
    .await
    .unwrap();
    running.shutdown().await;
    let got = seen.lock().unwrap().clone();
    let want: HashSet<String> =
        ["job:created", "job:ready", "job:completed"].iter().map(|t| format!("{t} {}", part.id)).collect();
    assert_eq!(got.into_iter().collect::<HashSet<_>>(), want);
}

// ---------------------------------------------------------------- records

pub async fn records_insert_in_bulk_page_stably_and_count_validity() {
    let host = TestHost::new();
    let env = host.env().await;
    let sheet = env.create_sheet("big").await.unwrap();
    let (rows, invalid) = scenario::sample_records(100_000);
    assert_eq!(env.insert_records(&sheet.id, rows).await.unwrap(), 100_000);
    let counts = env.record_counts(&sheet.id).await.unwrap();
    assert_eq!((counts.total, counts.valid, counts.error), (100_000, 100_000, 0), "no messages yet");

    let mut seen = HashSet::new();
    for n in 1..=10 {
        let page = env.records(&sheet.id, 10_000, n).await.unwrap();
        assert_eq!(page.records.len(), 10_000);
        for r in &page.records {
            assert!(seen.insert(r.id.clone()), "record {} on two pages", r.id);
        }
    }
    assert!(env.records(&sheet.id, 10_000, 11).await.unwrap().records.is_empty());
    let again = env.records(&sheet.id, 7, 3).await.unwrap();
    let first = env.records(&sheet.id, 21, 1).await.unwrap();
    assert_eq!(again.records, first.records[14..21], "pages are stable slices of one order");
    assert_eq!(first.records[3].str("email"), Some("person3.example.com"));

    for (size, number) in [(0, 1), (10_001, 1), (10, 0)] {
        let err = env.records(&sheet.id, size, number).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid, "pageSize {size} pageNumber {number}");
    }
    assert!(invalid > 0);
}

pub async fn record_updates_merge_values_replace_messages_and_derive_validity() {
    let host = TestHost::new();
    let env = host.env().await;
    let sheet = env.create_sheet("s").await.unwrap();
    let (rows, _) = scenario::sample_records(5);
    env.insert_records(&sheet.id, rows).await.unwrap();
    let page = env.records(&sheet.id, 5, 1).await.unwrap();
    let id = page.records[1].id.clone();
    let mut values = serde_json::Map::new();
    values.insert("email".into(), json!("x@y"));
    values.insert("age".into(), Value::Null);
    let changed = env
        .update_records(
            &sheet.id,
            vec![RecordUpdate { id: id.clone(), values, messages: Some(vec![Message::error("email", "bad email")]) }],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    let r = env.records(&sheet.id, 5, 1).await.unwrap().records.remove(1);
    assert_eq!(r.str("email"), Some("x@y"));
    assert_eq!(r.value("age"), None, "null clears a field");
    assert_eq!(r.str("firstName"), page.records[1].str("firstName"), "other fields kept");
    assert!(!r.valid && !r.values["email"].valid && r.values["lastName"].valid);
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().error, 1);

    // Clearing the messages makes it valid again.
    env.update_records(&sheet.id, vec![RecordUpdate { id: id.clone(), messages: Some(vec![]), ..Default::default() }])
        .await
        .unwrap();
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().error, 0);

    // One call mixing messages-only updates (what validators write, sent to the store
    // together) and a change of values applies them in the caller's order: the last wins.
    let only = |kind: &str| RecordUpdate {
        id: id.clone(),
        messages: Some(vec![Message {
            kind: if kind == "error" { MessageType::Error } else { MessageType::Warn },
            ..Message::error("email", kind)
        }]),
        ..Default::default()
    };
    let with_values = |text: &str| RecordUpdate {
        id: id.clone(),
        values: [("email".to_owned(), json!(text))].into_iter().collect(),
        messages: Some(vec![Message::error("email", text)]),
    };
    for (updates, last, invalid) in [
        (vec![only("error"), with_values("v@1"), only("warn")], "warn", false),
        (vec![only("warn"), only("error"), with_values("v@2")], "v@2", true),
    ] {
        assert_eq!(env.update_records(&sheet.id, updates).await.unwrap(), 3);
        let r = env.records(&sheet.id, 5, 1).await.unwrap().records.remove(1);
        let messages: Vec<&str> = r.values["email"].messages.iter().map(|m| m.message.as_str()).collect();
        assert_eq!(messages, [last], "{r:?}");
        assert_eq!((r.valid, env.record_counts(&sheet.id).await.unwrap().error), (!invalid, u64::from(invalid)));
    }
    assert_eq!(env.records(&sheet.id, 5, 1).await.unwrap().records[1].str("email"), Some("v@2"));
    env.update_records(&sheet.id, vec![RecordUpdate { id: id.clone(), messages: Some(vec![]), ..Default::default() }])
        .await
        .unwrap();

    // One unknown id refuses the whole call; nothing changes.
    let before = env.records(&sheet.id, 5, 1).await.unwrap();
    let events_before = all_events(&env).await.len();
    let err = env
        .update_records(
            &sheet.id,
            vec![
                RecordUpdate {
                    id: id.clone(),
                    messages: Some(vec![Message::error("email", "x")]),
                    ..Default::default()
                },
                RecordUpdate { id: "rec_999999".into(), ..Default::default() },
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(env.records(&sheet.id, 5, 1).await.unwrap(), before);
    assert_eq!(all_events(&env).await.len(), events_before);
    let err = env.update_records(&sheet.id, vec![RecordUpdate { id: "abc".into(), ..Default::default() }]).await;
    assert_eq!(err.unwrap_err().kind(), ErrorKind::Invalid);
    let err = env
        .insert_records(
            &sheet.id,
            vec![NewRecord { values: [("".to_owned(), json!(1))].into_iter().collect(), ..Default::default() }],
        )
        .await;
    assert_eq!(err.unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().total, 5);
}

/// `n` records whose one field `n` counts from 0.
fn numbered(n: u64) -> Vec<NewRecord> {
    (0..n)
        .map(|i| NewRecord { values: [("n".to_owned(), json!(i))].into_iter().collect(), ..Default::default() })
        .collect()
}

/// An update that gives record `id` an error on field `n`.
fn marked(id: &str) -> RecordUpdate {
    RecordUpdate { id: id.to_owned(), messages: Some(vec![Message::error("n", "marked")]), ..Default::default() }
}

pub async fn record_deletion_is_all_or_none_and_keeps_pages_dense() {
    let host = TestHost::new();
    let env = host.env().await;
    let sheet = env.create_sheet("s").await.unwrap();
    let other = env.create_sheet("other").await.unwrap();
    env.insert_records(&sheet.id, numbered(50)).await.unwrap();
    env.insert_records(&other.id, numbered(3)).await.unwrap();
    // Errors on two records that go (the last record among them) and on one that stays.
    let first = env.records(&sheet.id, 50, 1).await.unwrap().records;
    let marked = [7usize, 10, 49]
        .iter()
        .map(|&i| RecordUpdate {
            id: first[i].id.clone(),
            messages: Some(vec![Message::error("n", "marked")]),
            ..Default::default()
        })
        .collect();
    env.update_records(&sheet.id, marked).await.unwrap();
    let all = env.records(&sheet.id, 50, 1).await.unwrap().records;
    let n_of = |r: &crate::model::Record| r.value("n").and_then(Value::as_u64).unwrap();
    let foreign = env.records(&other.id, 3, 1).await.unwrap().records[0].id.clone();

    // Refusals change nothing: an id of another sheet, an unknown id, a malformed id.
    for bad in [foreign.as_str(), "rec_999999", "nope"] {
        let events = all_events(&env).await.len();
        let err = env.delete_records(&sheet.id, vec![all[3].id.clone(), bad.to_owned()]).await.unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::NotFound | ErrorKind::Invalid), "{bad}: {err}");
        assert_eq!(env.records(&sheet.id, 50, 1).await.unwrap().records, all, "{bad}");
        assert_eq!(all_events(&env).await.len(), events);
    }

    // The first, a run of neighbours, a lone one, the last; one id twice counts once.
    let gone = [0usize, 7, 8, 9, 20, 49];
    let mut ids: Vec<String> = gone.iter().map(|&i| all[i].id.clone()).collect();
    ids.push(all[8].id.clone());
    assert_eq!(env.delete_records(&sheet.id, ids).await.unwrap(), gone.len() as u64);
    let expect: Vec<u64> = (0..50).filter(|i| !gone.contains(&(*i as usize))).collect();
    let mut paged = Vec::new();
    for page in 1..=5 {
        let records = env.records(&sheet.id, 10, page).await.unwrap().records;
        assert_eq!(records.len(), if page == 5 { 4 } else { 10 }, "page {page} is full: the order stayed dense");
        paged.extend(records.iter().map(n_of));
    }
    assert_eq!(paged, expect, "the survivors, in their order");
    let counts = env.record_counts(&sheet.id).await.unwrap();
    assert_eq!((counts.total, counts.error), (44, 1), "a deleted record's errors go with it");
    assert_eq!(env.record_counts(&other.id).await.unwrap().total, 3, "the other sheet is untouched");
    let deleted = all_events(&env).await.into_iter().filter(|e| e.topic == "records:deleted").collect::<Vec<_>>();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].payload["recordCount"], 6);

    // Appends continue after the survivors, and deleting them all leaves an empty sheet.
    env.insert_records(&sheet.id, numbered(1)).await.unwrap();
    let last = env.records(&sheet.id, 5, 9).await.unwrap().records;
    assert_eq!(last.len(), 5, "45 records: page 9 of 5 holds 41..45");
    let appended = &last[4];
    assert!(appended.valid && appended.values["n"].messages.is_empty(), "a new record has no messages: {appended:?}");
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().error, 1);
    let every: Vec<String> = env.records(&sheet.id, 100, 1).await.unwrap().records.into_iter().map(|r| r.id).collect();
    assert_eq!(env.delete_records(&sheet.id, every).await.unwrap(), 45);
    assert_eq!(env.record_counts(&sheet.id).await.unwrap(), crate::model::RecordCounts::default());
    assert_eq!(env.delete_records(&sheet.id, vec![]).await.unwrap(), 0);
}

/// A record's id marks only a record of the sheet it names, whatever the store knows or
/// remembers: an id of another sheet is refused, and so is the id of a deleted record — even
/// when a new record of another sheet now has the same key (SQLite gives a new row the highest
/// rowid plus one, so deleting a sheet's last record frees its key for the next insert).
pub async fn a_record_id_marks_only_its_own_sheet_even_after_a_delete() {
    let host = TestHost::new();
    let env = host.env().await;
    let (a, b) = (env.create_sheet("a").await.unwrap(), env.create_sheet("b").await.unwrap());
    let mark = |id: &str| vec![marked(id)];
    env.insert_records(&a.id, numbered(3)).await.unwrap();
    let ids: Vec<String> = env.records(&a.id, 10, 1).await.unwrap().records.into_iter().map(|r| r.id).collect();
    assert_eq!(env.update_records(&a.id, mark(&ids[2])).await.unwrap(), 1);

    // The sheet's last record goes; the next record, of the other sheet, may take its key.
    env.delete_records(&a.id, vec![ids[2].clone()]).await.unwrap();
    env.insert_records(&b.id, numbered(1)).await.unwrap();
    let theirs = env.records(&b.id, 10, 1).await.unwrap().records.remove(0).id;
    for id in [&ids[2], &theirs] {
        let err = env.update_records(&a.id, mark(id)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{id} is not a record of sheet a: {err}");
    }
    let b_page = env.records(&b.id, 10, 1).await.unwrap().records;
    assert!(b_page[0].valid && b_page[0].values["n"].messages.is_empty(), "b's record is untouched: {b_page:?}");
    assert_eq!(env.record_counts(&b.id).await.unwrap().error, 0);

    // The survivors and the new record are marked as before.
    assert_eq!(env.update_records(&a.id, mark(&ids[1])).await.unwrap(), 1);
    assert_eq!(env.update_records(&b.id, mark(&theirs)).await.unwrap(), 1);
    let (ca, cb) = (env.record_counts(&a.id).await.unwrap(), env.record_counts(&b.id).await.unwrap());
    assert_eq!((ca.total, ca.error, cb.total, cb.error), (2, 1, 1, 1));
}

/// Rows and messages as a [`RowSink`](crate::store::RowSink) is handed them.
#[derive(Default)]
struct Handed {
    rows: Vec<(i64, String)>,
    messages: Vec<(i64, String)>,
}

impl crate::store::RowSink for Handed {
    fn row(&mut self, rowid: i64, values: &str, _: Option<&str>) -> crate::Result<()> {
        self.rows.push((rowid, values.to_owned()));
        Ok(())
    }

    fn messages(&mut self, at: usize, messages: &str) -> crate::Result<()> {
        self.messages.push((self.rows[at].0, messages.to_owned()));
        Ok(())
    }
}

/// A page handed to a sink row by row is the page read whole: the same rows in the same
/// order, and the messages of exactly the page's records that have any — not those of another
/// sheet's records between them, nor of the sheet's records on other pages.
pub async fn a_page_handed_row_by_row_is_the_page_read_whole() {
    let host = TestHost::new();
    let env = host.env().await;
    let (a, b) = (env.create_sheet("a").await.unwrap(), env.create_sheet("b").await.unwrap());
    // Imports of the two sheets interleave, so sheet a's keys have b's between them.
    for _ in 0..3 {
        env.insert_records(&a.id, numbered(4)).await.unwrap();
        env.insert_records(&b.id, numbered(2)).await.unwrap();
    }
    let ids = |sheet: &str| {
        let env = env.clone();
        let sheet = sheet.to_owned();
        async move { env.records(&sheet, 100, 1).await.unwrap().records.into_iter().map(|r| r.id).collect::<Vec<_>>() }
    };
    let (ours, theirs) = (ids(&a.id).await, ids(&b.id).await);
    env.update_records(&a.id, [0, 3, 4, 7, 11].iter().map(|&i| marked(&ours[i])).collect()).await.unwrap();
    env.update_records(&b.id, theirs.iter().map(|id| marked(id)).collect()).await.unwrap();
    // A record in the middle goes, so pages shift over it.
    env.delete_records(&a.id, vec![ours[5].clone()]).await.unwrap();

    for (size, pages) in [(3, 5), (11, 2), (100, 1)] {
        for number in 1..=pages {
            let whole = env.record_rows(&a.id, size, number).await.unwrap();
            let handed = env.record_page_into(&a.id, size, number, Handed::default()).await.unwrap();
            let rows: Vec<(i64, String)> = whole.iter().map(|r| (r.rowid, r.values.clone())).collect();
            assert_eq!(handed.rows, rows, "page {number} of {size}");
            let mut want: Vec<(i64, String)> =
                whole.iter().filter_map(|r| Some((r.rowid, r.messages.clone()?))).collect();
            let mut got = handed.messages;
            want.sort();
            got.sort();
            assert_eq!(got, want, "page {number} of {size}: messages");
        }
    }
    let last = env.record_page_into(&a.id, 3, 4, Handed::default()).await.unwrap();
    assert_eq!(
        (last.rows.len(), last.messages.len()),
        (2, 1),
        "11 records: the fourth page of 3 holds two, one marked"
    );
    let past = env.record_page_into(&a.id, 3, 5, Handed::default()).await.unwrap();
    assert!(past.rows.is_empty() && past.messages.is_empty());

    // The same refusals as a page read whole.
    for (size, number) in [(0, 1), (10_001, 1), (10, 0)] {
        let err = env.record_page_into(&a.id, size, number, Handed::default()).await.err().unwrap();
        assert_eq!(err.kind(), ErrorKind::Invalid, "page {number} of {size}: {err}");
    }
    let err = env.record_page_into("us_sh_nope", 10, 1, Handed::default()).await.err().unwrap();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// One update that marks many records, some of them not the sheet's: an id of another
/// sheet's record between the sheet's own (two imports interleaved; marked alone too, before
/// anything is deleted), and a deleted record's id
/// (a delete also makes the SQLite writer forget what it inserted, so the marks are read from
/// the table). All or nothing, as for one record.
pub async fn many_marks_at_once_reach_only_their_sheets_records() {
    let host = TestHost::new();
    let env = host.env().await;
    let (a, b) = (env.create_sheet("a").await.unwrap(), env.create_sheet("b").await.unwrap());
    env.insert_records(&a.id, numbered(30)).await.unwrap();
    env.insert_records(&b.id, numbered(1)).await.unwrap();
    env.insert_records(&a.id, numbered(30)).await.unwrap();
    let ids = |page: Vec<crate::model::Record>| page.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let mine = ids(env.records(&a.id, 100, 1).await.unwrap().records);
    let theirs = ids(env.records(&b.id, 10, 1).await.unwrap().records).remove(0);
    // The other sheet's record, alone, while the SQLite writer still remembers both imports.
    let err = env.update_records(&a.id, vec![marked(&theirs)]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{theirs} is not a record of sheet a: {err}");
    let gone = mine[40].clone();
    env.delete_records(&a.id, vec![gone.clone()]).await.unwrap();
    let marks = |extra: Option<&String>| -> Vec<RecordUpdate> {
        mine.iter().filter(|id| **id != gone).take(45).chain(extra).map(|id| marked(id)).collect()
    };
    for extra in [&theirs, &gone] {
        let err = env.update_records(&a.id, marks(Some(extra))).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{extra} is not a record of sheet a: {err}");
        assert_eq!(env.record_counts(&a.id).await.unwrap().error, 0, "nothing is marked");
        assert_eq!(env.record_counts(&b.id).await.unwrap().error, 0);
    }
    assert_eq!(env.update_records(&a.id, marks(None)).await.unwrap(), 45);
    let counts = env.record_counts(&a.id).await.unwrap();
    assert_eq!((counts.total, counts.error), (59, 45));
    assert_eq!(env.record_counts(&b.id).await.unwrap().error, 0);
}

pub async fn nothing_crosses_environments() {
    let host = TestHost::new();
    let (a, b) = (host.env().await, host.env().await);
    let sheet = a.create_sheet("private").await.unwrap();
    let (rows, _) = scenario::sample_records(3);
    a.insert_records(&sheet.id, rows).await.unwrap();
    let rec = a.records(&sheet.id, 3, 1).await.unwrap().records.remove(0);
    let job = job_in(&a, JobStatus::Ready).await;

    assert_eq!(b.job(&job.id).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(b.complete(&job.id, Outcome::default()).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(b.sheet(&sheet.id).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(b.record_counts(&sheet.id).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(b.records(&sheet.id, 10, 1).await.unwrap_err().kind(), ErrorKind::NotFound);
    let upd = vec![RecordUpdate {
        id: rec.id.clone(),
        messages: Some(vec![Message::error("email", "x")]),
        ..Default::default()
    }];
    assert_eq!(b.update_records(&sheet.id, upd).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(b.insert_records(&sheet.id, vec![]).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(b.delete_records(&sheet.id, vec![rec.id.clone()]).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(b.create_job(NewJob::sheet("x", &sheet.id)).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert!(b.job_events(&job.id).await.unwrap().is_empty());
    assert!(b.events(0, 100).await.unwrap().iter().all(|e| e.environment_id() == b.id()));
    assert_eq!(a.job(&job.id).await.unwrap(), job, "untouched");
    let ghost = host.engine.env("env_doesnotexist");
    assert_eq!(ghost.create_sheet("x").await.unwrap_err().kind(), ErrorKind::NotFound);
}

// ---------------------------------------------------------------- watchdog

fn watchdog_config() -> EngineConfig {
    EngineConfig {
        ack_timeout: Some(Duration::from_secs(60)),
        stale_timeout: Some(Duration::from_secs(300)),
        ..test_config()
    }
}

pub async fn watchdog_fails_unacked_and_stale_jobs_and_promotes_scheduled_ones() {
    let host = TestHost::with_config(watchdog_config());
    let env = host.env().await;
    let unacked = job_in(&env, JobStatus::Ready).await;
    let stale = job_in(&env, JobStatus::Executing).await;
    let busy = job_in(&env, JobStatus::Executing).await;
    let scheduled = env
        .create_job(NewJob {
            run_at: Some(env.engine().now() + 90_000),
            ..NewJob::new(crate::model::JobType::Space, "later")
        })
        .await
        .unwrap();
    assert_eq!(scheduled.status, JobStatus::Scheduled);

    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(host.engine.sweep().await.unwrap(), Default::default(), "nothing is overdue yet");
    env.ack(&busy.id, Ack::progress("still going", 50)).await.unwrap();

    tokio::time::advance(Duration::from_secs(2)).await;
    let report = host.engine.sweep().await.unwrap();
    assert_eq!((report.unacked, report.stale, report.promoted), (1, 0, 0));
    let j = env.job(&unacked.id).await.unwrap();
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(j.outcome["heading"], json!("Not acknowledged"));
    assert!(j.outcome["message"].as_str().unwrap().contains("within 60 s"));

    tokio::time::advance(Duration::from_secs(30)).await;
    let report = host.engine.sweep().await.unwrap();
    assert_eq!(report.promoted, 1);
    assert_eq!(env.job(&scheduled.id).await.unwrap().status, JobStatus::Ready);

    tokio::time::advance(Duration::from_secs(240)).await; // 301 s after the stale job's ack
    let report = host.engine.sweep().await.unwrap();
    assert_eq!(report.stale, 1);
    let j = env.job(&stale.id).await.unwrap();
    assert_eq!((j.status, j.outcome["heading"].as_str()), (JobStatus::Failed, Some("Stale")));
    assert_eq!(env.job(&busy.id).await.unwrap().status, JobStatus::Executing, "acked 271 s ago: not stale");
    assert_eq!(events_of(&env, &stale.id, "job:failed").await.len(), 1);
}

/// Three hosts' watchdogs sweep at once: each scheduled job becomes ready once and each
/// unacknowledged job fails once, however the sweeps interleave (no leader needed).
pub async fn watchdogs_of_many_hosts_sweeping_at_once_change_each_job_once() {
    let host = TestHost::with_config(watchdog_config());
    let (b, c) = (host.second_host(watchdog_config()), host.second_host(watchdog_config()));
    let env = host.env().await;
    let mut scheduled = Vec::new();
    let mut unacked = Vec::new();
    for _ in 0..8 {
        let later = NewJob { run_at: Some(env.engine().now() + 90_000), ..NewJob::new(JobType::Space, "later") };
        scheduled.push(env.create_job(later).await.unwrap().id);
        unacked.push(job_in(&env, JobStatus::Ready).await.id);
    }
    tokio::time::advance(Duration::from_secs(91)).await;
    let (ra, rb, rc) = tokio::join!(host.engine.sweep(), b.sweep(), c.sweep());
    let reports = [ra.unwrap(), rb.unwrap(), rc.unwrap()];
    assert_eq!(reports.iter().map(|r| r.promoted).sum::<u64>(), 8, "{reports:?}");
    assert_eq!(reports.iter().map(|r| r.unacked).sum::<u64>(), 8, "{reports:?}");
    for id in &scheduled {
        assert_eq!(env.job(id).await.unwrap().status, JobStatus::Ready);
        assert_eq!(events_of(&env, id, "job:ready").await.len(), 1, "job {id} made ready once");
    }
    for id in &unacked {
        assert_eq!(env.job(id).await.unwrap().status, JobStatus::Failed);
        assert_eq!(events_of(&env, id, "job:failed").await.len(), 1, "job {id} failed once");
    }
}

pub async fn a_split_parent_is_not_stale_while_parts_run_and_abandoned_parts_still_complete_it() {
    let host = TestHost::with_config(watchdog_config());
    let env = host.env().await;
    let parent = executing_parent(&env).await;
    env.split(&parent.id, Split::count(2)).await.unwrap();
    let parts = env.parts(&parent.id).await.unwrap();
    env.ack(&parts[0].id, Ack::default()).await.unwrap();
    tokio::time::advance(Duration::from_secs(61)).await;
    host.engine.sweep().await.unwrap();
    // Part 1 was never acked: failed. Part 0 is executing and recent.
    assert_eq!(env.job(&parts[1].id).await.unwrap().status, JobStatus::Failed);
    tokio::time::advance(Duration::from_secs(600)).await;
    host.engine.sweep().await.unwrap();
    assert_eq!(env.job(&parts[0].id).await.unwrap().status, JobStatus::Failed, "stale part");
    let pc = events_of(&env, &parent.id, "job:parts-completed").await;
    assert_eq!(pc.len(), 1);
    assert_eq!(pc[0].payload["parts"]["failed"], json!(2));
    assert_eq!(env.job(&parent.id).await.unwrap().status, JobStatus::Executing, "parts-completed restarts its clock");
    tokio::time::advance(Duration::from_secs(301)).await;
    host.engine.sweep().await.unwrap();
    assert_eq!(env.job(&parent.id).await.unwrap().status, JobStatus::Failed, "nobody finished the parent");
}

pub async fn the_background_watchdog_runs_without_being_called() {
    let host = TestHost::with_config(watchdog_config());
    let env = host.env().await;
    let running = host.engine.run(vec![]).await.unwrap();
    let job = job_in(&env, JobStatus::Ready).await;
    let job = until_status(&env, &job.id, JobStatus::Failed).await;
    running.shutdown().await;
    assert_eq!(job.outcome["heading"], json!("Not acknowledged"));
    assert!(job.finished_at.unwrap() - job.ready_at.unwrap() >= 60_000);
}

pub async fn secrets_are_scoped_to_their_environment_and_validated() {
    let host = TestHost::new();
    let (a, b) = (host.env().await, host.env().await);
    a.set_secret("API_KEY", "one").await.unwrap();
    a.set_secret("API_KEY", "two").await.unwrap();
    a.set_secret("other.name-2", "x").await.unwrap();
    assert_eq!(a.secret("API_KEY").await.unwrap(), "two", "set replaces");
    assert_eq!(a.secret_names().await.unwrap(), ["API_KEY", "other.name-2"]);
    assert_eq!(b.secret("API_KEY").await.unwrap_err().kind(), ErrorKind::NotFound, "another environment's secret");
    assert!(b.secret_names().await.unwrap().is_empty());
    for bad in ["", "has space", "x=y", &"n".repeat(129)] {
        assert_eq!(a.set_secret(bad, "v").await.unwrap_err().kind(), ErrorKind::Invalid, "{bad:?}");
    }
    assert_eq!(a.set_secret("BIG", &"v".repeat(65 << 10)).await.unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(a.secret_names().await.unwrap().len(), 2, "refused calls change nothing");
    assert!(a.delete_secret("API_KEY").await.unwrap());
    assert!(!a.delete_secret("API_KEY").await.unwrap());
    assert_eq!(a.secret("API_KEY").await.unwrap_err().kind(), ErrorKind::NotFound);
}

pub async fn secrets_are_sealed_at_rest_and_open_only_with_their_key() {
    let host = TestHost::new();
    let env = host.env().await;
    let stored = |engine: &crate::Engine, name: &'static str| {
        let (engine, id) = (engine.clone(), env.id().to_owned());
        async move { engine.store().read(move |r| r.secret(&id, name)).await.unwrap().unwrap() }
    };
    env.set_secret("API_KEY", "plain-value-123").await.unwrap();
    let sealed = stored(&host.engine, "API_KEY").await;
    assert!(!sealed.contains("plain-value-123"), "{sealed}");
    assert_eq!(crate::secrets::sealed_with(&sealed), Some(super::test_key().fingerprint()));
    assert_eq!(env.secret("API_KEY").await.unwrap(), "plain-value-123");

    // A host without a key neither reads nor stores secrets, and says why.
    let keyless = host.second_host(EngineConfig { secret_key: None, ..test_config() });
    let err = keyless.env(env.id()).secret("API_KEY").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("this host has no secret key"), "{err}");
    let err = keyless.env(env.id()).set_secret("NEW", "v").await.unwrap_err().to_string();
    assert!(err.contains("no secret key") && err.contains("jobhost secret new-key"), "{err}");
    let err = keyless.seal_secrets().await.unwrap_err().to_string();
    assert!(err.contains("holds 1 secret(s)") && err.contains(super::test_key().fingerprint()), "{err}");
    assert_eq!(env.secret_names().await.unwrap(), ["API_KEY"], "refused calls change nothing");

    // A value stored before secrets were sealed reads as it is, and is sealed at start.
    let id = env.id().to_owned();
    host.engine.store().write(move |tx| tx.put_secret(&id, "OLD", Some("legacy-plain"), 0)).await.unwrap();
    assert_eq!(env.secret("OLD").await.unwrap(), "legacy-plain");
    assert_eq!(host.engine.seal_secrets().await.unwrap(), 1);
    assert!(!stored(&host.engine, "OLD").await.contains("legacy-plain"));
    assert_eq!(env.secret("OLD").await.unwrap(), "legacy-plain");
    assert_eq!(host.engine.seal_secrets().await.unwrap(), 0, "nothing left to seal");

    // Rotation re-seals everything; the old key then names both keys instead of opening.
    let new = crate::SecretKey::generate().unwrap();
    assert_eq!(host.engine.rotate_secret_key(&new).await.unwrap(), 2);
    let err = env.secret("API_KEY").await.unwrap_err().to_string();
    assert!(err.contains(new.fingerprint()) && err.contains(super::test_key().fingerprint()), "{err}");
    assert!(host.engine.seal_secrets().await.is_err(), "the old key is refused at start");
    let rotated = host.second_host(EngineConfig { secret_key: Some(new.clone()), ..test_config() });
    let renv = rotated.env(env.id());
    assert_eq!(renv.secret("API_KEY").await.unwrap(), "plain-value-123");
    assert_eq!(renv.secret("OLD").await.unwrap(), "legacy-plain");
    assert_eq!(rotated.seal_secrets().await.unwrap(), 0);
    // Rotating from the wrong key writes nothing.
    let third = crate::SecretKey::generate().unwrap();
    assert!(host.engine.rotate_secret_key(&third).await.is_err());
    assert_eq!(renv.secret("API_KEY").await.unwrap(), "plain-value-123");
}

pub async fn retention_deletes_old_history_and_keeps_what_is_still_in_use() {
    use crate::model::{Execution, ExecutionOutcome};
    let host = TestHost::with_config(EngineConfig { max_attempts: 1, ..test_config() });
    let env = host.env().await;
    let fixed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let make = |env: &Env| {
        let fixed = fixed.clone();
        Listener::new("worker", env.id()).on("job:ready", move |event| {
            let fixed = fixed.clone();
            async move {
                let job = event.api.job(event.job_id()?).await?;
                if job.operation == "broken" && !fixed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err("broken on purpose".into());
                }
                event.api.complete(&job.id, Outcome::default()).await?;
                Ok(())
            }
        })
    };
    let running = host.engine.run(vec![make(&env)]).await.unwrap();
    let fine = env.create_job(NewJob::new(JobType::Space, "fine")).await.unwrap();
    assert_eq!(until_terminal(&env, &fine.id).await.status, JobStatus::Complete);
    let broken = env.create_job(NewJob::new(JobType::Space, "broken")).await.unwrap();
    let dead = super::wait_for(&host.engine, "the broken job's dead letter", || {
        let env = env.clone();
        async move { Ok(env.dead_letters().await?.into_iter().next()) }
    })
    .await
    .unwrap();
    running.shutdown().await;
    // A job whose job:ready waits for its listener: a pending delivery.
    let waiting = env.create_job(NewJob::new(JobType::Space, "fine")).await.unwrap();
    assert_eq!(host.engine.open_delivery_stats().await.unwrap().pending, 1);
    // Execution records: many old ones (more than a sweep's batch), then one newer than the cut.
    let now = host.engine.now();
    let env_id = env.id().to_owned();
    let exec = move |started_at| Execution {
        id: 0,
        environment_id: env_id.clone(),
        plugin: "p".into(),
        plugin_version: "v".into(),
        route: 0,
        event_id: "ev".into(),
        topic: "job:ready".into(),
        job_id: None,
        attempt: 1,
        started_at,
        duration_us: 1,
        cpu_us: 1,
        outcome: ExecutionOutcome::Ok,
        error: None,
        peak_memory: 0,
        logs: String::new(),
        http: Vec::new(),
    };
    let old_execs = 4500;
    host.engine
        .store()
        .write(move |tx| {
            for _ in 0..old_execs {
                tx.insert_execution(&exec(now - 1))?;
            }
            tx.insert_execution(&exec(now + 3_600_000))?;
            tx.charge_chain("chain-old", 3, now - 1)?;
            tx.charge_chain("chain-new", 3, now + 3_600_000)?;
            Ok(())
        })
        .await
        .unwrap();
    let events_before = super::all_events(&env).await;
    let (fine_events, broken_events, waiting_events) = [&fine.id, &broken.id, &waiting.id]
        .map(|id| events_before.iter().filter(|e| e.job_id() == Some(id)).count())
        .into();
    assert!(fine_events >= 3 && broken_events >= 2 && waiting_events == 2, "{events_before:?}");

    // Everything up to now is old.
    let cut = now + 1;
    let pruned = crate::retention::prune(&host.engine, cut).await.unwrap();
    let left = super::all_events(&env).await;
    assert!(left.iter().all(|e| e.job_id() != Some(&fine.id)), "the finished job's events went: {left:?}");
    let kept: Vec<&str> = left.iter().map(|e| e.topic.as_str()).collect();
    assert!(left.iter().any(|e| e.id == dead.event.id), "the dead letter's event stays: {kept:?}");
    assert!(left.iter().any(|e| e.job_id() == Some(&waiting.id)), "a pending delivery's event stays: {kept:?}");
    assert_eq!(pruned.events as usize, events_before.len() - left.len());
    assert_eq!(pruned.executions, old_execs);
    assert_eq!(env.executions(None, 10).await.unwrap().len(), 1, "the newer execution stays");
    assert!(pruned.chains >= 2, "the idle chains went (ours and the listener's): {pruned:?}");
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead, stats.done), (1, 1, 0), "done deliveries went, the others stay");
    assert_eq!(pruned.deliveries, 1, "the one done delivery: {pruned:?}");
    let total = host.engine.pruned_total();
    assert_eq!(total, pruned);
    // What /metrics reads: the store's size, without scans, on every backend.
    let size = host.engine.store_size().await.unwrap();
    assert!(size.bytes > 0, "{size:?}");
    let tables: Vec<&str> = size.rows.iter().map(|(t, _)| *t).collect();
    assert_eq!(tables, ["events", "deliveries", "executions"]);
    // A second sweep finds nothing more.
    assert_eq!(crate::retention::prune(&host.engine, cut).await.unwrap(), crate::retention::Pruned::default());
    // Jobs stay; the chain that is still charged keeps its count.
    assert_eq!(env.job(&fine.id).await.unwrap().status, JobStatus::Complete);
    let counts = host
        .engine
        .store()
        .write(move |tx| Ok((tx.charge_chain("chain-new", 1, now)?, tx.charge_chain("chain-old", 1, now)?)))
        .await
        .unwrap();
    assert_eq!(counts, (4, 1), "the new chain kept its count, the old one starts again");
    assert!(env.waiting(&waiting.id).await.unwrap().is_some_and(|w| w.deliveries.len() == 1));

    // The dead letter is still retried after the sweep, and its listener gets the event.
    fixed.store(true, std::sync::atomic::Ordering::Relaxed);
    env.redeliver(dead.delivery_id).await.unwrap();
    let running = host.engine.run(vec![make(&env)]).await.unwrap();
    assert_eq!(until_terminal(&env, &broken.id).await.status, JobStatus::Complete);
    assert_eq!(until_terminal(&env, &waiting.id).await.status, JobStatus::Complete);
    running.shutdown().await;
}

pub async fn a_native_listener_that_retriggers_itself_is_stopped_by_the_loop_guard() {
    let host = TestHost::with_config(EngineConfig { max_attempts: 1, max_chain_depth: 5, ..test_config() });
    let env = host.env().await;
    let listener = Listener::new("echo", env.id()).filter(json!({"job": "space:echo"}), |l| {
        l.on("job:ready", |event| async move {
            event.api.create_job(NewJob::new(JobType::Space, "echo")).await?;
            Ok(())
        })
    });
    let running = host.engine.run(vec![listener]).await.unwrap();
    let first = env.create_job(NewJob::new(JobType::Space, "echo")).await.unwrap();
    let dead = super::wait_for(&host.engine, "a dead letter from the loop guard", || {
        let env = env.clone();
        async move { Ok(env.dead_letters().await?.into_iter().next()) }
    })
    .await
    .unwrap();
    running.shutdown().await;
    assert!(dead.last_error.contains("loop guard: this call would write events at depth 6"), "{}", dead.last_error);
    let echoes: Vec<Job> = env.jobs(0, 100).await.unwrap().into_iter().filter(|j| j.operation == "echo").collect();
    assert_eq!(echoes.len(), 6, "the first job and five generations");
    // Every event of the chain names its root and depth; the API's own event starts it.
    let root = events_of(&env, &first.id, "job:ready").await.remove(0);
    assert!(root.context.get("chainId").is_none());
    let last = events_of(&env, &echoes[5].id, "job:ready").await.remove(0);
    assert_eq!(last.context["chainId"], json!(root.id));
    assert_eq!(last.context["depth"], json!(5));
}

pub async fn an_event_budget_refuses_the_call_that_would_pass_it_and_that_call_writes_nothing() {
    let host = TestHost::new();
    let env = host.env().await;
    let sheet = env.create_sheet("s").await.unwrap();
    let parent = executing_parent(&env).await;
    let budget = Arc::new(crate::EventBudget::new(6));
    let charged = env.with_event_budget(budget.clone());
    let before = all_events(&env).await.len();
    for _ in 0..3 {
        charged.insert_records(&sheet.id, scenario::sample_records(2).0).await.unwrap();
    }
    assert_eq!((budget.used(), budget.refused()), (3, false));
    // Each parallel part writes `job:created` and `job:ready`: 4 > the 3 left.
    let refused = charged.split(&parent.id, Split { parts: SplitParts::Count(2), run_in_parallel: None }).await;
    let e = refused.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Limit);
    assert!(
        e.to_string().contains(
            "this call would write 4 events after the 3 this delivery wrote; the plugin's max_events_per_delivery is 6"
        ),
        "{e}"
    );
    assert!(budget.refused());
    assert_eq!(budget.used(), 3, "a refused call is not charged");
    assert!(env.parts(&parent.id).await.unwrap().is_empty(), "the refused split made no part");
    assert_eq!(env.job(&parent.id).await.unwrap().status, JobStatus::Executing);
    assert_eq!(all_events(&env).await.len(), before + 3, "only the committed calls' events");
    // What fits still goes through, up to the budget exactly.
    for _ in 0..3 {
        charged.insert_records(&sheet.id, scenario::sample_records(1).0).await.unwrap();
    }
    assert_eq!(budget.used(), 6);
    let over = charged.insert_records(&sheet.id, scenario::sample_records(1).0).await.unwrap_err();
    assert_eq!(over.kind(), ErrorKind::Limit);
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().total, 9);
    // The same environment without the budget is not limited.
    env.insert_records(&sheet.id, scenario::sample_records(1).0).await.unwrap();
}

pub async fn a_waiting_job_says_what_it_waits_for_and_a_retry_shows_its_next_attempt() {
    let backoff = Duration::from_secs(3600);
    let host = TestHost::with_config(EngineConfig { max_attempts: 2, retry_backoff: backoff, ..test_config() });
    let env = host.env().await;
    // No listener yet: a ready job nobody acks, a manual one, a parent waiting for its parts.
    let idle = job_in(&env, JobStatus::Ready).await;
    let manual = job_in(&env, JobStatus::Created).await;
    let parent = executing_parent(&env).await;
    env.split(&parent.id, Split::count(2)).await.unwrap();
    let reason = |job: &str| {
        let (env, job) = (env.clone(), job.to_owned());
        async move { env.waiting(&job).await.unwrap().expect("an open job waits").reason }
    };
    assert!(reason(&idle.id).await.starts_with("no listener acked it"), "{}", reason(&idle.id).await);
    assert!(reason(&manual.id).await.contains("waits for an execute call"));
    assert_eq!(reason(&parent.id).await, "waiting for its parts: 0 of 2 ended");
    let done = job_in(&env, JobStatus::Complete).await;
    assert_eq!(env.waiting(&done.id).await.unwrap(), None, "an ended job waits for nothing");
    let other = host.env().await;
    assert_eq!(other.waiting(&idle.id).await.unwrap_err().kind(), ErrorKind::NotFound);

    // A listener that fails: after its first attempt the delivery backs off for an hour.
    let listener = Listener::new("broken", env.id())
        .filter(json!({"job": "space:flaky"}), |l| l.on("job:ready", |_| async { Err("cannot parse input".into()) }));
    let running = host.engine.run(vec![listener]).await.unwrap();
    let flaky = env.create_job(NewJob::new(JobType::Space, "flaky")).await.unwrap();
    let retried = super::wait_for(&host.engine, "the first attempt's failure", || {
        let (env, id) = (env.clone(), flaky.id.clone());
        async move {
            Ok(env.waiting(&id).await?.filter(|w| {
                w.deliveries.iter().any(|d| d.attempts == 1 && d.state == crate::model::DeliveryState::Pending)
            }))
        }
    })
    .await
    .unwrap();
    let d = &retried.deliveries[0];
    assert_eq!(retried.deliveries.len(), 1, "{retried:?}");
    assert_eq!((d.state, d.attempts, d.topic.as_str()), (crate::model::DeliveryState::Pending, 1, "job:ready"));
    assert_eq!(d.subscription_id, format!("{}/broken#0", env.id()));
    assert!(d.last_error.as_deref().unwrap().contains("cannot parse input"));
    let due = d.due_at.unwrap() - host.engine.now();
    assert!(due > 3_500_000 && due <= 3_600_000, "the next attempt is due an hour after the failure: {due} ms");
    assert!(
        retried.reason.starts_with(&format!("attempt 1 of {}/broken#0 on its job:ready event failed: ", env.id()))
            && retried.reason.contains("cannot parse input")
            && retried.reason.ends_with("the next attempt is due in 3600 s"),
        "{}",
        retried.reason
    );
    // The last attempt, an hour on: dead-lettered, and the job says so.
    tokio::time::pause();
    tokio::time::advance(backoff).await;
    tokio::time::resume();
    until_dead_letter(&host, &env).await;
    running.shutdown().await;
    let dead = env.waiting(&flaky.id).await.unwrap().unwrap();
    assert_eq!(dead.deliveries[0].state, crate::model::DeliveryState::Dead);
    assert_eq!(dead.deliveries[0].due_at, None);
    assert!(
        dead.reason.contains("was dead-lettered for") && dead.reason.contains("after 2 attempts"),
        "{}",
        dead.reason
    );
}
