//! What only a shared database promises: a schema newer than this build is refused, hosts
//! wake each other through `NOTIFY` (not only through their polls), and a database that
//! restarts under running hosts costs time, never data.

use std::sync::Arc;
use std::time::Duration;

use jobhost_engine::conformance::test_config;
use jobhost_engine::model::{Ack, JobStatus, JobType, NewJob};
use jobhost_engine::{Engine, EngineConfig};
use jobhost_store::Backend;
use jobhost_store_postgres::{PgBackend, PgOptions, SCHEMA_VERSION};
use jobhost_test_postgres::Server;

/// `f`, or a failure naming `what` after 30 s.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f).await.unwrap_or_else(|_| panic!("{what} within 30 s"))
}

fn engine(backend: &Arc<PgBackend>, config: EngineConfig) -> Engine {
    Engine::with_backend(backend.clone(), config)
}

/// A host on the database at `url`, with a backend (connections) of its own, as a process
/// would have.
fn host_on(url: &str) -> Engine {
    engine(&Arc::new(PgBackend::open(PgOptions::new(url.to_owned())).unwrap()), test_config())
}

/// Two hosts on one fresh database; and the database's URL.
fn two_hosts() -> (String, Engine, Engine) {
    let url = jobhost_test_postgres::server().fresh_database();
    let (a, b) = (host_on(&url), host_on(&url));
    (url, a, b)
}

/// Runs blocking client work on a connection of its own, off the test's runtime.
fn with_client<T: Send + 'static>(url: &str, work: impl FnOnce(&mut postgres::Client) -> T + Send + 'static) -> T {
    let url = url.to_owned();
    std::thread::spawn(move || work(&mut postgres::Client::connect(&url, postgres::NoTls).expect("connect")))
        .join()
        .unwrap()
}

fn sql(url: &str, statements: &str) {
    let statements = statements.to_owned();
    with_client(url, move |c| c.batch_execute(&statements).expect("statements"));
}

#[tokio::test]
async fn a_database_with_a_newer_schema_is_refused_and_left_as_it_was() {
    let url = jobhost_test_postgres::server().fresh_database();
    drop(PgBackend::open(PgOptions::new(url.clone())).expect("first open migrates"));
    sql(&url, &format!("UPDATE jobhost_schema SET version = {}", SCHEMA_VERSION + 1));
    let err = PgBackend::open(PgOptions::new(url.clone())).unwrap_err();
    assert!(err.to_string().contains("newer than this jobhost knows"), "{err}");
    // Opening again at the known version works: the refusal changed nothing.
    sql(&url, &format!("UPDATE jobhost_schema SET version = {SCHEMA_VERSION}"));
    PgBackend::open(PgOptions::new(url)).expect("reopen");
}

