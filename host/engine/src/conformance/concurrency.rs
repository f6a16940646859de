//! Cases that a backend passes only if its locks, fences and routing hold for many writers —
//! not because one writer thread happens to serialise everything. They run on a multi-thread
//! runtime, with several engines (hosts) on one store where it matters.
#![allow(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::{Deadline, TestHost, events_of, test_config, until_terminal};
use crate::delivery::{self, Policy};
use crate::listener::Listener;
use crate::model::{Ack, JobStatus, JobType, NewJob, Outcome, Split};
use crate::store::DeliveryEnd;

/// Several parents split at once; every part of every parent is ended by its own task, in an
/// order the scheduler picks, from two hosts. Each parent gets exactly one
/// `job:parts-completed`, with counts that match its parts.
pub async fn racing_parts_of_many_parents_fire_parts_completed_exactly_once_each() {
    let host = TestHost::new();
    let env = host.env().await;
    let second = host.second_host(test_config());
    let env2 = second.env(env.id());
    let (parents, parts_each) = (6, 40u32);
    let mut ids = Vec::new();
    for _ in 0..parents {
        let parent = env.create_job(NewJob::new(JobType::Sheet, "race")).await.unwrap();
        env.ack(&parent.id, Ack::default()).await.unwrap();
        env.split(&parent.id, Split::count(parts_each)).await.unwrap();
        ids.push(parent.id);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for parent in &ids {
        for (i, part) in env.parts(parent).await.unwrap().into_iter().enumerate() {
            let api = if i % 2 == 0 { env.clone() } else { env2.clone() };
            tasks.spawn(async move {
                if i % 5 == 0 {
                    // Acked first: two transitions of one part race the others.
                    api.ack(&part.id, Ack::default()).await?;
                }
                match i % 4 {
                    0 | 1 => api.complete(&part.id, Outcome::default()).await,
                    2 => api.fail(&part.id, Outcome::default()).await,
                    _ => api.cancel(&part.id, None).await,
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task").expect("every part ends once");
    }
    for parent in &ids {
        let fired = events_of(&env, parent, "job:parts-completed").await;
        assert_eq!(fired.len(), 1, "parent {parent}: {fired:?}");
        assert_eq!(fired[0].payload["parts"], json!({"total": 40, "completed": 20, "failed": 10, "canceled": 10}));
    }
}

/// Two hosts serve the same listener (the same subscriptions). Every delivery is handled, and
/// none by both hosts at once or twice.
pub async fn two_hosts_never_handle_one_delivery_at_once() {
    let host = TestHost::new();
    let env = host.env().await;
    let second = host.second_host(test_config());
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let handled: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let listener = |who: &'static str| {
        let (in_flight, handled) = (in_flight.clone(), handled.clone());
        Listener::new("shared", env.id()).on("job:ready", move |ctx| {
            let (in_flight, handled) = (in_flight.clone(), handled.clone());
            async move {
                let job = ctx.job_id()?.to_owned();
                assert!(in_flight.lock().unwrap().insert(job.clone()), "job {job} handled by two hosts at once");
                handled.lock().unwrap().entry(job.clone()).or_default().push(who.to_owned());
                // Yield so the other host has every chance to take the same delivery.
                tokio::task::yield_now().await;
                ctx.api.complete(&job, Outcome::default()).await?;
                in_flight.lock().unwrap().remove(&job);
                Ok(())
            }
        })
    };
    let a = host.engine.run(vec![listener("a")]).await.unwrap();
    let b = second.run(vec![listener("b")]).await.unwrap();
    let mut jobs = Vec::new();
    for i in 0..150 {
        let api = if i % 2 == 0 { env.clone() } else { second.env(env.id()) };
        jobs.push(api.create_job(NewJob::new(JobType::File, "work")).await.unwrap().id);
    }
    for id in &jobs {
        assert_eq!(until_terminal(&env, id).await.status, JobStatus::Complete);
    }
    a.shutdown().await;
    b.shutdown().await;
    let handled = std::mem::take(&mut *handled.lock().unwrap());
    for id in &jobs {
        assert_eq!(handled.get(id).map(Vec::len), Some(1), "job {id} handled by {:?}", handled.get(id));
    }
    let by_a = handled.values().filter(|w| w[0] == "a").count();
    assert!(by_a > 0 && by_a < jobs.len(), "both hosts took deliveries ({by_a} of {} by a)", jobs.len());
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.pending, stats.leased, stats.dead), (0, 0, 0));
}

/// Host A leases a delivery and goes quiet; its lease expires and host B takes the delivery
/// (attempt 2) and ends it. A's late answer — success or failure — is refused, and B's
/// outcome stands; a late `complete` of the job itself is refused by the job's status.
pub async fn a_lease_stolen_after_expiry_refuses_the_late_answer() {
    let host = TestHost::new();
    let env = host.env().await;
    let store = host.engine.store().clone();
    let sub = Listener::subscription_id(env.id(), "l", "0");
    let s = crate::store::Subscription {
        id: sub.clone(),
        environment_id: env.id().into(),
        topic: "job:ready".into(),
        filter: serde_json::Value::Null,
    };
    store.write(move |tx| tx.put_subscription(&s, true, 0)).await.unwrap();
    let job = env.create_job(NewJob::new(JobType::File, "work")).await.unwrap();
    let policy = Policy { lease_ms: 1_000, max_attempts: 5, backoff_ms: 10 };
    let now = host.engine.now();
    let subs = vec![sub];
    let lease_as = |owner: &'static str, at: i64| {
        let (store, subs) = (store.clone(), subs.clone());
        async move { store.write(move |tx| delivery::lease(tx, &subs, owner, at, 10, policy, &mut |_| true)).await.unwrap() }
    };
    let a = lease_as("host_a", now).await;
    assert_eq!(a.len(), 1);
    assert!(lease_as("host_b", now + 999).await.is_empty(), "a live lease is not handed out");
    let b = lease_as("host_b", now + 1_000).await;
    assert_eq!((b.len(), b[0].fence.attempt, b[0].delivery_id), (1, 2, a[0].delivery_id));
    // B completes the job and ends its delivery.
    env.ack(&job.id, Ack::default()).await.unwrap();
    env.complete(&job.id, Outcome::default()).await.unwrap();
    let (id, fb, fa) = (b[0].delivery_id, b[0].fence.clone(), a[0].fence.clone());
    assert!(store.write(move |tx| tx.finish_delivery(id, Some(&fb), &DeliveryEnd::Done, now + 1_100)).await.unwrap());
    // A wakes up: its job call is refused by the job's status, its delivery answer by the fence.
    let late = env.complete(&job.id, Outcome::default()).await.unwrap_err();
    assert!(late.is_already_terminal(), "{late}");
    let failed = policy.after_failure(fa.attempt, "late".into(), now + 1_200);
    let (fa2, failed2) = (fa.clone(), failed.clone());
    assert!(!store.write(move |tx| tx.finish_delivery(id, Some(&fa2), &failed2, now + 1_200)).await.unwrap());
    assert!(!store.write(move |tx| tx.release_delivery(id, &fa, now + 1_200)).await.unwrap());
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.done, stats.pending, stats.leased), (1, 0, 0), "B's outcome stands");
    assert_eq!(events_of(&env, &job.id, "job:completed").await.len(), 1, "the job completed once");
}

