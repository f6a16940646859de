//! The plugin author's loop, in Rust, Python, JavaScript and C alike: `plugin new` → `run`
//! on the sample → `plugin test` (passes, fails naming the record after a rule change,
//! `--update`) → `dev` (the first version runs the job; an edit is rebuilt, reloaded and rerun
//! with the changes printed; a build error names the file and the last good version keeps
//! serving; no rebuild without a change).

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Reaped, kill_after, stderr};

/// The sample's records, its invalid ones under the scaffold's rule (`@`), and under the
/// edited rule (`@example.com`).
const RECORDS: u64 = 24;
const INVALID: u64 = 5;
const INVALID_EDITED: u64 = 10;
/// The rule's constant as each template writes it, and the first record the edit makes
/// invalid (edsger@example.org).
const RULE: &str = "\"@\"";
const RULE_EDITED: &str = "\"@example.com\"";
const FIRST_NEWLY_INVALID: &str = "record 4:";

struct Author {
    dir: tempfile::TempDir,
    lang: &'static str,
    name: &'static str,
    source: &'static str,
}

impl Author {
    /// `plugin new NAME --lang LANG` in a fresh directory.
    fn new(lang: &'static str, name: &'static str, source: &'static str) -> Self {
        let a = Self { dir: tempfile::tempdir().unwrap(), lang, name, source };
        let out = a.jobhost(&["plugin", "new", name, "--lang", lang, "--dir", a.src().to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{lang}: {}", stderr(&out));
        if lang == "rust" {
            // Pin the dependencies the repository's plugins already built, so builds are
            // incremental in their target directory, not a fresh resolve and compile.
            std::fs::copy(repo().join("plugins/Cargo.lock"), a.src().join("Cargo.lock")).unwrap();
        }
        a
    }

    fn src(&self) -> PathBuf {
        self.dir.path().join(self.name)
    }

    fn command(&self) -> Command {
        command()
    }

    fn jobhost(&self, args: &[&str]) -> Output {
        jobhost(args)
    }

    fn edit(&self, from: &str, to: &str) {
        let path = self.src().join(self.source);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{}: {from:?} not in {}", self.lang, path.display());
        // Write, then rename: the watcher sees one complete file, as most editors save.
        let tmp = self.src().join(".edit.tmp");
        std::fs::write(&tmp, text.replacen(from, to, 1)).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    fn run_sample(&self) -> Value {
        let src = self.src();
        let out = self.jobhost(&[
            "run",
            "--plugin-src",
            src.to_str().unwrap(),
            "--records",
            src.join("sample.csv").to_str().unwrap(),
            "--job",
            &format!("sheet:{}", self.name),
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}: run: {}", self.lang, stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn test(&self, extra: &[&str]) -> Output {
        let src = self.src();
        let mut args = vec!["plugin", "test", src.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.jobhost(&args)
    }
}

/// The binary with the tools, builds and compiled plugins cached in this build's target
/// directory (shared by the tests, never with anything outside the build).
fn command() -> Command {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jobhost"));
    cmd.env("JOBHOST_TOOLS", target.join("tools"))
        .env("XDG_CACHE_HOME", target.join("authoring-cache"))
        .env("CARGO_TARGET_DIR", repo().join("target/wasm-plugins"));
    cmd
}

/// Runs the binary to its end; one that hangs is killed after 10 minutes, so the test fails
/// with what it printed instead of hanging the suite.
fn jobhost(args: &[&str]) -> Output {
    let child = command()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run jobhost");
    kill_after(child.id(), 600);
    child.wait_with_output().expect("wait for jobhost")
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().and_then(Path::parent).unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A child's stderr lines, read on a thread so a wait can have a deadline.
struct Lines {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(child: &mut std::process::Child) -> Self {
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { rx, seen: Vec::new() }
    }

    /// The next line containing `needle`, within `within`; panics with everything printed.
    fn wait(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?} within {within:?}:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Every line printed within `quiet`, which must contain none of `needles`.
    fn quiet(&mut self, quiet: Duration, needles: &[&str]) {
        let deadline = Instant::now() + quiet;
        while let Ok(line) = self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            assert!(!needles.iter().any(|n| line.contains(n)), "unexpected {line:?}:\n{}", self.seen.join("\n"));
            self.seen.push(line);
        }
    }
}

/// Generous bounds for a build plus a compile on 2 busy cores; they only turn a hang into a
/// failure that shows what was printed.
const BUILD: Duration = Duration::from_secs(240);

fn author_loop(lang: &'static str, name: &'static str, source: &'static str) {
    let a = Author::new(lang, name, source);
    for file in ["README.md", "sample.csv", "tests/sample/fixture.toml", "tests/sample/expected.json", source] {
        assert!(a.src().join(file).is_file(), "{lang}: plugin new wrote no {file}");
    }

    // new → run on the sample: the seeds' shape with the sample's counts.
    let summary = a.run_sample();
    assert_eq!(summary["job"]["status"], "complete", "{lang}: {summary}");
    assert_eq!(summary["parts"]["total"], 3, "{lang}: {summary}");
    assert_eq!(summary["parts"]["completed"], 3, "{lang}: {summary}");
    assert_eq!(summary["records"]["total"], RECORDS, "{lang}: {summary}");
    assert_eq!(summary["records"]["error"], INVALID, "{lang}: {summary}");
    assert_eq!(summary["job"]["outcome"]["message"], format!("{RECORDS} records, {INVALID} invalid"));

    // plugin test: the scaffold's fixture passes …
    let out = a.test(&[]);
    assert_eq!(out.status.code(), Some(0), "{lang}: {}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("1 passed, 0 failed"), "{lang}: {}", stdout(&out));
    // … fails after a rule change, naming the record, and `--update` accepts the new result.
    a.edit(RULE, RULE_EDITED);
    let out = a.test(&[]);
    assert_eq!(out.status.code(), Some(1), "{lang}: {}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("FAILED sample") && text.contains(FIRST_NEWLY_INVALID), "{lang}: {text}");
    assert!(
        text.contains("expected no messages, got email: error \"email must contain @example.com\""),
        "{lang}: {text}"
    );
    let out = a.test(&["--update"]);
    assert_eq!(out.status.code(), Some(0), "{lang}: {}{}", stdout(&out), stderr(&out));
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(a.src().join("tests/sample/expected.json")).unwrap()).unwrap();
    assert_eq!(expected["records"].as_array().unwrap().len() as u64, INVALID_EDITED, "{lang}: {expected}");
    let out = a.test(&["--json"]);
    assert_eq!(out.status.code(), Some(0), "{lang}: {}{}", stdout(&out), stderr(&out));

    // dev: the version loaded at start runs the job at once.
    let data = a.dir.path().join("data");
    let mut child = Reaped(
        a.command()
            .args(["dev", "--plugin-src", a.src().to_str().unwrap(), "--data", data.to_str().unwrap()])
            .args(["--records", a.src().join("sample.csv").to_str().unwrap(), "--job", &format!("sheet:{name}")])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    kill_after(child.id(), 900);
    let mut lines = Lines::of(&mut child);
    lines.wait("watching", BUILD);
    let first = lines.wait("run 1 (version", BUILD);
    assert!(first.contains(&format!("{INVALID_EDITED} invalid")), "{lang}: {first}");

    // An edit is rebuilt, reloaded and rerun; what changed is printed record by record.
    a.edit(RULE_EDITED, RULE);
    let changed = lines.wait("sources changed", BUILD);
    assert!(changed.contains(&format!("({source}): rebuilding")), "{lang}: {changed}");
    let loaded = lines.wait("loaded ", BUILD);
    let version = loaded.rsplit(' ').next().unwrap().to_owned();
    let second = lines.wait("run 2 (version", BUILD);
    assert!(second.contains(&version) && second.contains(&format!("{INVALID} invalid")), "{lang}: {second}");
    lines.wait("changed since run 1", BUILD);
    let change = lines.wait(FIRST_NEWLY_INVALID, BUILD);
    assert!(change.contains("before email: error \"email must contain @example.com\", now no messages"), "{change}");

    // A build error names the file and line; nothing is published, the last good version
    // (still the file in the plugins directory) keeps serving.
    let plugins = data.join("plugins");
    let published = |p: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = published(&plugins);
    a.edit(RULE, &format!("{RULE} +* syntax error"));
    let failed = lines.wait("build failed", BUILD);
    let source_path = a.src().join(source).display().to_string();
    let mut report = failed.clone();
    // The error's lines follow the first one; the file and line are among them.
    let named = lines.wait(&source_path, Duration::from_secs(30));
    report.push_str(&named);
    lines.wait("the last good version keeps serving", Duration::from_secs(30));
    assert_eq!(published(&plugins), before, "{lang}: a failed build published nothing");
    // Quiet sources: no rebuild, reads by the builds included.
    lines.quiet(Duration::from_secs(3), &["rebuilding", "built "]);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", lines.seen.join("\n"));
}

#[test]
fn the_authoring_loop_in_rust() {
    author_loop("rust", "checker-rs", "src/lib.rs");
}

#[test]
fn the_authoring_loop_in_python() {
    author_loop("python", "checker-py", "app.py");
}

#[test]
fn the_authoring_loop_in_javascript() {
    author_loop("js", "checker-js", "app.js");
}

#[test]
fn the_authoring_loop_in_c() {
    author_loop("c", "checker-c", "app.c");
}

#[test]
fn plugin_test_refuses_bad_fixtures_with_exit_2() {
    let a = Author::new("c", "fixture-errors", "app.c");
    let fixture = a.src().join("tests/sample/fixture.toml");
    let good = std::fs::read_to_string(&fixture).unwrap();
    let expected = a.src().join("tests/sample/expected.json");
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        (good.replace("job = ", "jobb = "), None, "unknown field `jobb`"),
        (good.replace("sheet:fixture-errors", "file:x"), None, "must be a sheet job"),
        (good.replace("../../sample.csv", "missing.csv"), None, "missing.csv"),
        (good.clone(), Some("{\"status\": \"complete\"}"), "expected.json is not valid"),
        (good.clone(), Some(""), "no expected.json"),
    ];
    let expected_text = std::fs::read_to_string(&expected).unwrap();
    for (fixture_text, expected_override, needle) in cases {
        std::fs::write(&fixture, &fixture_text).unwrap();
        match expected_override {
            Some("") => std::fs::remove_file(&expected).unwrap(),
            Some(text) => std::fs::write(&expected, text).unwrap(),
            None => std::fs::write(&expected, &expected_text).unwrap(),
        }
        let out = a.test(&[]);
        assert_eq!(out.status.code(), Some(2), "{needle}: {}{}", stdout(&out), stderr(&out));
        assert!(stderr(&out).contains(needle), "expected {needle:?} in {}", stderr(&out));
    }
    std::fs::write(&fixture, &good).unwrap();
    std::fs::write(&expected, &expected_text).unwrap();
    let out = a.test(&["--fixture", "nope"]);
    assert!(out.status.code() == Some(2) && stderr(&out).contains("no fixture named nope"), "{}", stderr(&out));
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(empty.path().join("app.c"), "").unwrap();
    let out = a.jobhost(&["plugin", "test", empty.path().to_str().unwrap()]);
    assert!(out.status.code() == Some(2) && stderr(&out).contains("has no tests/ directory"), "{}", stderr(&out));
}

#[test]
fn dev_reports_a_run_that_does_not_end_with_its_failed_deliveries_and_runs_the_fix() {
    let a = Author::new("c", "hangs", "app.c");
    // Every part fails after its ack, so the parent never gets `job:parts-completed`.
    let end_part = "return jh_end_job(true, &id, outcome, NULL, err);";
    a.edit(end_part, "return jh_fail(err, \"boom in part\");");
    let sample = a.src().join("sample.csv");
    let mut child = Reaped(
        a.command()
            .args(["dev", "--plugin-src", a.src().to_str().unwrap(), "--timeout", "3"])
            .args(["--records", sample.to_str().unwrap(), "--job", "sheet:hangs"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    kill_after(child.id(), 600);
    let mut lines = Lines::of(&mut child);
    lines.wait("watching", BUILD);
    let failed = lines.wait("failed: boom in part", BUILD);
    assert!(failed.contains("delivery job:ready of job_"), "{failed}");
    let stuck = lines.wait("run 1 (version", BUILD);
    assert!(stuck.contains("is still executing after 3 s (3 open part(s))"), "{stuck}");
    assert!(stuck.contains("its last delivery failed: boom in part"), "{stuck}");
    // The fix is built, loaded and run.
    a.edit("return jh_fail(err, \"boom in part\");", end_part);
    let fixed = lines.wait("run 2 (version", BUILD);
    assert!(fixed.contains("job complete") && fixed.contains(&format!("{INVALID} invalid")), "{fixed}");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", lines.seen.join("\n"));
}

/// The README's way to try the enrich example: its service on loopback, then `jobhost run
/// --plugin-src` on the example's sources, whose manifest (the grant and the service's URL) is
/// published with the component.
#[test]
fn jobhost_run_shows_the_enrich_example_against_the_service_it_ships() {
    let service = crate::outbound::VerifyService::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("enrich-emails");
    std::fs::create_dir(&src).unwrap();
    let example = repo().join("plugins/js/enrich-emails");
    std::fs::copy(example.join("app.js"), src.join("app.js")).unwrap();
    let manifest = std::fs::read_to_string(example.join("enrich-emails.toml")).unwrap();
    std::fs::write(src.join("enrich-emails.toml"), manifest.replace("8787", &service.port.to_string())).unwrap();
    let data = dir.path().join("data");
    let sample = example.join("sample.csv");
    let out = jobhost(&[
        "run",
        "--plugin-src",
        src.to_str().unwrap(),
        "--records",
        sample.to_str().unwrap(),
        "--job",
        "sheet:enrichEmails",
        "--data",
        data.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["job"]["status"], "complete", "{summary}");
    assert_eq!(summary["job"]["outcome"]["message"], "12 addresses checked, 5 flagged", "{summary}");
    // Warnings leave the records valid.
    assert_eq!((&summary["records"]["total"], &summary["records"]["error"]), (&json!(12), &json!(0)), "{summary}");
    assert!(data.join("plugins/enrich-emails.toml").is_file(), "the manifest is published beside the component");
}
