//! A real PostgreSQL server for jobhost's tests and benchmarks, started by the tests themselves.
//!
//! [`server`] returns the one server of this test process:
//!
//! - `JOBHOST_TEST_POSTGRES` (a connection URL to a superuser, e.g.
//!   `postgres://postgres@127.0.0.1:5432/postgres`) names a running server to use; or
//! - a throwaway cluster is made from Debian's PostgreSQL binaries
//!   (`/usr/lib/postgresql/<version>/bin`; installed with `apt-get install postgresql` when
//!   absent and running as root): `initdb` as the `postgres` user (it refuses root) in
//!   `target/test-postgres/<pid>-…`, started on a free loopback port. A small reaper process
//!   stops it and removes its directory once this process has exited, however it exits.
//!
//! Each test takes its own database with [`Server::fresh_database`]. Nothing is mocked: every
//! statement runs on a real server. The throwaway cluster runs with `fsync = off` (the tests
//! never pull the power); [`Server::start_durable`] starts one with PostgreSQL's defaults for
//! benchmarks.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A PostgreSQL server the tests may create databases in.
#[derive(Debug, Clone)]
pub struct Server {
    admin_url: String,
    port: Option<u16>,
    dir: Option<PathBuf>,
    bin: Option<PathBuf>,
    /// The server's command-line options, for a restart.
    options: String,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// The test server of this process, started on first use (see the crate documentation).
///
/// # Panics
/// When no server can be started; the message says why and what to install.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("JOBHOST_TEST_POSTGRES") {
        Ok(url) if !url.trim().is_empty() => {
            Server { admin_url: url, port: None, dir: None, bin: None, options: String::new() }
        }
        _ => Server::start(false).unwrap_or_else(|e| panic!("cannot start a PostgreSQL server for the tests: {e}")),
    })
}

impl Server {
    /// Starts a new throwaway cluster of its own (for a test that stops and restarts it).
    pub fn start_throwaway() -> Result<Self, String> {
        Self::start(false)
    }

    /// Starts a new throwaway cluster with PostgreSQL's default durability (`fsync = on`), for
    /// benchmarks. Both kinds load `pg_stat_statements` when the server has it.
    pub fn start_durable() -> Result<Self, String> {
        Self::start(true)
    }