/// A subscription written through one host routes the events another host writes, even when
/// that host had routed events (and cached its routes) before.
pub async fn routing_sees_subscriptions_written_by_another_host() {
    let host = TestHost::new();
    let env = host.env().await;
    // The first host routes an event while nothing is subscribed: its cache is warm and empty.
    env.create_job(NewJob::new(JobType::File, "before")).await.unwrap();
    let second = host.second_host(test_config());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let listener = Listener::new("late", env.id()).on("job:ready", move |ctx| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(ctx.job_id()?.to_owned());
            Ok(())
        }
    });
    let running = second.run(vec![listener]).await.unwrap();
    // Written through the first host, which must see the second host's subscription.
    let job = env.create_job(NewJob::new(JobType::File, "after")).await.unwrap();
    let engine = host.engine.clone();
    super::wait_for(&engine, "the listener on the second host seeing the job", || {
        let (seen, id) = (seen.clone(), job.id.clone());
        async move { Ok(seen.lock().unwrap().contains(&id).then_some(())) }
    })
    .await
    .unwrap();
    running.shutdown().await;
    assert_eq!(seen.lock().unwrap().len(), 1, "the job from before the subscription is not delivered");
}

/// A host that stops heartbeating is gone: another host's watchdog hands its leases out again
/// long before they expire, and removes its registration.
pub async fn the_leases_of_a_host_that_stopped_heartbeating_are_handed_out_again() {
    let host = TestHost::with_config(crate::EngineConfig { lease: Duration::from_secs(3600), ..test_config() });
    let store = host.engine.store().clone();
    let env = host.env().await;
    let now = host.engine.now();
    let (sub, id) = {
        let sub = crate::store::Subscription {
            id: Listener::subscription_id(env.id(), "l", "0"),
            environment_id: env.id().into(),
            topic: "job:ready".into(),
            filter: serde_json::Value::Null,
        };
        let s = sub.clone();
        store.write(move |tx| tx.put_subscription(&s, true, now)).await.unwrap();
        let job = env.create_job(NewJob::new(JobType::File, "work")).await.unwrap();
        let now = job.created_at;
        let subs = vec![sub.id.clone()];
        let policy = Policy { lease_ms: 3_600_000, max_attempts: 5, backoff_ms: 10 };
        let leased = store
            .write(move |tx| delivery::lease(tx, &subs, "host_quiet", now, 10, policy, &mut |_| true))
            .await
            .unwrap();
        (sub, leased[0].delivery_id)
    };
    let quiet =
        crate::store::HostRecord { id: "host_quiet".into(), label: "quiet".into(), started_at: now, heartbeat_at: now };
    store.write(move |tx| tx.heartbeat(&quiet)).await.unwrap();
    let timeout = test_config().host_timeout.as_millis() as i64;
    // Not yet gone: a sweep leaves its lease alone.
    let me = host.engine.host_id();
    let (m, s2) = (me.clone(), store.clone());
    let early = s2
        .write(move |tx| {
            crate::watchdog::reclaim_gone_hosts(tx, std::slice::from_ref(&m), now + timeout - 1, Some(timeout))
        })
        .await
        .unwrap();
    assert_eq!(early, 0);
    let late = store
        .write(move |tx| {
            crate::watchdog::reclaim_gone_hosts(tx, std::slice::from_ref(&me), now + timeout + 1, Some(timeout))
        })
        .await
        .unwrap();
    assert_eq!(late, 1);
    let hosts: Vec<String> = store.read(|r| r.hosts()).await.unwrap().into_iter().map(|h| h.id).collect();
    assert!(!hosts.contains(&"host_quiet".to_owned()), "{hosts:?}");
    let due =
        store.write(move |tx| tx.due_deliveries(std::slice::from_ref(&sub.id), now + timeout + 1, 10)).await.unwrap();
    assert_eq!(due.iter().map(|d| d.delivery_id).collect::<Vec<_>>(), [id]);
}

