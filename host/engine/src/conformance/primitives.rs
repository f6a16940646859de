//! Every primitive of the store boundary, called directly: what the engine relies on a backend
//! to do, one rule per case.
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};

use super::TestHost;
use crate::error::{Error, StoreError};
use crate::model::{Environment, Event, JobStatus, JobType, Millis, NewJob, Sheet, new_id};
use crate::store::{
    Backend, DeliveryEnd, Fence, History, HostRecord, Notifications, PartStatusCounts, ReadOp, Store, Subscription, Tx,
    WriteOp,
};

/// An environment and a subscription to every event of it, committed: their ids.
async fn subscribed(store: &Store, now: Millis) -> (String, String) {
    store
        .write(move |tx| {
            let env = Environment { id: new_id("env"), name: "p".into(), created_at: now };
            tx.insert_environment(&env)?;
            let sub = everything(&env.id, "l");
            tx.put_subscription(&sub, true, now)?;
            Ok((env.id, sub.id))
        })
        .await
        .expect("an environment and a subscription")
}

/// Listener `listener`'s subscription to every event of `env`.
fn everything(env: &str, listener: &str) -> Subscription {
    Subscription {
        id: format!("{env}/{listener}#0"),
        environment_id: env.into(),
        topic: "**".into(),
        filter: Value::Null,
    }
}

/// Stores `event` with a pending delivery to each of `subscriptions`, due at `due_at`, as the
/// engine's routing does: its key.
fn with_deliveries(tx: &mut dyn Tx, event: Event, subscriptions: &[&str], due_at: Millis) -> Result<i64, Error> {
    let seq = tx.insert_event(&event)?;
    tx.insert_deliveries(seq, event, subscriptions, due_at)?;
    Ok(seq)
}

/// An environment, a subscription to every event of it, and one event with a pending delivery:
/// the delivery's id.
async fn one_delivery(store: &Store, now: Millis) -> (String, i64) {
    let (env, sub) = subscribed(store, now).await;
    let s = sub.clone();
    store
        .write(move |tx| {
            let event = Event {
                id: new_id("evt"),
                seq: 0,
                topic: "job:ready".into(),
                context: json!({ "environmentId": env }),
                payload: json!({}),
                created_at: now,
            };
            with_deliveries(tx, event, &[s.as_str()], now).map(drop)
        })
        .await
        .expect("one delivery");
    // Looked for once committed: a backend may give an event its place in the stream only at
    // commit, and deliveries of events without one are not due yet.
    store
        .write(move |tx| {
            let due = tx.due_deliveries(std::slice::from_ref(&sub), now, 10)?;
            assert_eq!(due.len(), 1, "the committed delivery is due");
            Ok((sub.clone(), due[0].delivery_id))
        })
        .await
        .expect("the delivery is due")
}

fn fence(owner: &str, attempt: u32) -> Fence {
    Fence { owner: owner.into(), attempt }
}

pub async fn a_refused_write_keeps_nothing_and_leaves_the_writes_beside_it() {
    let host = TestHost::new();
    let env = host.env().await;
    let store = host.engine.store().clone();
    let sheet = |name: &'static str, env: String| Sheet {
        id: format!("sh_{name}"),
        environment_id: env,
        name: name.into(),
        workbook_id: None,
        created_at: 1,
    };
    let (e1, e2) = (env.id().to_owned(), env.id().to_owned());
    let (s1, s2) = (store.clone(), store.clone());
    // Submitted together, so a backend that commits in groups commits them in one group.
    let (refused, kept) = tokio::join!(
        s1.write(move |tx| {
            tx.insert_sheet(&sheet("refused", e1.clone()))?;
            Err::<(), _>(Error::invalid("refused after writing"))
        }),
        s2.write(move |tx| tx.insert_sheet(&sheet("kept", e2.clone()))),
    );
    assert!(matches!(refused, Err(Error::Invalid(_))), "{refused:?}");
    kept.expect("the other write commits");
    assert_eq!(env.sheet("sh_refused").await.unwrap_err().kind(), crate::ErrorKind::NotFound);
    assert_eq!(env.sheet("sh_kept").await.unwrap().name, "kept");
}

/// A backend whose writes go through `change` (which submits each to the real backend, altered
/// as a case needs) and whose reads and notifications are the real backend's.
struct Intercept<F> {
    inner: Arc<dyn Backend>,
    change: F,
}