#[tokio::test]
async fn hosts_starting_together_migrate_once() {
    let url = jobhost_test_postgres::server().fresh_database();
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgBackend::open(PgOptions::new(url)).map(drop))
        })
        .collect();
    for o in opens {
        o.join().unwrap().expect("every host opens");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_on_one_host_wakes_another_through_notify_not_its_poll() {
    let url = jobhost_test_postgres::server().fresh_database();
    let a = Arc::new(PgBackend::open(PgOptions::new(url.clone())).unwrap());
    // B would not poll within this test's lifetime: only a notification can wake it.
    let b = Arc::new(
        PgBackend::open(PgOptions { poll_interval: Duration::from_secs(3600), ..PgOptions::new(url) }).unwrap(),
    );
    let (ea, eb) = (engine(&a, test_config()), engine(&b, test_config()));
    // From here on nothing but a notification wakes B's waiters (B commits nothing).
    within("B listening", b.until_listening()).await;
    let e = ea.create_environment("notify").await.unwrap();
    let (env_a, env_b) = (ea.env(&e.id), eb.env(&e.id));
    let job = env_a.create_job(NewJob::new(JobType::File, "work")).await.unwrap();
    let mut commits = b.notifications().commits;
    commits.borrow_and_update();
    assert_eq!(env_b.job(&job.id).await.unwrap().status, JobStatus::Ready);
    env_a.ack(&job.id, Ack::default()).await.unwrap();
    // Only A's NOTIFY can end this wait.
    within("A's NOTIFY waking B", commits.changed()).await.unwrap();
    assert_eq!(env_b.job(&job.id).await.unwrap().status, JobStatus::Executing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restarted_under_a_running_host_costs_time_not_data() {
    // A server of its own: the other tests keep theirs running.
    let server = Server::start_throwaway().expect("start a server");
    let url = server.fresh_database();
    let backend = Arc::new(PgBackend::open(PgOptions::new(url)).unwrap());
    let engine = engine(&backend, test_config());
    let e = engine.create_environment("restart").await.unwrap();
    let env = engine.env(&e.id);
    let before = env.create_job(NewJob::new(JobType::File, "before")).await.unwrap();

    tokio::task::spawn_blocking({
        let server = server.clone();
        move || server.stop()
    })
    .await
    .unwrap()
    .expect("stop the server");
    // A read while it is down fails with the store's error, and health says why.
    let read = env.job(&before.id).await;
    assert!(read.is_err(), "{read:?}");
    assert!(backend.health().error.is_some(), "{:?}", backend.health());

    // A write made while it is down waits for it, and lands once it is back.
    let pending = tokio::spawn({
        let env = env.clone();
        async move { env.create_job(NewJob::new(JobType::File, "during")).await }
    });
    tokio::task::spawn_blocking({
        let server = server.clone();
        move || server.restart()
    })
    .await
    .unwrap()
    .expect("restart the server");
    let during = within("the write made while the database was down", pending)
        .await
        .unwrap()
        .expect("the write made while the database was down lands");

    // Every reader answers at once: none runs a read on a connection from before the restart.
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (env, id) = (env.clone(), before.id.clone());
        reads.spawn(async move { env.job(&id).await });
    }
    while let Some(read) = reads.join_next().await {
        read.unwrap().expect("a read after the restart");
    }
    let jobs = env.jobs(0, 10).await.unwrap();
    let names: Vec<_> = jobs.iter().map(|j| j.operation.as_str()).collect();
    assert_eq!(names, ["before", "during"]);
    assert_eq!(env.job(&during.id).await.unwrap().status, JobStatus::Ready);
    let health = backend.health();
    assert!(health.error.is_none() && health.reconnects >= 1, "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_racing_three_parents_of_200_parts_fire_parts_completed_once_each() {
    use jobhost_engine::model::{Outcome, Split};
    let (_, ea, eb) = two_hosts();
    let e = ea.create_environment("race").await.unwrap();
    let (env_a, env_b) = (ea.env(&e.id), eb.env(&e.id));
    let mut parents = Vec::new();
    for _ in 0..3 {
        let parent = env_a.create_job(NewJob::new(JobType::Sheet, "race")).await.unwrap();
        env_a.ack(&parent.id, Ack::default()).await.unwrap();
        env_b.split(&parent.id, Split::count(200)).await.unwrap();
        parents.push(parent.id);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for parent in &parents {
        for (i, part) in env_a.parts(parent).await.unwrap().into_iter().enumerate() {
            // Every part ended by one of the two hosts, in whatever order the tasks run.
            let api = if i % 2 == 0 { env_a.clone() } else { env_b.clone() };
            tasks.spawn(async move { api.complete(&part.id, Outcome::default()).await });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().expect("every part ends once");
    }
    for parent in &parents {
        let fired: Vec<_> =
            env_b.job_events(parent).await.unwrap().into_iter().filter(|e| e.topic == "job:parts-completed").collect();
        assert_eq!(fired.len(), 1, "parent {parent}");
        assert_eq!(fired[0].payload["parts"]["total"], 200);
        assert_eq!(fired[0].payload["parts"]["completed"], 200);
    }
}

/// Schema version 5 keeps each parent's part counts in a table of its own: a database migrated
/// to it with parts already there counts them from the parts, and the triggers count on from
/// there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_made_before_the_counts_table_are_counted_by_its_migration() {
    use jobhost_engine::model::{Outcome, Split};
    let url = jobhost_test_postgres::server().fresh_database();
    let before = host_on(&url);
    let e = before.create_environment("counted").await.unwrap();
    let env = before.env(&e.id);
    let parent = env.create_job(NewJob::new(JobType::Sheet, "counted")).await.unwrap();
    env.ack(&parent.id, Ack::default()).await.unwrap();
    env.split(&parent.id, Split::count(5)).await.unwrap();
    let parts = env.parts(&parent.id).await.unwrap();
    env.complete(&parts[0].id, Outcome::default()).await.unwrap();
    env.fail(&parts[1].id, Outcome::default()).await.unwrap();
    env.ack(&parts[2].id, Ack::default()).await.unwrap();
    drop((env, before));
    // The database as version 4 left it: no table, no triggers.
    sql(
        &url,
        "DROP TRIGGER jobs_part_added ON jobs; DROP TRIGGER jobs_part_moved ON jobs; \
         DROP TRIGGER jobs_part_removed ON jobs; DROP FUNCTION jobhost_count_part(); \
         DROP TRIGGER jobs_parent_ended ON jobs; DROP FUNCTION jobhost_drop_part_counts(); \
         DROP FUNCTION jobhost_part_bucket(TEXT); DROP TABLE part_counts, part_count_deltas; \
         UPDATE jobhost_schema SET version = 4",
    );
    let after = host_on(&url);
    let counts = || {
        let (store, p) = (after.store().clone(), parent.id.clone());
        async move { store.write(move |tx| tx.part_counts(&p)).await.unwrap() }
    };
    let migrated = counts().await;
    assert_eq!(
        (migrated.total, migrated.completed, migrated.failed, migrated.canceled, migrated.active),
        (5, 1, 1, 0, 3)
    );
    let env = after.env(&e.id);
    env.complete(&parts[2].id, Outcome::default()).await.unwrap();
    let moved = counts().await;
    assert_eq!((moved.completed, moved.active, moved.open()), (2, 2, 2));
}

/// A split job that ends drops its part counts, and the parts a cancel ends after it are not
/// counted: no rows are left behind for parents no rule will ask about again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_parents_part_counts_leave_no_rows() {
    use jobhost_engine::model::{Outcome, Split};
    let url = jobhost_test_postgres::server().fresh_database();
    let host = host_on(&url);
    let e = host.create_environment("tidy").await.unwrap();
    let env = host.env(&e.id);
    let split = |parts: u32| {
        let env = env.clone();
        async move {
            let parent = env.create_job(NewJob::new(JobType::Sheet, "tidy")).await.unwrap();
            env.ack(&parent.id, Ack::default()).await.unwrap();
            env.split(&parent.id, Split::count(parts)).await.unwrap();
            let parts = env.parts(&parent.id).await.unwrap();
            (parent.id, parts)
        }
    };
    let rows = |parent: String| {
        with_client(&url, move |c| {
            let q = "SELECT (SELECT COUNT(*) FROM part_counts WHERE parent_id = $1) \
                     + (SELECT COUNT(*) FROM part_count_deltas WHERE parent_id = $1)";
            c.query_one(q, &[&parent]).expect("count").get::<_, i64>(0)
        })
    };
    // Canceled with its parts open: the cascade ends them after the parent.
    let (canceled, _) = split(3).await;
    assert!(rows(canceled.clone()) > 0, "a split parent's parts are counted");
    env.cancel(&canceled, None).await.unwrap();
    assert_eq!(rows(canceled), 0);
    // Completed after its parts.
    let (completed, parts) = split(2).await;
    for part in &parts {
        env.complete(&part.id, Outcome::default()).await.unwrap();
    }
    assert!(rows(completed.clone()) > 0, "counted while the parent is open");
    env.complete(&completed, Outcome::default()).await.unwrap();
    assert_eq!(rows(completed), 0);
}

/// Sequence numbers follow commit order: an event whose transaction began first but commits
/// last comes after the events a reader has already passed, never behind its cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_is_never_behind_a_readers_cursor() {
    use jobhost_engine::model::{Environment, Event, new_id};
    use std::sync::Mutex;
    let (_, ea, eb) = two_hosts();
    let env = Environment { id: new_id("env"), name: "order".into(), created_at: 0 };
    let stored = env.clone();
    ea.store().write(move |tx| tx.insert_environment(&stored)).await.unwrap();
    let event = |topic: &str| Event {
        id: new_id("evt"),
        seq: 0,
        topic: topic.into(),
        context: serde_json::json!({ "environmentId": env.id }),
        payload: serde_json::json!({}),
        created_at: 0,
    };

    // A's transaction writes its event first and stays open until told to commit.
    let (inserted_tx, inserted) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (inserted_tx, released) = (Mutex::new(Some(inserted_tx)), Mutex::new(released));
    let early = event("early");
    let slow = tokio::spawn(async move {
        ea.store()
            .write(move |tx| {
                tx.insert_event(&early)?;
                if let Some(t) = inserted_tx.lock().unwrap().take() {
                    let _ = t.send(());
                }
                let _ = released.lock().unwrap().recv();
                Ok(())
            })
            .await
    });
    within("A's event inserted", inserted).await.unwrap();
    // B's event commits meanwhile, and a reader passes it.
    let late = event("late");
    eb.store().write(move |tx| tx.insert_event(&late).map(drop)).await.unwrap();
    let env_b = eb.env(&env.id);
    let seen = env_b.events(0, 100).await.unwrap();
    assert_eq!(seen.iter().map(|e| e.topic.as_str()).collect::<Vec<_>>(), ["late"]);
    let cursor = seen[0].seq;

    release.send(()).unwrap();
    within("A's commit", slow).await.unwrap().unwrap();
    let after = env_b.events(cursor, 100).await.unwrap();
    assert_eq!(after.iter().map(|e| e.topic.as_str()).collect::<Vec<_>>(), ["early"], "not skipped");
}

/// Counts come from the counts the writes keep, exact under two hosts updating overlapping
/// records at once (deadlocks among them retried), and answer while the records table is
/// locked against every reader: they never scan a sheet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn record_counts_stay_exact_across_hosts_and_never_read_the_records() {
    use jobhost_engine::model::{Message, RecordUpdate};
    let (url, ea, eb) = two_hosts();
    let e = ea.create_environment("counts").await.unwrap();
    let (env_a, env_b) = (ea.env(&e.id), eb.env(&e.id));
    let sheet = env_a.create_sheet("s").await.unwrap();
    let (rows, _) = jobhost_engine::scenario::sample_records(6_000);
    env_a.insert_records(&sheet.id, rows).await.unwrap();
    let mut ids = Vec::new();
    for n in 1..=3 {
        ids.extend(env_b.records(&sheet.id, 2_000, n).await.unwrap().records.into_iter().map(|r| r.id));
    }
    assert_eq!(ids.len(), 6_000);

    // Rounds of pages written by both hosts at once over the same records: some rows flip to
    // an error, some back, some keep theirs; each host marks a different pattern.
    let update = |id: &str, error: bool| RecordUpdate {
        id: id.to_owned(),
        messages: Some(if error { vec![Message::error("email", "bad")] } else { vec![] }),
        ..Default::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..6usize {
        for (host, env) in [(0usize, &env_a), (1, &env_b)] {
            let page: Vec<RecordUpdate> = ids[round * 500..round * 500 + 3_000]
                .iter()
                .enumerate()
                .map(|(i, id)| update(id, (i + round + host) % (2 + host) == 0))
                .collect();
            let (env, sheet) = (env.clone(), sheet.id.clone());
            tasks.spawn(async move { env.update_records(&sheet, page).await });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().expect("every page is written");
    }
    // Deletions change both counts, some of them of records with an error.
    let gone: Vec<String> = ids.iter().step_by(7).take(300).cloned().collect();
    assert_eq!(env_b.delete_records(&sheet.id, gone).await.unwrap(), 300);

    let truth = {
        let (url, sheet) = (url.clone(), sheet.id.clone());
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let row = c
                .query_one(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE has_error) FROM records \
                     WHERE sheet_key = (SELECT key FROM sheets WHERE id = $1)",
                    &[&sheet],
                )
                .unwrap();
            (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64)
        })
        .join()
        .unwrap()
    };
    assert_eq!(truth.0, 5_700);
    assert!(truth.1 > 0 && truth.1 < truth.0, "{truth:?}");
    for env in [&env_a, &env_b] {
        let c = env.record_counts(&sheet.id).await.unwrap();
        assert_eq!((c.total, c.error, c.valid), (truth.0, truth.1, truth.0 - truth.1));
    }

    // A transaction holds the records table against every reader while the counts are asked.
    let (locked_tx, locked) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let mut tx = c.transaction().unwrap();
        tx.batch_execute("LOCK TABLE records IN ACCESS EXCLUSIVE MODE").unwrap();
        locked_tx.send(()).unwrap();
        released.recv().unwrap();
        tx.rollback().unwrap();
    });
    tokio::task::spawn_blocking(move || locked.recv()).await.unwrap().unwrap();
    let c = within("counts while the records are locked", env_a.record_counts(&sheet.id)).await.unwrap();
    assert_eq!((c.total, c.error), truth);
    release.send(()).unwrap();
    holder.join().unwrap();
}