/// Listener `slow` of `env`, which acks and completes each `job:ready` once let through: the
/// listener, a receiver told when a handler is entered, and the gate that lets one through.
fn gated(env: &str) -> (Listener, tokio::sync::mpsc::UnboundedReceiver<()>, Arc<tokio::sync::Notify>) {
    let (entered_tx, entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let slow = Listener::new("slow", env).on("job:ready", move |ctx| {
        let (entered_tx, gate) = (entered_tx.clone(), gate.clone());
        async move {
            let _ = entered_tx.send(());
            gate.notified().await;
            ctx.api.ack(ctx.job_id()?, Ack::default()).await?;
            ctx.api.complete(ctx.job_id()?, Outcome::default()).await?;
            Ok(())
        }
    });
    (slow, entered, release)
}

/// Waits, under a [`Deadline`], until a handler of the [`gated`] listener is entered.
async fn handler_entered(entered: &mut tokio::sync::mpsc::UnboundedReceiver<()>) {
    let _deadline = Deadline::new("host A entering the gated listener's handler");
    entered.recv().await.expect("host A took the delivery");
}

/// Whether host `id` is registered in `engine`'s store.
async fn registered(engine: &crate::Engine, id: &str) -> bool {
    let id = id.to_owned();
    engine.store().write(move |tx| Ok(tx.hosts()?.iter().any(|h| h.id == id))).await.unwrap()
}

/// A host that starts on a store others already serve takes none of their leases: host A is
/// in the middle of a delivery when host B starts; A's lease survives B's start, and A's
/// answer is applied.
pub async fn a_starting_host_never_takes_the_leases_of_a_live_host() {
    let host = TestHost::new();
    let env = host.env().await;
    let (slow, mut entered, release) = gated(env.id());
    let a = host.engine.run(vec![slow]).await.unwrap();
    let job = env.create_job(NewJob::new(JobType::File, "work")).await.unwrap();
    handler_entered(&mut entered).await;
    let second = host.second_host(test_config());
    let b = second.run(Vec::new()).await.unwrap();
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.leased, stats.pending), (1, 0), "host B's start left host A's lease alone");
    release.notify_one();
    assert_eq!(until_terminal(&env, &job.id).await.status, JobStatus::Complete);
    a.shutdown().await;
    b.shutdown().await;
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.done, stats.leased, stats.pending), (1, 0, 0), "A's answer was applied");
}

