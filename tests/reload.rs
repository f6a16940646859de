//! Hot reload: swaps under a stream of events, bad versions, publish styles, delete, unchanged
//! content, rollback. Every wait is on a reload notification or on stored state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{TestHost, WaitNamed, test_config, test_runtime, until_terminal};
use jobhost::model::{ExecutionOutcome, JobStatus, JobType, NewJob};
use jobhost::reload::{PluginHost, ReloadEvent, Watch};
use jobhost::runtime::version_of;
use jobhost::{EngineConfig, Env};
use jobhost_test_plugins as artifacts;
use tokio::sync::broadcast::Receiver;

/// The same component with a custom section appended: same behaviour, another version.
fn variant(bytes: &[u8], tag: &str) -> Vec<u8> {
    let name = b"jobhost-test";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    let mut len = payload.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&payload);
    out
}

/// Writes elsewhere in the directory, then renames into place.
fn publish(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

struct Reloading {
    host: TestHost,
    env: Env,
    plugins: Arc<PluginHost>,
    events: Receiver<ReloadEvent>,
    dir: tempfile::TempDir,
    running: Arc<jobhost::delivery::Running>,
    _watch: Watch,
    v1: Vec<u8>,
}

async fn reloading() -> Reloading {
    let host = TestHost::with_config(EngineConfig { max_attempts: 2, ..test_config() });
    let env = host.env().await;
    let dir = tempfile::tempdir().unwrap();
    let v1 = std::fs::read(artifacts::TEST_NOOP).unwrap();
    publish(dir.path(), "noop", &v1);
    let running = Arc::new(host.engine.run(vec![]).await.unwrap());
    let (plugins, _) = PluginHost::start(test_runtime(), running.clone(), env.id(), dir.path()).await.unwrap();
    let events = plugins.subscribe();
    let watch = plugins.watch(Duration::from_millis(20)).unwrap();
    assert_eq!(plugins.plugins().await[0].version, version_of(&v1));
    Reloading { host, env, plugins, events, dir, running, _watch: watch, v1 }
}

impl Reloading {
    /// The next reload event about `name` that changes something (skipping other plugins and
    /// `Unchanged`, which a rename can trail).
    async fn next(&mut self, name: &str) -> ReloadEvent {
        let wait = async {
            loop {
                let e = self.events.recv().await.expect("reload events");
                let about = match &e {
                    ReloadEvent::Loaded { name, .. }
                    | ReloadEvent::Unchanged { name, .. }
                    | ReloadEvent::Failed { name, .. }
                    | ReloadEvent::Removed { name, .. } => name.clone(),
                };
                if about == name && !matches!(e, ReloadEvent::Unchanged { .. }) {
                    return e;
                }
            }
        };
        // A safety net against a hang, not a synchronisation.
        tokio::time::timeout(Duration::from_secs(60), wait).await.expect("a reload event within 60 s")
    }

    /// Waits for `version` of `noop` to be loaded (other events, e.g. a failed read of a
    /// half-copied file, pass by).
    async fn loaded(&mut self, version: &str) {
        let wait = async {
            loop {
                if let ReloadEvent::Loaded { version: v, .. } = self.events.recv().await.expect("reload events")
                    && v == version
                {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait).await.expect("the version loads within 60 s");
    }

    async fn work(&self) -> String {
        self.env.create_job(NewJob::new(JobType::Space, "work")).await.unwrap().id
    }

    /// The version that handled a job's `job:ready` (waiting for its execution record, which
    /// is written just after the handler completes the job).
    async fn handled_by(&self, job: &str) -> String {
        let job = until_terminal(&self.env, job).await;
        assert_eq!(job.status, JobStatus::Complete);
        let (env, id) = (self.env.clone(), job.id.clone());
        let execs = self
            .host
            .engine
            .wait_named("the job's execution records", move || {
                let (env, id) = (env.clone(), id.clone());
                async move {
                    let ok: Vec<_> = env
                        .executions(Some(&id), 10)
                        .await?
                        .into_iter()
                        .filter(|e| e.topic == "job:ready" && e.outcome == ExecutionOutcome::Ok)
                        .collect();
                    Ok((!ok.is_empty()).then_some(ok))
                }
            })
            .await
            .unwrap();
        assert_eq!(execs.len(), 1, "exactly one successful handling of {}", job.id);
        execs[0].plugin_version.clone()
    }
}

#[tokio::test]
async fn a_swap_under_a_stream_of_events_loses_nothing_and_splits_cleanly() {
    let mut r = reloading().await;
    let v2 = variant(&r.v1, "v2");
    let (old, new) = (version_of(&r.v1), version_of(&v2));
    let mut before = Vec::new();
    // Jobs flow concurrently while the swap happens.
    let env = r.env.clone();
    let flow = tokio::spawn(async move {
        let mut ids = Vec::new();
        for _ in 0..150 {
            ids.push(env.create_job(NewJob::new(JobType::Space, "work")).await.unwrap().id);
        }
        ids
    });
    for _ in 0..50 {
        before.push(r.work().await);
    }
    publish(r.dir.path(), "noop", &v2);
    assert_eq!(
        r.next("noop").await,
        ReloadEvent::Loaded { name: "noop".into(), version: new.clone(), previous: Some(old.clone()) }
    );
    let mut after = Vec::new();
    for _ in 0..50 {
        after.push(r.work().await);
    }
    let during = flow.await.unwrap();

    let mut counts = std::collections::HashMap::new();
    for id in before.iter().chain(&during).chain(&after) {
        let v = r.handled_by(id).await;
        assert!(v == old || v == new, "job {id} handled by unknown version {v}");
        *counts.entry(v).or_insert(0) += 1;
    }
    for id in &after {
        assert_eq!(r.handled_by(id).await, new, "a job created after the swap ran on the old version");
    }
    assert!(counts.get(&new).copied().unwrap_or(0) >= 50);
    assert_eq!(counts.values().sum::<i32>(), 250);
    let stats = r.host.engine.delivery_stats().await.unwrap();
    assert_eq!((stats.pending, stats.leased, stats.dead), (0, 0, 0));
    r.running.shutdown().await;
}

#[tokio::test]
async fn bad_versions_are_reported_and_the_last_good_one_keeps_serving() {
    let mut r = reloading().await;
    let good = version_of(&r.v1);
    let v2 = variant(&r.v1, "v2");
    let empty_component = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupt", b"\0asm but not really".to_vec(), "not a valid WebAssembly component"),
        ("wrong world", empty_component.to_vec(), "does not fit the jobhost:plugin world"),
        ("truncated", v2[..v2.len() / 3].to_vec(), "not a valid WebAssembly component"),
    ];
    for (what, bytes, reason) in cases {
        publish(r.dir.path(), "noop", &bytes);
        // The report about exactly this content (a rename can trail events about the last one).
        loop {
            match r.next("noop").await {
                ReloadEvent::Failed { version, .. } if version != Some(version_of(&bytes)) => continue,
                ReloadEvent::Failed { reason: got, .. } => {
                    assert!(got.contains(reason), "{what}: {got}");
                    break;
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        assert_eq!(r.plugins.plugins().await[0].version, good, "{what}");
        let job = r.work().await;
        assert_eq!(r.handled_by(&job).await, good, "{what}: the old version still serves");
    }
    // The same bad content again is not retried; a good version then loads.
    publish(r.dir.path(), "noop", &empty_component);
    loop {
        match r.next("noop").await {
            ReloadEvent::Failed { version, .. } if version != Some(version_of(&empty_component)) => continue,
            ReloadEvent::Failed { reason, .. } => {
                assert_eq!(reason, jobhost::reload::ALREADY_FAILED);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    publish(r.dir.path(), "noop", &v2);
    assert!(matches!(r.next("noop").await, ReloadEvent::Loaded { .. }));
    r.running.shutdown().await;
}

/// How many times each version was loaded: every successful load of a version that is not
/// already the newest kept one adds one history entry.
fn loads_of(dir: &Path, version: &str) -> usize {
    jobhost::reload::history(dir, "noop").unwrap().iter().filter(|e| e.version == version).count()
}

#[tokio::test]
async fn rename_into_place_and_in_place_copy_each_load_once_and_unchanged_content_does_not_reload() {
    let mut r = reloading().await;
    let v2 = variant(&r.v1, "v2");
    let v3 = variant(&r.v1, "v3");
    publish(r.dir.path(), "noop", &v2);
    r.loaded(&version_of(&v2)).await;

    let staged: PathBuf = r.dir.path().join("staged.bin");
    std::fs::write(&staged, &v3).unwrap();
    std::fs::copy(&staged, r.dir.path().join("noop.wasm")).unwrap();
    r.loaded(&version_of(&v3)).await;

    // Same bytes written again: noticed, not reloaded.
    publish(r.dir.path(), "noop", &v3);
    let unchanged = async {
        loop {
            match r.events.recv().await.unwrap() {
                ReloadEvent::Unchanged { version, .. } if version == version_of(&v3) => break,
                ReloadEvent::Loaded { version, .. } => panic!("reloaded {version}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), unchanged).await.expect("the rewrite is noticed within 60 s");
    for (what, v) in [("v1", &r.v1), ("rename", &v2), ("in-place copy", &v3)] {
        assert_eq!(loads_of(r.dir.path(), &version_of(v)), 1, "{what} loaded once");
    }
    r.running.shutdown().await;
}

#[tokio::test]
async fn delete_unloads_and_the_pending_events_wait_for_the_plugin_to_return() {
    let mut r = reloading().await;
    std::fs::remove_file(r.dir.path().join("noop.wasm")).unwrap();
    assert!(matches!(r.next("noop").await, ReloadEvent::Removed { .. }));
    assert!(r.plugins.plugins().await.is_empty());
    let job = r.work().await;
    let stats = r.host.engine.delivery_stats().await.unwrap();
    assert_eq!(stats.pending, 1, "the event is stored for a subscriber that is away");
    assert_eq!(r.env.job(&job).await.unwrap().status, JobStatus::Ready);
    publish(r.dir.path(), "noop", &r.v1.clone());
    assert!(matches!(r.next("noop").await, ReloadEvent::Loaded { .. }));
    assert_eq!(r.handled_by(&job).await, version_of(&r.v1));
    r.running.shutdown().await;
}

#[tokio::test]
async fn restarts_keep_the_rollback_history_as_it_was() {
    let mut r = reloading().await;
    let v2 = variant(&r.v1, "v2");
    publish(r.dir.path(), "noop", &v2);
    r.loaded(&version_of(&v2)).await;
    let kept = || -> Vec<String> {
        jobhost::reload::history(r.dir.path(), "noop").unwrap().into_iter().map(|e| e.version).collect()
    };
    let before = kept();
    assert_eq!(before, [version_of(&v2), version_of(&r.v1)]);
    // More host starts on the directory than versions are kept: each loads v2 again.
    for _ in 0..8 {
        let (plugins, _) =
            PluginHost::start(test_runtime(), r.running.clone(), r.env.id(), r.dir.path()).await.unwrap();
        assert_eq!(plugins.plugins().await[0].version, version_of(&v2));
    }
    assert_eq!(kept(), before, "nothing pushed out, nothing repeated");
    assert_eq!(jobhost::reload::rollback(r.dir.path(), "noop", None).unwrap(), version_of(&r.v1));
    r.running.shutdown().await;
}

#[tokio::test]
async fn rollback_restores_the_previous_version() {
    let mut r = reloading().await;
    let v2 = variant(&r.v1, "v2");
    let (v1, v2v) = (version_of(&r.v1), version_of(&v2));
    publish(r.dir.path(), "noop", &v2);
    assert!(matches!(r.next("noop").await, ReloadEvent::Loaded { .. }));
    let kept: Vec<String> =
        jobhost::reload::history(r.dir.path(), "noop").unwrap().into_iter().map(|e| e.version).collect();
    assert_eq!(kept, [v2v.clone(), v1.clone()]);

    assert_eq!(jobhost::reload::rollback(r.dir.path(), "noop", None).unwrap(), v1);
    assert_eq!(
        r.next("noop").await,
        ReloadEvent::Loaded { name: "noop".into(), version: v1.clone(), previous: Some(v2v.clone()) }
    );
    let job = r.work().await;
    assert_eq!(r.handled_by(&job).await, v1);
    // An explicit version, and a version that was never kept.
    assert_eq!(jobhost::reload::rollback(r.dir.path(), "noop", Some(&v2v)).unwrap(), v2v);
    assert!(matches!(r.next("noop").await, ReloadEvent::Loaded { .. }));
    let err = jobhost::reload::rollback(r.dir.path(), "noop", Some("0123456789abcdef")).unwrap_err();
    assert!(err.to_string().contains("is not kept"), "{err}");
    r.running.shutdown().await;
}

#[tokio::test]
async fn a_version_with_other_routes_unsubscribes_the_dropped_ones_and_subscribes_the_new() {
    let mut r = reloading().await;
    // Same plugin name, different program: the misbehaving plugin's routes replace noop's.
    let other = std::fs::read(artifacts::TEST_MISBEHAVE).unwrap();
    publish(r.dir.path(), "noop", &other);
    assert!(matches!(r.next("noop").await, ReloadEvent::Loaded { .. }));

    // `space:work` is no longer a route: no delivery is created for it.
    let work = r.work().await;
    assert_eq!(r.host.engine.delivery_stats().await.unwrap().pending, 0);
    // `space:flaky` is a new route: handled (it succeeds on its second attempt).
    let flaky = r.env.create_job(NewJob::new(JobType::Space, "flaky")).await.unwrap();
    assert_eq!(until_terminal(&r.env, &flaky.id).await.outcome["message"], "attempt 2");
    assert_eq!(r.env.job(&work).await.unwrap().status, JobStatus::Ready);

    // Back to the original: `space:work` is subscribed again and handled.
    publish(r.dir.path(), "noop", &r.v1.clone());
    assert!(matches!(r.next("noop").await, ReloadEvent::Loaded { .. }));
    let again = r.work().await;
    assert_eq!(r.handled_by(&again).await, version_of(&r.v1));
    r.running.shutdown().await;
}

#[tokio::test]
async fn a_manifest_change_reloads_without_recompiling_and_a_bad_one_is_refused() {
    let mut r = reloading().await;
    let v1 = version_of(&r.v1);
    let manifest = |dir: &Path, text: &str| {
        let tmp = dir.join(".noop.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join("noop.toml")).unwrap();
    };
    manifest(r.dir.path(), "[limits]\nmax_instances = 3\ncpu_ms = 700\n[config]\nmode = \"strict\"\n");
    assert_eq!(
        r.next("noop").await,
        ReloadEvent::Loaded { name: "noop".into(), version: v1.clone(), previous: Some(v1.clone()) },
        "same component, new manifest"
    );
    let current = r.plugins.loaded().await.remove(0);
    assert_eq!(current.manifest.limits.max_instances, 3);
    assert_eq!(current.manifest.limits.cpu, Duration::from_millis(700));
    assert_eq!(current.manifest.config["mode"], "strict");

    manifest(r.dir.path(), "[limits]\nmax_instances = 0\n");
    match r.next("noop").await {
        ReloadEvent::Failed { reason, .. } => {
            assert!(reason.contains("noop.toml") && reason.contains("max_instances = 0 is out of range"), "{reason}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert_eq!(r.plugins.loaded().await[0].manifest.limits.max_instances, 3, "the last good manifest serves");
    let job = r.work().await;
    assert_eq!(r.handled_by(&job).await, v1);

    std::fs::remove_file(r.dir.path().join("noop.toml")).unwrap();
    loop {
        match r.next("noop").await {
            ReloadEvent::Loaded { .. } => break,
            // The bad manifest's rename can trail a repeat of its failure.
            ReloadEvent::Failed { reason, .. } if reason == jobhost::reload::ALREADY_FAILED => continue,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(r.plugins.loaded().await[0].manifest.limits, crate::support::test_runtime_config().limits);
    r.running.shutdown().await;
}
