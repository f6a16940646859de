//! The `jobhost` binary: `run`, `demo` and `plugin check`, good input and bad; the plugin
//! author's loop in every language ([`authoring`]).
//!

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

mod authoring;

/// Runs the binary with a private compilation cache (nothing shared between runs or with CI).
fn jobhost(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jobhost")).args(args).env("XDG_CACHE_HOME", cache).output().expect("run jobhost")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_out(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}\n{}", String::from_utf8_lossy(&o.stdout), stderr(o)))
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        std::fs::copy(jobhost_test_plugins::SUBMIT_LARGE_SHEET, dir.path().join("plugins/submit-large-sheet.wasm"))
            .unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        self.path(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        jobhost(&self.dir.path().join("cache"), args)
    }
}

#[test]
fn run_json_on_a_small_csv() {
    let f = Fixture::new();
    let mut csv = String::from("firstName,lastName,email,age\n");
    let mut invalid = 0;
    for i in 0..2500 {
        let bad = i % 7 == 0;
        invalid += u32::from(bad);
        let email = if bad { format!("p{i}-at-example.com") } else { format!("p{i}@example.com") };
        csv.push_str(&format!("Ada,Lovelace,{email},{}\n", 20 + i % 50));
    }
    let records = f.write("people.csv", &csv);
    let out = f.run(&[
        "run",
        "--plugins",
        &f.path("plugins"),
        "--records",
        &records,
        "--job",
        "sheet:submitLargeSheet",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = json_out(&out);
    assert_eq!(s["job"]["status"], "complete");
    assert!(s["job"]["outcome"]["message"].as_str().unwrap().contains("3 of 3 parts completed"));
    assert_eq!(s["parts"], serde_json::json!({"total": 3, "completed": 3, "failed": 0, "canceled": 0}));
    assert_eq!(s["records"], serde_json::json!({"total": 2500, "valid": 2500 - invalid, "error": invalid}));
    assert_eq!(s["plugins"][0]["name"], "submit-large-sheet");
    assert_eq!(s["executions"]["total"], 5);
    assert_eq!(s["deadLetters"], 0);
}

/// A listener that acks its job and returns without ending it: `run` says at once which job
/// waits and why (even with `--json`), and after `--stale-timeout` the watchdog fails the job
/// and `run` exits 1 with the reason, instead of sitting silent for the 15 minutes of `serve`.
#[test]
fn run_names_an_abandoned_job_and_ends_at_the_stale_timeout() {
    let f = Fixture::new();
    std::fs::copy(jobhost_test_plugins::TEST_MISBEHAVE, f.dir.path().join("plugins/test-misbehave.wasm")).unwrap();
    let records = f.write("one.jsonl", r#"{"name":"Ada"}"#);
    let args = ["run", "--plugins", &f.path("plugins"), "--records", &records, "--job", "sheet:abandon"];
    let out = f.run(&[&args[..], &["--stale-timeout", "1", "--json"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("waiting: no delivery is pending or in flight, and 1 job(s) of this run have not ended"),
        "{err}"
    );
    assert!(
        err.contains("sheet:abandon (info: started, then left): executing: a listener acked it and returned"),
        "{err}"
    );
    assert!(err.contains("the watchdog fails it after 1 s without activity"), "{err}");
    let s = json_out(&out);
    assert_eq!(s["job"]["status"], "failed", "{s}");
    assert_eq!(s["job"]["outcome"]["heading"], "Stale", "{s}");
    let message = s["job"]["outcome"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("no ack or progress on job") && message.ends_with("for 1 s"), "{s}");
    for bad in ["0", "soon", "86401"] {
        let out = f.run(&[&args[..], &["--stale-timeout", bad]].concat());
        assert_eq!(out.status.code(), Some(2), "--stale-timeout {bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("--stale-timeout"), "{}", stderr(&out));
    }
}

#[test]
fn run_reads_jsonl_and_a_failed_job_exits_1() {
    let f = Fixture::new();
    let lines: Vec<String> = (0..1500)
        .map(|i| format!(r#"{{"firstName":"Ada","lastName":"L","email":"a{i}@b.co","age":{}}}"#, i % 100))
        .collect();
    let records = f.write("people.jsonl", &lines.join("\n"));
    let out = f.run(&[
        "run",
        "--plugins",
        &f.path("plugins"),
        "--records",
        &records,
        "--job",
        "sheet:submitLargeSheet",
        "--input",
        r#"{"failParts":[1]}"#,
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = json_out(&out);
    assert_eq!(s["job"]["status"], "failed");
    assert_eq!(s["parts"]["failed"], 1);
    assert_eq!(s["records"]["error"], 0);
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_code_2() {
    let f = Fixture::new();
    let good = f.write("ok.csv", "firstName,lastName,email\nA,B,a@b.co\n");
    let ragged = f.write("ragged.csv", "firstName,lastName,email\nA,B,a@b.co\nC,D\n");
    let headless = f.write("headless.csv", "firstName,,email\nA,B,a@b.co\n");
    let not_objects = f.write("lines.jsonl", "{\"a\":1}\n[1,2]\n");
    let bad_json = f.write("broken.jsonl", "{\"a\":\n");
    let other = f.write("people.xlsx", "x");
    let plugins = f.path("plugins");
    let job = "sheet:submitLargeSheet";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--plugins", &plugins, "--records", "/nonexistent/people.csv", "--job", job],
            "cannot read /nonexistent/people.csv",
        ),
        (vec!["run", "--plugins", &plugins, "--records", &ragged, "--job", job], "bad CSV at record 2"),
        (vec!["run", "--plugins", &plugins, "--records", &headless, "--job", job], "header row must name every column"),
        (vec!["run", "--plugins", &plugins, "--records", &not_objects, "--job", job], "line 2: expected a JSON object"),
        (vec!["run", "--plugins", &plugins, "--records", &bad_json, "--job", job], "broken.jsonl line 1"),
        (vec!["run", "--plugins", &plugins, "--records", &other, "--job", job], "unsupported format"),
        (
            vec!["run", "--plugins", &plugins, "--records", &good, "--job", "sheet:nobodyListens"],
            "no loaded plugin handles job:ready for sheet:nobodyListens",
        ),
        (
            vec!["run", "--plugins", &plugins, "--records", &good, "--job", "spreadsheet:x"],
            "unknown JobType `spreadsheet`",
        ),
        (vec!["run", "--plugins", &plugins, "--records", &good, "--job", "file:parse"], "must be a sheet job"),
        (
            vec!["run", "--plugins", &plugins, "--records", &good, "--job", "submitLargeSheet"],
            "must be <type>:<operation>",
        ),
        (
            vec!["run", "--plugins", &plugins, "--records", &good, "--job", job, "--input", "{nope"],
            "--input is not JSON",
        ),
        (
            vec!["run", "--plugins", "/nonexistent", "--records", &good, "--job", job],
            "cannot read the plugins directory",
        ),
        (vec!["demo", "--records", "10", "--concurrency", "0"], "--concurrency must be at least 1"),
    ];
    for (args, expected) in cases {
        let out = f.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expected), "{args:?}: expected {expected:?} in {:?}", stderr(&out));
    }
    // clap's own usage errors also exit 2.
    assert_eq!(f.run(&["run", "--plugins", &plugins]).status.code(), Some(2));
}

#[test]
fn plugin_check_prints_routes_or_the_reason() {
    let f = Fixture::new();
    let out = f.run(&["plugin", "check", &f.path("plugins/submit-large-sheet.wasm")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 route(s)"), "{text}");
    assert!(text.contains(r#"#2 job:ready {"isPart":true,"job":"sheet:submitLargeSheet"}"#), "{text}");

    let bad = f.write("bad.wasm", "not a component");
    let out = f.run(&["plugin", "check", &bad, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let s = json_out(&out);
    assert_eq!(s["ok"], false);
    assert!(s["error"].as_str().unwrap().contains("not a valid WebAssembly component"));
}

#[test]
fn demo_runs_the_seeds_scenario_with_the_plugin_and_natively() {
    let f = Fixture::new();
    for extra in [None, Some("--native")] {
        let mut args = vec!["demo", "--records", "3000", "--json"];
        args.extend(extra);
        let out = f.run(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        let s = json_out(&out);
        assert_eq!(s["job"]["status"], "complete");
        assert_eq!(s["parts"]["completed"], 3);
        assert_eq!(s["records"]["error"], s["expectedInvalid"]);
        assert!(s["records"]["error"].as_u64().unwrap() > 0);
    }
}

/// Reads a child's stderr line by line until a line contains `needle`; returns that line.
pub(crate) fn wait_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    needle: &str,
    seen: &mut Vec<String>,
) -> String {
    for line in lines.by_ref() {
        let line = line.expect("read stderr");
        seen.push(line.clone());
        if line.contains(needle) {
            return line;
        }
    }
    panic!("the process ended before printing {needle:?}:\n{}", seen.join("\n"));
}

/// A child process that is killed when the test lets go of it, also when it fails: a host
/// left running would keep the test's output pipes open and hang whoever reads them.
pub(crate) struct Reaped(std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with its stderr piped and a kill timer; returns the child and its stderr lines.
pub(crate) fn spawn_logged(
    cmd: &mut Command,
) -> (Reaped, std::io::Lines<std::io::BufReader<std::process::ChildStderr>>) {
    use std::io::BufRead;
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    kill_after(child.id(), 300);
    let lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    (Reaped(child), lines)
}

/// A safety net, not a synchronisation: a child that never prints what a test waits for is
/// killed, so the test fails with what it did print instead of hanging the suite.
pub(crate) fn kill_after(pid: u32, secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(secs));
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    });
}

/// A plain HTTP/1.1 GET; returns the whole response.
pub(crate) fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the API");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

fn publish(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

#[test]
fn serve_hot_reloads_rolls_back_and_stops_on_sigterm() {
    let f = Fixture::new();
    let plugins = f.dir.path().join("noop-plugins");
    std::fs::create_dir(&plugins).unwrap();
    let v1 = std::fs::read(jobhost_test_plugins::TEST_NOOP).unwrap();
    let mut v2 = v1.clone();
    v2.extend_from_slice(&[0, 4, 3, b'a', b'b', b'c']); // a custom section: same plugin, new version
    publish(&plugins, "noop", &v1);
    let (ver1, ver2) = (jobhost::runtime::version_of(&v1), jobhost::runtime::version_of(&v2));

    let (mut child, mut lines) = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_jobhost"))
            .args([
                "serve",
                "--plugins",
                plugins.to_str().unwrap(),
                "--data",
                &f.path("data"),
                "--listen",
                "127.0.0.1:0",
            ])
            .env("XDG_CACHE_HOME", f.dir.path().join("cache")),
    );
    let mut seen = Vec::new();
    assert!(wait_line(&mut lines, "loaded plugin noop", &mut seen).contains(&ver1));
    let listening = wait_line(&mut lines, "listening on http://", &mut seen);
    let addr = listening.rsplit("http://").next().unwrap().trim().to_owned();
    wait_line(&mut lines, "serving 1 plugin(s)", &mut seen);
    // The API answers on the printed address.
    let health = http_get(&addr, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok"), "{health}");
    assert!(http_get(&addr, "/v1/jobs").starts_with("HTTP/1.1 401"), "a token is needed");

    publish(&plugins, "noop", &v2);
    let line = wait_line(&mut lines, "loaded plugin noop version", &mut seen);
    assert!(line.contains(&format!("{ver2} (was {ver1})")), "{line}");

    let out = f.run(&["plugin", "list", "--plugins", plugins.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let list = json_out(&out);
    assert_eq!(list[0]["version"], ver2.as_str());
    assert_eq!(list[0]["kept"], serde_json::json!([ver2, ver1]));

    let out = f.run(&["plugin", "rollback", "noop", "--plugins", plugins.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ver1));
    let line = wait_line(&mut lines, "loaded plugin noop version", &mut seen);
    assert!(line.contains(&format!("{ver1} (was {ver2})")), "{line}");

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    wait_line(&mut lines, "stopping", &mut seen);
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", seen.join("\n"));
}

/// Runs `jobhost secret ARGS --data DATA` with `stdin` and the extra variables `vars`.
fn secret_cmd(data: &str, args: &[&str], stdin: &str, vars: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jobhost"))
        .arg("secret")
        .args(args)
        .args(["--data", data])
        .env_remove("JOBHOST_SECRET_KEY")
        .env_remove("JOBHOST_SECRET_KEY_FILE")
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `jobhost secret new-key PATH`, checked: the file is the owner's only.
fn new_key(path: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_jobhost")).args(["secret", "new-key", path]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}

#[test]
fn secrets_are_set_from_stdin_listed_by_name_and_deleted() {
    let f = Fixture::new();
    let data = f.path("data");
    let key = f.path("secret.key");
    new_key(&key);
    let again = Command::new(env!("CARGO_BIN_EXE_jobhost")).args(["secret", "new-key", &key]).output().unwrap();
    assert!(!again.status.success() && stderr(&again).contains("cannot create the key file"), "never over a key");
    let keyed = [("JOBHOST_SECRET_KEY_FILE", key.as_str())];
    let secret = |args: &[&str], stdin: &str| secret_cmd(&data, args, stdin, &keyed);

    // Without a key nothing is stored, and the error says what to do.
    let keyless = secret_cmd(&data, &["set", "API_KEY"], "s3cret\n", &[]);
    assert!(!keyless.status.success());
    assert!(stderr(&keyless).contains("no secret key") && stderr(&keyless).contains("jobhost secret new-key"));
    assert!(secret(&["list"], "").stdout.is_empty(), "the refused set stored nothing");

    assert!(secret(&["set", "API_KEY"], "s3cret\n").status.success());
    assert!(secret(&["set", "OTHER", "--environment", "staging"], "x").status.success());
    let list = secret_cmd(&data, &["list"], "", &[]);
    assert_eq!(String::from_utf8_lossy(&list.stdout), "API_KEY\n", "names only, of one environment, with no key");
    let bad = secret(&["set", "bad name"], "v");
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("is not a secret name"), "{}", stderr(&bad));
    assert!(secret(&["delete", "API_KEY"], "").status.success());
    let again = secret(&["delete", "API_KEY"], "");
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("has no secret API_KEY"));

    // The value arrives as given, without the newline.
    assert!(secret(&["set", "API_KEY"], "s3cret\n").status.success());
    let read = |key: &str| {
        let data = data.clone();
        let key = jobhost::SecretKey::from_file(Path::new(key)).unwrap();
        tokio::runtime::Runtime::new().unwrap().block_on(async move {
            let config = jobhost::EngineConfig { secret_key: Some(key), ..jobhost::EngineConfig::default() };
            let engine = jobhost::open_engine(Path::new(&data), config).unwrap();
            let env = engine.env(engine.environment_named("default").await.unwrap().id);
            env.secret("API_KEY").await
        })
    };
    assert_eq!(read(&key).unwrap(), "s3cret");

    // Rotation: every secret re-sealed with the new key; the old one then names both keys.
    let new = f.path("new.key");
    new_key(&new);
    let rotated = secret(&["rotate-key", "--new-key-file", &new], "");
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    assert!(stderr(&rotated).contains("re-sealed 2 secret(s)"), "{}", stderr(&rotated));
    assert_eq!(read(&new).unwrap(), "s3cret");
    let old = read(&key).unwrap_err().to_string();
    assert!(old.contains("was sealed with key"), "{old}");
    let stale = secret(&["set", "THIRD"], "v");
    assert!(!stale.status.success() && stderr(&stale).contains("was sealed with key"), "{}", stderr(&stale));
    // A key file others can read is refused, naming the fix.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = secret_cmd(&data, &["set", "THIRD"], "v", &[("JOBHOST_SECRET_KEY_FILE", new.as_str())]);
        assert!(stderr(&open).contains("can be read by others (mode 0644)"), "{}", stderr(&open));
    }
}

/// Every file under `dir`, recursively, with its bytes.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

#[test]
fn no_secret_or_token_is_kept_in_plain_text_in_the_store_files_or_the_logs() {
    let f = Fixture::new();
    let plugins = f.path("plugins");
    std::fs::copy(jobhost_test_plugins::TEST_HOSTILE, f.dir.path().join("plugins/hostile.wasm")).unwrap();
    std::fs::write(f.dir.path().join("plugins/hostile.toml"), "[grants]\nsecrets = [\"API_KEY\"]\n").unwrap();
    let (data, key) = (f.path("data"), f.path("secret.key"));
    new_key(&key);
    let value = format!("sk-live-{}", jobhost_engine::random_hex(12).unwrap());
    let set = secret_cmd(&data, &["set", "API_KEY"], &value, &[("JOBHOST_SECRET_KEY_FILE", key.as_str())]);
    assert!(set.status.success(), "{}", stderr(&set));

    let serve = |key: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jobhost"));
        cmd.args(["serve", "--plugins", &plugins, "--data", &data, "--listen", "127.0.0.1:0"])
            .env("XDG_CACHE_HOME", f.dir.path().join("cache"))
            .env("JOBHOST_ADMIN_TOKEN", "admin-for-tests")
            .env_remove("JOBHOST_SECRET_KEY")
            .env_remove("JOBHOST_SECRET_KEY_FILE");
        if let Some(key) = key {
            cmd.args(["--secret-key-file", key]);
        }
        cmd
    };
    // Without the key the host does not start, and says why.
    let keyless = serve(None).output().unwrap();
    assert!(!keyless.status.success());
    assert!(
        stderr(&keyless).contains("the store holds 1 secret(s) and this host has no secret key"),
        "{}",
        stderr(&keyless)
    );

    let (mut child, mut lines) = spawn_logged(&mut serve(Some(&key)));
    let mut log = Vec::new();
    let listening = wait_line(&mut lines, "listening on http://", &mut log);
    let addr = listening.rsplit("http://").next().unwrap().trim().to_owned();
    wait_line(&mut lines, "serving 2 plugin(s)", &mut log);
    let token = default_environment_token(&addr);
    let job = serde_json::json!({"type": "space", "operation": "use-secret"});
    let (status, job) = http(&addr, "POST", "/v1/jobs", &token, Some(&job));
    assert_eq!(status, 201, "{job}");
    let job_id = job["data"]["id"].as_str().unwrap().to_owned();
    wait_event(&addr, &token, &["\"job:completed\"", &job_id]);
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    log.extend(lines.map_while(Result::ok));
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", log.join("\n"));
    // The host stopped cleanly, so its execution records are committed: read them as it wrote them.
    let execution = {
        let (data, job_id) = (data.clone(), job_id.clone());
        tokio::runtime::Runtime::new().unwrap().block_on(async move {
            let engine = jobhost::open_engine(Path::new(&data), jobhost::EngineConfig::default()).unwrap();
            let env = engine.env(engine.environment_named("default").await.unwrap().id);
            env.executions(Some(&job_id), 10).await.unwrap().remove(0)
        })
    };
    assert!(execution.logs.contains("[hostile] printed [secret API_KEY]"), "{}", execution.logs);
    assert!(execution.logs.contains("[hostile] logged [secret API_KEY]"), "{}", execution.logs);

    let files = files_under(Path::new(&data));
    let (db, wal): (Vec<_>, Vec<_>) = (
        files.iter().filter(|(p, _)| p.to_string_lossy().ends_with(".db")).collect(),
        files.iter().filter(|(p, _)| p.to_string_lossy().ends_with("-wal")).collect(),
    );
    assert!(!db.is_empty(), "the scan reads the store: {:?}", files.iter().map(|f| &f.0).collect::<Vec<_>>());
    let contains = |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    // The scan finds what is stored in plain: the secret's name and the execution's masked log.
    let everything: Vec<u8> = db.iter().chain(&wal).flat_map(|(_, b)| b.iter().copied()).collect();
    assert!(contains(&everything, "API_KEY") && contains(&everything, "[secret API_KEY]"), "the scan sees plain text");
    let log_text = log.join("\n");
    for needle in [value.as_str(), token.as_str(), &token["jh_".len()..], "admin-for-tests"] {
        for (path, bytes) in &files {
            assert!(!contains(bytes, needle), "{needle} is in {} in plain text", path.display());
        }
        assert!(!log_text.contains(needle), "{needle} is in the host's log:\n{log_text}");
        assert!(!execution.logs.contains(needle), "{needle} is in the execution record: {}", execution.logs);
    }
}

/// One HTTP/1.1 request over a fresh connection; returns the status and the JSON body.
pub(crate) fn http(addr: &str, method: &str, path: &str, token: &str, body: Option<&Value>) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the API");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let json =
        out.split_once("\r\n\r\n").map(|(_, b)| serde_json::from_str(b).unwrap_or(Value::Null)).unwrap_or_default();
    (status, json)
}

/// Follows the event stream from the start until an event's `data` line contains every needle.
pub(crate) fn wait_event(addr: &str, token: &str, needles: &[&str]) {
    use std::io::{BufRead, Write};
    const DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the API");
    // A stream that goes quiet fails the read; one that keeps talking meets the deadline.
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let started = std::time::Instant::now();
    write!(stream, "GET /v1/events/stream?since=0 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut lines = std::io::BufReader::new(stream).lines();
    let status = lines.next().and_then(Result::ok).unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        panic!("the event stream was refused: {status}\n{}", rest.join("\n"));
    }
    for line in lines {
        let line = line.unwrap_or_else(|e| panic!("no event with {needles:?} on the stream within {DEADLINE:?}: {e}"));
        assert!(started.elapsed() < DEADLINE, "no event with {needles:?} on the stream within {DEADLINE:?}");
        if line.starts_with("data: ") && needles.iter().all(|n| line.contains(n)) {
            return;
        }
    }
    panic!("the event stream ended before an event with {needles:?}");
}

/// A new token for the environment `serve` made at its first start, through the admin API.
pub(crate) fn default_environment_token(addr: &str) -> String {
    let (status, envs) = http(addr, "GET", "/v1/environments", "admin-for-tests", None);
    assert_eq!(status, 200, "{envs}");
    let env_id = envs["data"][0]["id"].as_str().unwrap().to_owned();
    let body = serde_json::json!({"name": "tests"});
    let (_, token) = http(addr, "POST", &format!("/v1/environments/{env_id}/tokens"), "admin-for-tests", Some(&body));
    token["data"]["token"].as_str().unwrap().to_owned()
}

fn start_serve(
    f: &Fixture,
    plugins: &str,
) -> (Reaped, String, Vec<String>, impl Iterator<Item = std::io::Result<String>>) {
    let (child, mut lines) = spawn_logged(
        Command::new(env!("CARGO_BIN_EXE_jobhost"))
            .args(["serve", "--plugins", plugins, "--data", &f.path("data"), "--listen", "127.0.0.1:0"])
            .env("XDG_CACHE_HOME", f.dir.path().join("cache"))
            .env("JOBHOST_ADMIN_TOKEN", "admin-for-tests"),
    );
    let mut seen = Vec::new();
    let listening = wait_line(&mut lines, "listening on http://", &mut seen);
    let addr = listening.rsplit("http://").next().unwrap().trim().to_owned();
    wait_line(&mut lines, "serving 1 plugin(s)", &mut seen);
    (child, addr, seen, lines)
}

#[test]
fn serve_stopped_mid_scenario_finishes_the_job_after_a_restart() {
    let f = Fixture::new();
    let plugins = f.path("plugins");
    let (mut child, addr, mut seen, mut lines) = start_serve(&f, &plugins);
    let token = default_environment_token(&addr);
    let (_, sheet) = http(&addr, "POST", "/v1/sheets", &token, Some(&serde_json::json!({"name": "people"})));
    let sheet_id = sheet["data"]["id"].as_str().unwrap().to_owned();
    let (records, _) = jobhost::scenario::sample_records(30_000);
    for chunk in records.chunks(10_000) {
        let (status, body) = http(
            &addr,
            "POST",
            &format!("/v1/sheets/{sheet_id}/records"),
            &token,
            Some(&serde_json::to_value(chunk).unwrap()),
        );
        assert_eq!(status, 201, "{body}");
    }
    let new_job = serde_json::json!({"type": "sheet", "operation": jobhost::scenario::OPERATION, "source": sheet_id});
    let (status, job) = http(&addr, "POST", "/v1/jobs", &token, Some(&new_job));
    assert_eq!(status, 201, "{job}");
    let job_id = job["data"]["id"].as_str().unwrap().to_owned();
    // Mid-scenario: the parent split and at least one part completed.
    wait_event(&addr, &token, &["\"job:completed\"", "\"isPart\":true", &job_id]);
    let (_, parts) = http(&addr, "GET", &format!("/v1/jobs?parentId={job_id}"), &token, None);
    let done = parts["data"].as_array().unwrap().iter().filter(|p| p["status"] == "complete").count();
    assert!((1..30).contains(&done), "mid-scenario: {done} of 30 parts complete");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    wait_line(&mut lines, "stopping", &mut seen);
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", seen.join("\n"));

    let (mut child, addr, seen, _lines) = start_serve(&f, &plugins);
    let (status, _) = http(&addr, "GET", &format!("/v1/jobs/{job_id}"), &token, None);
    assert_eq!(status, 200, "the token and the job survive the restart");
    wait_event(&addr, &token, &["\"job:completed\"", &format!("\"jobId\":\"{job_id}\""), "\"isPart\":false"]);
    let (_, job) = http(&addr, "GET", &format!("/v1/jobs/{job_id}"), &token, None);
    assert_eq!(job["data"]["status"], "complete", "{job}");
    assert_eq!(job["data"]["outcome"]["parts"]["total"], 30);
    let (_, parts_completed) = http(&addr, "GET", "/v1/events?limit=1000&topic=job:parts-completed", &token, None);
    assert_eq!(parts_completed["data"].as_array().unwrap().len(), 1, "exactly one job:parts-completed");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", seen.join("\n"));
}

/// Runs an operator command against `addr` with `token` (through `JOBHOST_TOKEN`).
fn operator(f: &Fixture, addr: &str, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_jobhost"))
        .args(args)
        .env("JOBHOST_URL", format!("http://{addr}"))
        .env("JOBHOST_TOKEN", token)
        .env("XDG_CACHE_HOME", f.dir.path().join("cache"))
        .output()
        .expect("run jobhost")
}

#[test]
fn operator_commands_drive_a_running_host_over_the_api() {
    let f = Fixture::new();
    let plugins = f.path("plugins");
    let (mut child, addr, seen, _lines) = start_serve(&f, &plugins);
    let token = default_environment_token(&addr);
    let run = |args: &[&str]| operator(&f, &addr, &token, args);
    let ok = |args: &[&str]| {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        out
    };
    let (_, sheet) = http(&addr, "POST", "/v1/sheets", &token, Some(&serde_json::json!({"name": "import"})));
    let sheet_id = sheet["data"]["id"].as_str().unwrap().to_owned();
    let count = |sheet: &str| {
        http(&addr, "GET", &format!("/v1/sheets/{sheet}/counts"), &token, None).1["data"]["total"].clone()
    };

    // records import: 25,000 records in batches of 10,000, in the file's order.
    let lines: String = (0..25_000).map(|i| format!("{{\"n\": {i}, \"name\": \"row {i}\"}}\n")).collect();
    let file = f.write("people.jsonl", &lines);
    let out = ok(&["records", "import", &file, "--sheet", &sheet_id, "--json"]);
    let report = json_out(&out);
    assert_eq!(report["imported"], 25_000, "{report}");
    assert_eq!(count(&sheet_id), 25_000);
    let (_, page) =
        http(&addr, "GET", &format!("/v1/sheets/{sheet_id}/records?pageSize=10000&pageNumber=3"), &token, None);
    assert_eq!(page["data"]["records"][0]["values"]["n"]["value"], 20_000, "batches kept the file's order");

    // A malformed file changes nothing and names the line; --skip resumes past what is stored.
    let mut bad = lines.clone();
    bad.push_str("{\"n\": 25000}\n[1, 2]\n");
    let bad = f.write("bad.jsonl", &bad);
    let out = run(&["records", "import", &bad, "--sheet", &sheet_id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("line 25002: expected a JSON object"), "{}", stderr(&out));
    assert_eq!(count(&sheet_id), 25_000, "nothing was sent");
    let more = f.write("more.jsonl", &format!("{lines}{{\"n\": 25000}}\n{{\"n\": 25001}}\n"));
    let out = ok(&["records", "import", &more, "--sheet", &sheet_id, "--skip", "25000", "--json"]);
    assert_eq!(json_out(&out)["imported"], 2);
    assert_eq!(count(&sheet_id), 25_002);
    let out = run(&["records", "import", &file, "--sheet", "us_sh_nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not-found"), "{}", stderr(&out));

    // plugin deploy | list | rollback over the API.
    let noop = jobhost_test_plugins::TEST_NOOP;
    let v1 = jobhost::runtime::version_of(&std::fs::read(noop).unwrap());
    let out = ok(&["plugin", "deploy", noop, "--name", "extra", "--json"]);
    assert_eq!(json_out(&out)["kind"], "loaded");
    let out = ok(&["plugin", "deploy", jobhost_test_plugins::TEST_MISBEHAVE, "--name", "extra", "--json"]);
    assert_eq!(json_out(&out)["previous"], v1.as_str());
    let list = json_out(&ok(&["plugin", "list", "--json"]));
    let extra = list.as_array().unwrap().iter().find(|p| p["name"] == "extra").expect("extra is listed").clone();
    assert_eq!(extra["kept"].as_array().unwrap().len(), 2, "{extra}");
    let out = ok(&["plugin", "rollback", "extra"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("→ {v1}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = run(&["plugin", "deploy", &file, "--name", "broken"]);
    assert_eq!(out.status.code(), Some(2), "a file that is not a component is refused");
    // A source directory is built first and deployed under the directory's name.
    let src = f.path("dir-deploy");
    ok(&["plugin", "new", "dir-deploy", "--lang", "c", "--dir", &src]);
    let deployed = json_out(&ok(&["plugin", "deploy", &src, "--json"]));
    assert_eq!(
        (deployed["kind"].as_str(), deployed["name"].as_str()),
        (Some("loaded"), Some("dir-deploy")),
        "{deployed}"
    );

    // jobs list | get | cancel | retry.
    let (_, job) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&serde_json::json!({"type": "space", "operation": "manual", "trigger": "manual"})),
    );
    let job_id = job["data"]["id"].as_str().unwrap().to_owned();
    let jobs = json_out(&ok(&["jobs", "list", "--json"]));
    assert!(jobs.as_array().unwrap().iter().any(|j| j["id"] == job_id.as_str()), "{jobs}");
    let table = String::from_utf8_lossy(&ok(&["jobs", "list"]).stdout).into_owned();
    assert!(table.starts_with("ID") && table.contains(&job_id), "{table}");
    assert_eq!(json_out(&ok(&["jobs", "get", &job_id, "--json"]))["status"], "created");
    assert!(String::from_utf8_lossy(&ok(&["jobs", "get", &job_id]).stdout).contains("status     created"));
    assert_eq!(json_out(&ok(&["jobs", "cancel", &job_id, "--info", "not needed", "--json"]))["status"], "canceled");
    let (_, failing) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&serde_json::json!({"type": "space", "operation": "manual", "trigger": "manual"})),
    );
    let failing = failing["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        http(&addr, "POST", &format!("/v1/jobs/{failing}/execute"), &token, Some(&serde_json::json!({}))).0,
        200
    );
    assert_eq!(http(&addr, "POST", &format!("/v1/jobs/{failing}/fail"), &token, Some(&serde_json::json!({}))).0, 200);
    assert_eq!(json_out(&ok(&["jobs", "retry", &failing, "--json"]))["attempt"], 2);
    let out = run(&["jobs", "retry", &job_id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("409 conflict"), "{}", stderr(&out));

    // Refusals: a wrong token, no token, a host that is not there.
    let out = operator(&f, &addr, "jh_wrong", &["jobs", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("401 unauthorized"), "{}", stderr(&out));
    let out = operator(&f, &addr, "", &["jobs", "list"]);
    assert!(out.status.code() == Some(2) && stderr(&out).contains("no token"), "{}", stderr(&out));
    let out = operator(&f, "127.0.0.1:1", &token, &["jobs", "list"]);
    assert!(out.status.code() == Some(2) && stderr(&out).contains("cannot reach jobhost"), "{}", stderr(&out));

    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{}", seen.join("\n"));
}

/// CI's overall deadline stops a run that outlives it and names the test binary and the tests
/// that had not finished (libtest's "running for over 60 seconds" lines without an end).
#[test]
fn the_ci_deadline_names_the_tests_still_running_and_stops_them() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/deadline");
    let fake = "echo '     Running tests/main.rs (target/debug/deps/integration-0123)'; \
                echo 'test slow::stuck has been running for over 60 seconds'; \
                echo 'test slow::done has been running for over 60 seconds'; \
                echo 'test slow::done ... ok'; \
                exec sleep 600";
    let out = Command::new("bash").arg(&script).args(["1", "sh", "-c", fake]).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(124), "{err}");
    assert!(err.contains("still running after 1 s"), "{err}");
    assert!(err.contains("test binary: tests/main.rs (target/debug/deps/integration-0123)"), "{err}");
    assert!(err.contains("still running: slow::stuck"), "{err}");
    assert!(!err.contains("still running: slow::done"), "a finished test is not named: {err}");
    // Within the deadline, the command's own status.
    let out = Command::new("bash").arg(&script).args(["60", "sh", "-c", "echo fine; exit 3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "fine\n");
}
