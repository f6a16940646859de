//! A full disk: the store on a small filesystem that runs out of space mid-import.
//!
//! The test re-runs itself (`full_disk_child`) in a private mount namespace (`unshare
//! --mount`, with `--map-root-user` when not root), where it mounts a 24 MiB tmpfs for the
//! data directory, so nothing outside the test sees the mount and it goes when the test ends.

use std::process::Command;

use jobhost::EngineConfig;
use jobhost::model::NewRecord;
use jobhost::scenario;

/// Records per import call: a few hundred KiB of rows.
const BATCH: u64 = 2_000;

#[test]
fn a_full_disk_refuses_writes_clearly_keeps_reads_and_resumes_once_space_is_freed() {
    let mut cmd = Command::new("unshare");
    cmd.arg("--mount");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|u| u.split_whitespace().nth(1));
    if uid != Some("0") {
        cmd.arg("--map-root-user");
    }
    let out = cmd
        .arg(std::env::current_exe().unwrap())
        .args(["disk::full_disk_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .output()
        .expect("run unshare (util-linux)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("test disk::full_disk_child ... ok"), "the child ran:\n{stdout}\n{stderr}");
}

/// The test itself, in its own mount namespace.
#[tokio::test]
#[ignore = "run in a private mount namespace by a_full_disk_refuses_writes_clearly_keeps_reads_and_resumes_once_space_is_freed"]
async fn full_disk_child() {
    let root = tempfile::tempdir().unwrap();
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "jobhost-full-disk"])
        .arg(root.path())
        .status()
        .unwrap();
    assert!(mount.success(), "mount a tmpfs in the private namespace");
    // Ballast that an operator would delete to make room.
    let ballast = root.path().join("ballast");
    std::fs::write(&ballast, vec![7u8; 6 << 20]).unwrap();
    let data = root.path().join("data");
    let engine = jobhost::open_engine(&data, EngineConfig::default()).unwrap();
    let env = engine.env(engine.environment_named("default").await.unwrap().id);
    let sheet = env.create_sheet("people").await.unwrap();

    // Import until the disk is full.
    let mut stored = 0u64;
    let mut from = 0u64;
    let error = loop {
        let records: Vec<NewRecord> = scenario::sample_range(from..from + BATCH).0;
        match env.insert_records(&sheet.id, records).await {
            Ok(n) => {
                stored += BATCH;
                from += BATCH;
                assert!(n <= BATCH);
            }
            Err(e) => break e,
        }
        assert!(from < 10_000_000, "a 24 MiB filesystem never filled");
    };
    let message = error.to_string();
    assert!(message.contains("disk is full"), "the error names the cause: {message}");
    assert!(message.contains(&data.display().to_string()), "and where: {message}");
    assert!(stored > 0, "some imports fit before the disk filled");

    // Reads keep working, and show exactly what was committed.
    let counts = env.record_counts(&sheet.id).await.unwrap();
    assert_eq!(counts.total, stored, "nothing committed is lost, nothing refused is half-stored");
    let page = env.records(&sheet.id, 100, 1).await.unwrap();
    assert_eq!(page.records.len(), 100);
    // Another write is refused the same way while the disk is full.
    let again = env.insert_records(&sheet.id, scenario::sample_range(from..from + BATCH).0).await.unwrap_err();
    assert!(again.to_string().contains("disk is full"), "{again}");

    // Space freed: writes resume on the same host, without a restart.
    std::fs::remove_file(&ballast).unwrap();
    env.insert_records(&sheet.id, scenario::sample_range(from..from + BATCH).0).await.unwrap();
    stored += BATCH;
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().total, stored);
    drop(env);
    drop(engine);

    // The store is whole: SQLite's own check, and a fresh host reads every record.
    let conn = rusqlite::Connection::open(data.join("jobhost.db")).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    drop(conn);
    let engine = jobhost::open_engine(&data, EngineConfig::default()).unwrap();
    let env = engine.env(engine.environment_named("default").await.unwrap().id);
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().total, stored);
}