/// A newer jobhost migrates the database while this host runs: within a poll this host says so
/// in its health (so `/readyz` fails) and refuses writes with a reason, instead of writing
/// what the new schema no longer expects. Reads still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_stops_writing_once_a_newer_jobhost_migrated_the_database() {
    let url = jobhost_test_postgres::server().fresh_database();
    let backend = Arc::new(
        PgBackend::open(PgOptions { poll_interval: Duration::from_millis(50), ..PgOptions::new(url.clone()) }).unwrap(),
    );
    let engine = engine(&backend, test_config());
    let e = engine.create_environment("upgrade").await.unwrap();
    let env = engine.env(&e.id);
    let before = env.create_job(NewJob::new(JobType::File, "before")).await.unwrap();
    sql(&url, &format!("UPDATE jobhost_schema SET version = {}", SCHEMA_VERSION + 1));

    // The poll wakes commit waiters each interval; the check runs with it.
    let mut commits = backend.notifications().commits;
    within("the host noticing the newer schema", async {
        while backend.health().error.is_none() {
            commits.changed().await.unwrap();
        }
    })
    .await;
    let error = backend.health().error.unwrap();
    assert!(error.contains(&format!("schema version {}", SCHEMA_VERSION + 1)), "{error}");
    let refused = env.create_job(NewJob::new(JobType::File, "after")).await.unwrap_err();
    assert!(refused.to_string().contains("no longer writes"), "{refused}");
    assert!(!refused.is_retryable());
    assert_eq!(env.job(&before.id).await.unwrap().operation, "before", "reads still answer");
    assert_eq!(env.jobs(0, 10).await.unwrap().len(), 1, "the refused write left nothing");
}