impl<F: Fn(&dyn Backend, WriteOp) + Send + Sync + 'static> Backend for Intercept<F> {
    fn submit_write(&self, op: WriteOp) {
        (self.change)(&*self.inner, op)
    }

    fn submit_read(&self, op: ReadOp) {
        self.inner.submit_read(op)
    }

    fn notifications(&self) -> Notifications {
        self.inner.notifications()
    }

    fn exclusive(&self) -> bool {
        self.inner.exclusive()
    }
}

/// A backend that fails the first `fail` attempts of every write with a retryable error after
/// running it (and throws its changes away): what a serialization failure looks like. Also
/// returns the count of attempts.
fn flaky(inner: Arc<dyn Backend>, fail: u32) -> (Arc<dyn Backend>, Arc<AtomicU32>) {
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    let backend = Arc::new(Intercept {
        inner,
        change: move |inner: &dyn Backend, op: WriteOp| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            if n % (fail + 1) == fail {
                return inner.submit_write(op);
            }
            let WriteOp { mut run, reply } = op;
            inner.submit_write(WriteOp {
                run: Box::new(move |tx: &mut dyn Tx| {
                    run(tx);
                    false
                }),
                reply: Box::new(move |_| {
                    reply(Err(Error::Store(StoreError::new("could not serialize access").retryable(true))))
                }),
            });
        },
    });
    (backend, attempts)
}

/// Many writes at once, one of them refused in the middle: whatever a backend does to undo the
/// refused one (a savepoint, or rolling back the batch and running the others again), every
/// other write is applied exactly once.
pub async fn a_refused_write_among_many_leaves_each_other_applied_once() {
    let host = TestHost::new();
    let env = host.env().await;
    let store = host.engine.store().clone();
    let before = store.backend().write_stats();
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..24usize {
        let (store, env_id) = (store.clone(), env.id().to_owned());
        writes.spawn(async move {
            let r = store
                .write(move |tx| {
                    // An insert of a fixed id: applying it twice would fail on the key.
                    tx.insert_sheet(&Sheet {
                        id: format!("sh_many_{i}"),
                        environment_id: env_id.clone(),
                        name: format!("n{i}"),
                        workbook_id: None,
                        created_at: 1,
                    })?;
                    if i == 11 {
                        return Err(Error::invalid("refused after writing"));
                    }
                    Ok(())
                })
                .await;
            (i, r)
        });
    }
    let mut results: Vec<_> = writes.join_all().await;
    results.sort_by_key(|(i, _)| *i);
    for (i, r) in &results {
        let i = *i;
        if i == 11 {
            assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
            assert_eq!(env.sheet("sh_many_11").await.unwrap_err().kind(), crate::ErrorKind::NotFound);
        } else {
            assert!(r.is_ok(), "write {i}: {r:?}");
            assert_eq!(env.sheet(&format!("sh_many_{i}")).await.unwrap().name, format!("n{i}"));
        }
    }
    // The writers' own counts: every write answered in a committed transaction, at least one
    // transaction for them and none per write more than there were writes, and the refused
    // write sent its batch through the careful path.
    let after = store.backend().write_stats();
    let (writes, transactions) = (after.writes - before.writes, after.transactions - before.transactions);
    assert!(writes >= 24, "{before:?} → {after:?}");
    assert!(transactions >= 1 && transactions <= writes, "{before:?} → {after:?}");
    assert!(after.careful_batches > before.careful_batches, "{before:?} → {after:?}");
    if let (Some(a), Some(b)) = (after.rows, before.rows) {
        assert!(a - b >= 23, "23 sheets inserted and kept: {before:?} → {after:?}");
    }
}