/// Host A is stopping while a handler of its own is still running, and another host's
/// watchdog sweeps meanwhile: A stays registered, so its lease is not handed on, until the
/// handler has answered and the answer is written; only then does A leave.
pub async fn a_stopping_host_keeps_its_leases_until_its_handlers_have_answered() {
    let host = TestHost::new();
    let env = host.env().await;
    let (slow, mut entered, release) = gated(env.id());
    let a = Arc::new(host.engine.run(vec![slow]).await.unwrap());
    let job = env.create_job(NewJob::new(JobType::File, "work")).await.unwrap();
    handler_entered(&mut entered).await;
    let other = host.second_host(test_config());
    let stopping = tokio::spawn({
        let a = a.clone();
        async move { a.shutdown().await }
    });
    let a_id = host.engine.host_id();
    // Each sweep is a write, queued behind whatever A wrote once told to stop.
    for round in 0..20 {
        other.sweep().await.unwrap();
        assert!(
            registered(&host.engine, &a_id).await,
            "round {round}: host A left while its handler was still running"
        );
        let stats = host.engine.delivery_stats().await.unwrap();
        assert_eq!((stats.leased, stats.pending), (1, 0), "round {round}: A's lease was handed on");
    }
    release.notify_one();
    {
        let _deadline = Deadline::new("host A stopping once its handler answered");
        stopping.await.expect("A stopped");
    }
    assert_eq!(until_terminal(&env, &job.id).await.status, JobStatus::Complete);
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.done, stats.leased, stats.pending), (1, 0, 0), "A's answer was applied");
    assert!(!registered(&host.engine, &a_id).await, "host A is still registered after it stopped");
}

/// Hosts that start together on one store and ask for the environment of one name (as
/// `jobhost serve --environment default` does) all get the same one, and only one is stored.
pub async fn hosts_asking_for_one_named_environment_at_once_get_the_same_one() {
    let host = TestHost::new();
    let others: Vec<_> = (0..3).map(|_| host.second_host(test_config())).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for engine in others.iter().chain([&host.engine]) {
        for _ in 0..4 {
            let engine = engine.clone();
            tasks.spawn(async move { engine.environment_named("shared").await });
        }
    }
    let mut ids = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        ids.insert(r.expect("task").expect("environment").id);
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let named = host.engine.environments().await.unwrap().into_iter().filter(|e| e.name == "shared").count();
    assert_eq!(named, 1);
}