    fn start(durable: bool) -> Result<Self, String> {
        let bin = postgres_bin()?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-postgres");
        std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        remove_abandoned(&root);
        let dir = root.join(format!("{}-{}", std::process::id(), fastrand::u32(..)));
        let data = dir.join("data");
        let socket = dir.join("socket");
        std::fs::create_dir_all(&socket).map_err(|e| format!("cannot create {}: {e}", socket.display()))?;
        let root_user = is_root();
        if root_user {
            run(Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir))?;
        }
        run(as_postgres(&bin.join("initdb"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions", "-D"])
            .arg(&data))?;

        let port = free_port()?;
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=128MB",
            socket.display()
        );
        if bin.join("../lib/pg_stat_statements.so").exists() {
            // Benchmarks count the statements per job.
            options.push_str(" -c shared_preload_libraries=pg_stat_statements");
        }
        if !durable {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        run(as_postgres(&bin.join("pg_ctl"))
            .args(["-w", "-t", "120", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-o", &options, "start"]))?;

        // The reaper: once this process is gone, stop the server and remove its files. A
        // shell loop is the one watcher that outlives us without unsafe code (no prctl).
        let pg_ctl = bin.join("pg_ctl");
        let stop = if root_user {
            format!("runuser -u postgres -- '{}' -D '{}' -m immediate stop", pg_ctl.display(), data.display())
        } else {
            format!("'{}' -D '{}' -m immediate stop", pg_ctl.display(), data.display())
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = dir.display()
        );
        // In a session of its own: a job control that kills this process's group (a shell
        // ending a job, a CI step timing out) must not take the reaper with it.
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the reaper: {e}"))?;

        Ok(Self {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port: Some(port),
            dir: Some(dir),
            bin: Some(bin),
            options,
        })
    }

    /// The URL of the server's `postgres` database, as a superuser.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The loopback port of a throwaway cluster (`None` for a server named by the environment).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The process id of a throwaway cluster's postmaster, while it runs (for benchmarks that
    /// measure the server's CPU time).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let pid = std::fs::read_to_string(self.dir.as_ref()?.join("data/postmaster.pid")).ok()?;
        pid.lines().next()?.trim().parse().ok()
    }

    /// A new, empty database; returns its URL.
    ///
    /// # Panics
    /// When the server refuses.
    pub fn fresh_database(&self) -> String {
        let name = format!(
            "jobhost_test_{}_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let admin = self.admin_url.clone();
        let create = name.clone();
        // The synchronous client runs its own runtime: keep it off the caller's (a tokio test).
        std::thread::spawn(move || -> Result<(), postgres::Error> {
            let mut client = postgres::Client::connect(&admin, postgres::NoTls)?;
            client.batch_execute(&format!("CREATE DATABASE {create}"))
        })
        .join()
        .expect("create database thread")
        .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        database_url(&self.admin_url, &name)
    }

    /// Stops the server (fast shutdown) and waits; [`Server::restart`] brings it back.
    pub fn stop(&self) -> Result<(), String> {
        self.pg_ctl(&["-w", "-m", "fast", "stop"])
    }

    /// Starts a server stopped by [`Server::stop`] again, on the same port and data.
    pub fn restart(&self) -> Result<(), String> {
        let dir = self.dir.as_ref().ok_or("only a throwaway cluster can be restarted")?;
        let (log, options) = (dir.join("server.log"), self.options.clone());
        self.pg_ctl(&["-w", "-t", "120", "-l", &log.display().to_string(), "-o", &options, "start"])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let (Some(bin), Some(dir)) = (&self.bin, &self.dir) else {
            return Err("only a throwaway cluster can be stopped".into());
        };
        let mut c = as_postgres(&bin.join("pg_ctl"));
        c.arg("-D").arg(dir.join("data")).args(args);
        run(&mut c)
    }
}

/// `url` with its database replaced by `name`.
pub fn database_url(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

fn postgres_bin() -> Result<PathBuf, String> {
    if let Some(bin) = find_bin() {
        return Ok(bin);
    }
    if !is_root() {
        return Err("PostgreSQL's server binaries are not installed (apt-get install postgresql), \
                    or set JOBHOST_TEST_POSTGRES to a server's URL"
            .into());
    }
    eprintln!("installing PostgreSQL for the tests (apt-get install postgresql)");
    let install = || run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "postgresql"]));
    if install().is_err() {
        run(Command::new("apt-get").arg("update"))?;
        install()?;
    }
    find_bin().ok_or_else(|| "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb".into())
}

/// The newest `/usr/lib/postgresql/<major>/bin` with `initdb`.
fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// `program` run as the `postgres` user when we are root (PostgreSQL refuses to run as root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot find a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn run(c: &mut Command) -> Result<(), String> {
    let out = c.stdin(Stdio::null()).output().map_err(|e| format!("cannot run {c:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{c:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Clusters left by processes that no longer run (their reaper died with the machine). A
/// cluster's directory is named `<pid>-<random>` after the process that made it.
fn remove_abandoned(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        if entry.path().join("data/postmaster.pid").exists()
            && let Some(bin) = find_bin()
        {
            // Its process and its reaper are gone, its server may not be: stop it first.
            let _ = run(as_postgres(&bin.join("pg_ctl")).arg("-D").arg(entry.path().join("data")).args([
                "-m",
                "immediate",
                "stop",
            ]));
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_url_replaces_the_database() {
        assert_eq!(super::database_url("postgres://u@h:1/postgres", "x"), "postgres://u@h:1/x");
        assert_eq!(super::database_url("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(super::database_url("postgres://u@h/db?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    }
}