/// The loop guard's totals count only charges whose writes were kept — whether a refused
/// write ran alone or in a group with others, and whatever a backend remembers between writes.
pub async fn a_chain_counts_only_the_charges_that_were_kept() {
    let host = TestHost::new();
    let store = host.engine.store().clone();
    let charge = |chain: &'static str, events: u64, refuse: bool| {
        let store = store.clone();
        async move {
            store
                .write(move |tx| {
                    let total = tx.charge_chain(chain, events, 1)?;
                    if refuse {
                        return Err(Error::invalid(format!("refused at {total}")));
                    }
                    Ok(total)
                })
                .await
        }
    };
    assert_eq!(charge("chain-a", 2, false).await.unwrap(), 2, "a new chain starts at its first charge");
    let refused = charge("chain-a", 3, true).await.unwrap_err();
    assert_eq!(refused.to_string(), Error::invalid("refused at 5").to_string(), "it saw its own charge");
    assert_eq!(charge("chain-a", 1, false).await.unwrap(), 3, "the refused charge is not counted");
    assert_eq!(charge("chain-a", 4, false).await.unwrap(), 7);

    // Many at once, every third refused after charging: a backend that groups writes must undo
    // exactly the refused ones. A kept write sees at least its own charge and never a refused
    // one; racing writers of a backend with many (PostgreSQL's shards) may each miss the
    // others' uncommitted charges, so totals may repeat — the SQLite tests check that its one
    // writer gives each a total of its own.
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..24usize {
        let c = charge("chain-b", 1, i % 3 == 2);
        writes.spawn(async move { (i, c.await) });
    }
    let mut totals = Vec::new();
    for (i, r) in writes.join_all().await {
        match r {
            Ok(total) if i % 3 != 2 => totals.push(total),
            Err(Error::Invalid(_)) if i % 3 == 2 => {}
            other => panic!("write {i}: {other:?}"),
        }
    }
    assert_eq!(totals.len(), 16);
    assert!(totals.iter().all(|t| (1..=16).contains(t)), "no kept charge saw a refused one: {totals:?}");
    assert_eq!(charge("chain-b", 1, false).await.unwrap(), 17, "16 kept charges, then this one");
    assert_eq!(charge("chain-a", 1, false).await.unwrap(), 8, "chains count apart");
}

pub async fn a_retryable_failure_runs_the_write_again_and_applies_it_once() {
    let host = TestHost::new();
    let env = host.env().await;
    let (backend, attempts) = flaky(host.engine.store().backend().clone(), 2);
    let engine = crate::Engine::with_backend(backend, super::test_config());
    let job = engine.env(env.id()).create_job(NewJob::new(JobType::File, "parse")).await.expect("retried to success");
    assert_eq!(attempts.load(Ordering::SeqCst), 3, "two failed attempts, then the one that counts");
    let jobs = env.jobs(0, 100).await.unwrap();
    assert_eq!(jobs.len(), 1, "applied once: {jobs:?}");
    assert_eq!(jobs[0].id, job.id);
    let topics: Vec<String> = env.events(0, 100).await.unwrap().into_iter().map(|e| e.topic).collect();
    assert_eq!(topics, ["job:created", "job:ready"], "the events of one run, not three");
    // A failure that outlasts every attempt reaches the caller as what it is.
    let (hopeless, _) = flaky(host.engine.store().backend().clone(), 100);
    let engine = crate::Engine::with_backend(hopeless, super::test_config());
    let err = engine.env(env.id()).create_job(NewJob::new(JobType::File, "parse")).await.unwrap_err();
    assert!(err.is_retryable() && err.kind() == crate::ErrorKind::Internal, "{err:?}");
    assert_eq!(env.jobs(0, 100).await.unwrap().len(), 1, "nothing of the failed attempts was kept");
}

/// A backend that runs every write twice (as one that undoes a run and runs it again would),
/// the second run's panic caught and counted as discarding it.
fn run_twice(inner: Arc<dyn Backend>) -> Arc<dyn Backend> {
    Arc::new(Intercept {
        inner,
        change: |inner: &dyn Backend, op: WriteOp| {
            let WriteOp { mut run, reply } = op;
            inner.submit_write(WriteOp {
                run: Box::new(move |tx: &mut dyn Tx| {
                    run(tx);
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(tx))).unwrap_or(false)
                }),
                reply,
            });
        },
    })
}

/// A write whose first run succeeded and whose last run panicked did not happen: its caller
/// hears so, not the first run's result.
pub async fn a_write_is_answered_by_its_last_run() {
    let host = TestHost::new();
    let store = Store::new(run_twice(host.engine.store().backend().clone()));
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let result = store
        .write(move |_| {
            // Every second run fails: the backend may run the pair again, its last run fails.
            if counted.fetch_add(1, Ordering::SeqCst) % 2 == 1 {
                panic!("the second run fails");
            }
            Ok(())
        })
        .await;
    let runs = runs.load(Ordering::SeqCst);
    assert!(runs >= 2 && runs.is_multiple_of(2), "{runs} runs");
    assert!(result.is_err(), "{result:?}");
}

pub async fn leases_are_fenced_by_owner_and_attempt() {
    let host = TestHost::new();
    let store = host.engine.store().clone();
    let (_, id) = one_delivery(&store, 1_000).await;
    let ended = store
        .write(move |tx| {
            tx.lease_delivery(id, &fence("host_a", 1), 61_000)?;
            Ok((
                tx.finish_delivery(id, Some(&fence("host_b", 1)), &DeliveryEnd::Done, 2_000)?,
                tx.finish_delivery(id, Some(&fence("host_a", 2)), &DeliveryEnd::Done, 2_000)?,
                tx.release_delivery(id, &fence("host_b", 1), 2_000)?,
                tx.finish_delivery(id, Some(&fence("host_a", 1)), &DeliveryEnd::Done, 2_000)?,
                tx.finish_delivery(id, Some(&fence("host_a", 1)), &DeliveryEnd::Done, 2_000)?,
            ))
        })
        .await
        .unwrap();
    assert_eq!(ended, (false, false, false, true, false), "only the lease's own owner and attempt end it, once");
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.done, stats.leased, stats.pending), (1, 0, 0));
}

pub async fn an_expired_lease_is_due_again_and_its_old_holder_is_refused() {
    let host = TestHost::new();
    let store = host.engine.store().clone();
    let (sub, id) = one_delivery(&store, 1_000).await;
    let (due_early, due_late, late_a, late_release, b) = store
        .write(move |tx| {
            tx.lease_delivery(id, &fence("host_a", 1), 5_000)?;
            let early = tx.due_deliveries(std::slice::from_ref(&sub), 4_999, 10)?.len();
            let late = tx.due_deliveries(std::slice::from_ref(&sub), 5_000, 10)?;
            assert_eq!(late[0].attempts, 1, "the expired lease counts as an attempt");
            tx.lease_delivery(id, &fence("host_b", 2), 65_000)?;
            let late_a = tx.finish_delivery(id, Some(&fence("host_a", 1)), &DeliveryEnd::Done, 6_000)?;
            let late_release = tx.release_delivery(id, &fence("host_a", 1), 6_000)?;
            let retry = DeliveryEnd::Retry { due_at: 7_000, error: "b failed".into() };
            let b = tx.finish_delivery(id, Some(&fence("host_b", 2)), &retry, 6_000)?;
            Ok((early, late.len(), late_a, late_release, b))
        })
        .await
        .unwrap();
    assert_eq!((due_early, due_late), (0, 1), "due exactly when the lease expires");
    assert!(!late_a && !late_release, "the old holder's answer changes nothing");
    assert!(b, "the current holder's answer is applied");
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.pending, stats.leased, stats.done), (1, 0, 0), "retried as the current holder said");
}

pub async fn a_released_delivery_is_due_at_once_without_spending_an_attempt() {
    let host = TestHost::new();
    let store = host.engine.store().clone();
    let (sub, id) = one_delivery(&store, 1_000).await;
    let attempts = store
        .write(move |tx| {
            tx.lease_delivery(id, &fence("host_a", 1), 61_000)?;
            assert!(tx.release_delivery(id, &fence("host_a", 1), 2_000)?);
            let due = tx.due_deliveries(std::slice::from_ref(&sub), 2_000, 10)?;
            Ok(due.iter().map(|d| d.attempts).collect::<Vec<_>>())
        })
        .await
        .unwrap();
    assert_eq!(attempts, [0]);
}

pub async fn dead_letters_keep_their_reason() {
    let host = TestHost::new();
    let store = host.engine.store().clone();
    let (sub, id) = one_delivery(&store, 1_000).await;
    let env = sub.split('/').next().unwrap().to_owned();
    store
        .write(move |tx| {
            tx.lease_delivery(id, &fence("host_a", 1), 61_000)?;
            tx.finish_delivery(id, Some(&fence("host_a", 1)), &DeliveryEnd::Dead { error: "boom".into() }, 2_000)
        })
        .await
        .unwrap();
    let dead = host.engine.env(env).dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error, "boom");
    assert_eq!(host.engine.delivery_stats().await.unwrap().dead, 1);
}

pub async fn the_subscriptions_version_changes_with_every_change_and_never_repeats() {
    let host = TestHost::new();
    let env = host.env().await;
    let store = host.engine.store().clone();
    let sub = Subscription {
        id: format!("{}/l#0", env.id()),
        environment_id: env.id().into(),
        topic: "job:*".into(),
        filter: Value::Null,
    };
    let version = || store.read(|r| r.subscriptions_version());
    let v0 = version().await.unwrap();
    let s = sub.clone();
    store.write(move |tx| tx.put_subscription(&s, true, 1)).await.unwrap();
    let v1 = version().await.unwrap();
    let s = sub.clone();
    store.write(move |tx| tx.set_subscription_active(&s.id, false, 2)).await.unwrap();
    let v2 = version().await.unwrap();
    let s = sub.clone();
    let refused = store
        .write(move |tx| {
            tx.put_subscription(&s, true, 3)?;
            Err::<(), _>(Error::invalid("rolled back"))
        })
        .await;
    assert!(refused.is_err());
    assert_eq!(version().await.unwrap(), v2, "a rolled-back change is no change");
    let s = Subscription { topic: "records:*".into(), ..sub.clone() };
    store.write(move |tx| tx.put_subscription(&s, true, 4)).await.unwrap();
    let v3 = version().await.unwrap();
    let all = [v0, v1, v2, v3];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b, "versions {all:?} repeat");
        }
    }
    let active = store.read(|r| r.active_subscriptions()).await.unwrap();
    assert_eq!(active, [Subscription { topic: "records:*".into(), ..sub }]);
}

pub async fn hosts_register_heartbeat_and_leave() {
    let host = TestHost::new();
    let store = host.engine.store().clone();
    let a = HostRecord { id: "host_a".into(), label: "a pid 1".into(), started_at: 10, heartbeat_at: 10 };
    let b = HostRecord { id: "host_b".into(), label: "b pid 2".into(), started_at: 20, heartbeat_at: 20 };
    let (a2, b2) = (a.clone(), b.clone());
    store
        .write(move |tx| {
            tx.heartbeat(&a2)?;
            tx.heartbeat(&b2)
        })
        .await
        .unwrap();
    let beat = HostRecord { heartbeat_at: 30, ..a.clone() };
    store.write(move |tx| tx.heartbeat(&beat)).await.unwrap();
    let hosts = store.read(|r| r.hosts()).await.unwrap();
    assert_eq!(hosts, [HostRecord { heartbeat_at: 30, ..a }, b]);
    store.write(|tx| tx.remove_host("host_b")).await.unwrap();
    let ids: Vec<String> = store.read(|r| r.hosts()).await.unwrap().into_iter().map(|h| h.id).collect();
    assert_eq!(ids, ["host_a"]);
}

pub async fn reclaiming_spares_the_leases_of_live_hosts() {
    let host = TestHost::new();
    let store = host.engine.store().clone();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(one_delivery(&store, 1_000).await.1);
    }
    let ids2 = ids.clone();
    let reclaimed = store
        .write(move |tx| {
            for (id, owner) in ids2.iter().zip(["host_live", "host_gone", "host_never_registered"]) {
                tx.lease_delivery(*id, &fence(owner, 1), 600_000)?;
            }
            tx.reclaim_leases_except(&["host_live".to_owned()], 2_000)
        })
        .await
        .unwrap();
    assert_eq!(reclaimed, 2);
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.leased, stats.pending), (1, 2), "only the live host keeps its lease");
    let kept = store
        .write(move |tx| tx.finish_delivery(ids[0], Some(&fence("host_live", 1)), &DeliveryEnd::Done, 3_000))
        .await
        .unwrap();
    assert!(kept, "the live host's lease is intact");
}

pub async fn a_job_read_for_update_is_the_stored_job_and_parts_come_by_index() {
    let host = TestHost::new();
    let env = host.env().await;
    let parent = env.create_job(NewJob::new(JobType::Sheet, "split")).await.unwrap();
    env.ack(&parent.id, Default::default()).await.unwrap();
    env.split(&parent.id, crate::model::Split { parts: crate::model::SplitParts::Count(5), run_in_parallel: None })
        .await
        .unwrap();
    let parts = env.parts(&parent.id).await.unwrap();
    let (e, p, first) = (env.id().to_owned(), parent.id.clone(), parts[0].id.clone());
    let (locked_part, locked, indexes) = host
        .engine
        .store()
        .write(move |tx| {
            let part = tx.job_for_update(&e, &first)?;
            let locked = tx.job_for_update(&e, &p)?;
            let open = tx.parts_in(&p, &[JobStatus::Ready])?;
            Ok((part, locked, open.into_iter().map(|j| j.part_index).collect::<Vec<_>>()))
        })
        .await
        .unwrap();
    assert_eq!(locked_part.as_ref(), Some(&parts[0]));
    assert_eq!(locked.map(|j| j.status), Some(JobStatus::Executing));
    assert_eq!(indexes, (0..5).map(Some).collect::<Vec<_>>());
    let missing = host.engine.store().write(|tx| tx.job_for_update("env_nope", "job_nope")).await.unwrap();
    assert!(missing.is_none());
}

/// A job read in a write transaction is the stored job, whatever the backend remembers of the
/// writes before: a refused update is not seen, a field the update does not store keeps its
/// stored value, and a job of another environment is not found.
pub async fn a_job_read_in_a_write_is_the_stored_job_after_updates_and_refusals() {
    let host = TestHost::new();
    let env = host.env().await;
    let store = host.engine.store().clone();
    let mut new = NewJob::new(JobType::Space, "remembered");
    new.input = json!({"rows": [1, 2.5, "x"], "nested": {"b": true, "a": null}, "big": u64::MAX});
    let job = env.create_job(new).await.unwrap();
    let (e, id) = (env.id().to_owned(), job.id.clone());
    let update = |refuse: bool, change: fn(&mut crate::model::Job)| {
        let (store, e, id) = (store.clone(), e.clone(), id.clone());
        async move {
            store
                .write(move |tx| {
                    let mut j = tx.job_for_update(&e, &id)?.expect("the job");
                    change(&mut j);
                    tx.update_job(&j)?;
                    if refuse {
                        return Err(Error::invalid("refused after updating"));
                    }
                    Ok(())
                })
                .await
        }
    };
    let in_write = || {
        let (store, e, id) = (store.clone(), e.clone(), id.clone());
        async move { store.write(move |tx| tx.job_for_update(&e, &id)).await.unwrap().expect("the job") }
    };
    let stored = || {
        let (store, e, id) = (store.clone(), e.clone(), id.clone());
        async move { store.read(move |r| r.job(&e, &id)).await.unwrap().expect("the job") }
    };
    assert_eq!(in_write().await, job, "as created");
    update(false, |j| {
        j.status = JobStatus::Executing;
        j.info = Some("working".into());
        j.progress = 40;
        j.started_at = Some(7);
    })
    .await
    .unwrap();
    let executing = stored().await;
    assert_eq!((executing.status, executing.progress), (JobStatus::Executing, 40));
    assert_eq!(in_write().await, executing, "after an update");
    update(true, |j| j.status = JobStatus::Complete).await.unwrap_err();
    assert_eq!(in_write().await, executing, "a refused update is not seen");
    // `operation` and `input` are not columns an update writes.
    update(false, |j| {
        j.operation = "renamed".into();
        j.input = json!("replaced");
        j.progress = 60;
    })
    .await
    .unwrap();
    let after = stored().await;
    assert_eq!((after.operation.as_str(), &after.input, after.progress), ("remembered", &job.input, 60));
    assert_eq!(in_write().await, after, "what was stored, not what the update was given");
    let (store2, id2) = (store.clone(), id.clone());
    let elsewhere = store2.write(move |tx| tx.job_for_update("env_other", &id2)).await.unwrap();
    assert!(elsewhere.is_none(), "a job is found only in its own environment");
}

/// A parent's part counts read in a write are the stored counts, whatever the backend remembers
/// of the writes before: as parts are created, as they move (one of them twice in a write; out
/// of an end, into no counted status, within the active ones), and not after a refused move.
pub async fn part_counts_read_in_a_write_follow_every_kept_change() {
    let host = TestHost::new();
    let env = host.env().await;
    let store = host.engine.store().clone();
    let parent = env.create_job(NewJob::new(JobType::Sheet, "counted")).await.unwrap();
    env.ack(&parent.id, Default::default()).await.unwrap();
    let (e, p) = (env.id().to_owned(), parent.id.clone());
    let in_write = || {
        let (store, p) = (store.clone(), p.clone());
        async move { store.write(move |tx| tx.part_counts(&p)).await.unwrap() }
    };
    let stored = || {
        let (env, p) = (env.clone(), p.clone());
        async move {
            let parts = env.parts(&p).await.unwrap();
            let mut counts = PartStatusCounts { total: parts.len() as u64, ..Default::default() };
            for part in &parts {
                match part.status {
                    JobStatus::Complete => counts.completed += 1,
                    JobStatus::Failed => counts.failed += 1,
                    JobStatus::Canceled => counts.canceled += 1,
                    JobStatus::Ready | JobStatus::Executing => counts.active += 1,
                    _ => {}
                }
            }
            counts
        }
    };
    assert_eq!(in_write().await, PartStatusCounts::default(), "no parts yet");
    env.split(&parent.id, crate::model::Split { parts: crate::model::SplitParts::Count(6), run_in_parallel: None })
        .await
        .unwrap();
    let six = in_write().await;
    assert_eq!((six.total, six.open()), (6, 6));
    assert_eq!(six, stored().await, "after the split");
    let parts = env.parts(&parent.id).await.unwrap();
    // Moves parts in one write: `changes` lists (part, statuses it goes through); refused
    // after its moves when `refuse`.
    let moves = |changes: Vec<(usize, Vec<JobStatus>)>, refuse: bool| {
        let (store, e) = (store.clone(), e.clone());
        let ids: Vec<(String, Vec<JobStatus>)> = changes.into_iter().map(|(i, s)| (parts[i].id.clone(), s)).collect();
        async move {
            store
                .write(move |tx| {
                    for (id, statuses) in &ids {
                        for status in statuses {
                            let mut job = tx.job_for_update(&e, id)?.expect("the part");
                            job.status = *status;
                            tx.update_job(&job)?;
                        }
                    }
                    if refuse {
                        return Err(Error::invalid("refused after moving parts"));
                    }
                    Ok(())
                })
                .await
        }
    };
    moves(vec![(0, vec![JobStatus::Executing, JobStatus::Complete]), (1, vec![JobStatus::Failed])], false)
        .await
        .unwrap();
    let moved = in_write().await;
    assert_eq!((moved.completed, moved.failed, moved.active, moved.total), (1, 1, 4, 6));
    assert_eq!(moved, stored().await, "after two parts moved");
    moves(vec![(2, vec![JobStatus::Canceled]), (3, vec![JobStatus::Complete])], true).await.unwrap_err();
    assert_eq!(in_write().await, moved, "refused moves are not counted");
    moves(vec![(2, vec![JobStatus::Canceled]), (3, vec![JobStatus::Executing])], false).await.unwrap();
    let last = in_write().await;
    assert_eq!((last.canceled, last.active, last.open()), (1, 3, 3));
    assert_eq!(last, stored().await, "after a cancel and a move that stays open");
    // Out of an end (a retry's `failed` → `ready`), into no counted bucket (`waiting`), and
    // within one (`ready` → `executing`, which counts nothing new).
    moves(vec![(1, vec![JobStatus::Ready]), (4, vec![JobStatus::Waiting]), (5, vec![JobStatus::Executing])], false)
        .await
        .unwrap();
    let back = in_write().await;
    assert_eq!((back.failed, back.active, back.open()), (0, 3, 4));
    assert_eq!(back, stored().await, "after a part left an end and another left the active ones");
}

/// An event of `env` with a payload that JSON must carry exactly (nesting, a fraction, text
/// to escape).
fn rich_event(env: &str, topic: &str, now: Millis) -> Event {
    Event {
        id: new_id("evt"),
        seq: 0,
        topic: topic.into(),
        context: json!({ "environmentId": env, "jobId": new_id("job"), "actorId": "test" }),
        payload: json!({ "n": 7, "ratio": 0.1, "nested": { "list": [1, "two", null, true] }, "text": "quote \" and ü" }),
        created_at: now,
    }
}

/// A leased delivery carries its event exactly as stored — the same as the event stream shows
/// it, sequence number included — and never an event of a write that was rolled back, though
/// the kept write's event may take the rolled-back one's place.
pub async fn a_leased_delivery_carries_its_event_as_stored() {
    let host = TestHost::new();
    let store = host.engine.store();
    let now = 1_000;
    let (env, sub) = subscribed(store, now).await;
    let (e, s) = (env.clone(), sub.clone());
    let refused = store
        .write(move |tx| {
            with_deliveries(tx, rich_event(&e, "job:ghost", now), &[s.as_str()], now)?;
            Err::<(), _>(Error::invalid("refused"))
        })
        .await;
    assert!(refused.is_err());
    let (e, s) = (env.clone(), sub.clone());
    store
        .write(move |tx| with_deliveries(tx, rich_event(&e, "job:kept", now), &[s.as_str()], now).map(drop))
        .await
        .unwrap();
    let s = sub.clone();
    let due = store.write(move |tx| tx.due_deliveries(std::slice::from_ref(&s), now, 10)).await.unwrap();
    let e = env.clone();
    let stored = store.read(move |r| r.events(&e, 0, 10)).await.unwrap();
    assert_eq!(stored.len(), 1, "only the kept write's event is stored");
    assert_eq!(due.len(), 1, "only the kept write's delivery is due");
    assert_eq!(due[0].event.topic, "job:kept");
    assert_eq!(due[0].event, stored[0], "the leased event is the stored one, field for field");
}

/// A delivery whose event is no longer stored is not due: it has nothing to deliver.
pub async fn a_delivery_whose_event_was_deleted_is_not_due() {
    let host = TestHost::new();
    let store = host.engine.store();
    let now = 1_000;
    let (env, sub) = subscribed(store, now).await;
    let s = sub.clone();
    let key = store
        .write(move |tx| {
            let key = with_deliveries(tx, rich_event(&env, "job:gone", now), &[s.as_str()], now)?;
            // A newer event, so the deleted one is not the newest (which SQLite keeps as a mark).
            tx.insert_event(&rich_event(&env, "job:newer", now))?;
            Ok(key)
        })
        .await
        .unwrap();
    let deleted = store.write(move |tx| tx.delete_history(History::Events, &[key])).await.unwrap();
    assert_eq!(deleted, 1);
    let due = store.write(move |tx| tx.due_deliveries(std::slice::from_ref(&sub), now, 10)).await.unwrap();
    assert!(due.is_empty(), "a delivery of a deleted event was due: {due:?}");
}

/// Each delivery of an event carries it, however many subscriptions share the event and
/// however often a delivery is due again (a lease that lapses, a retry): the second time is no
/// different from the first.
pub async fn every_delivery_of_an_event_carries_it_each_time_it_is_due() {
    let host = TestHost::new();
    let store = host.engine.store();
    let now = 1_000;
    let (env, first) = subscribed(store, now).await;
    let (e, f) = (env.clone(), first.clone());
    let second = store
        .write(move |tx| {
            let second = everything(&e, "m");
            tx.put_subscription(&second, true, now)?;
            with_deliveries(tx, rich_event(&e, "job:shared", now), &[f.as_str(), second.id.as_str()], now)?;
            Ok(second.id)
        })
        .await
        .unwrap();
    let stored = store.read(move |r| r.events(&env, 0, 10)).await.unwrap();
    assert_eq!(stored.len(), 1);
    let subs = vec![first, second];
    for round in 1..=3 {
        let s = subs.clone();
        // Leased each round, and due again once the lease has lapsed.
        let due = store
            .write(move |tx| {
                let due = tx.due_deliveries(&s, now + (round - 1) * 100_000, 10)?;
                for d in &due {
                    tx.lease_delivery(d.delivery_id, &fence("h", round as u32), now + round * 100_000 - 1)?;
                }
                Ok(due)
            })
            .await
            .unwrap();
        assert_eq!(due.len(), 2, "round {round}: both deliveries are due");
        let mut to: Vec<&str> = due.iter().map(|d| d.subscription_id.as_str()).collect();
        to.sort_unstable();
        assert_eq!(to, [subs[0].as_str(), subs[1].as_str()], "round {round}");
        for d in &due {
            assert_eq!(
                d.event, stored[0],
                "round {round}: the delivery to {} carries the stored event",
                d.subscription_id
            );
        }
    }
}

/// A write that subscribes, routes with the new subscription and is then refused leaves no
/// trace in routing: the next event is not delivered to the subscription that never was.
pub async fn routing_forgets_a_subscription_whose_write_was_rolled_back() {
    let host = TestHost::new();
    let env = host.env().await;
    let router = host.engine.router().clone();
    let sub = Subscription {
        id: format!("{}/ghost#0", env.id()),
        environment_id: env.id().into(),
        topic: "**".into(),
        filter: Value::Null,
    };
    let refused = host
        .engine
        .store()
        .write(move |tx| {
            tx.put_subscription(&sub, true, 1)?;
            let routes = router.routes(tx)?;
            let event = Event {
                id: new_id("evt"),
                seq: 0,
                topic: "job:ready".into(),
                context: json!({ "environmentId": sub.environment_id }),
                payload: json!({}),
                created_at: 1,
            };
            assert_eq!(routes.matching(&event), [sub.id.as_str()], "seen inside its own write");
            Err::<(), _>(Error::invalid("refused"))
        })
        .await;
    assert!(refused.is_err());
    env.create_job(NewJob::new(JobType::File, "parse")).await.unwrap();
    let stats = host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.pending, stats.leased), (0, 0), "nothing routed to the rolled-back subscription");
    assert!(host.engine.store().read(|r| r.active_subscriptions()).await.unwrap().is_empty());
}
