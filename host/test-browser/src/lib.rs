//! A real, headless Chromium for the console's tests and benchmarks, driven over WebDriver.
//!
//! [`session`] opens a browser session of its own for a test. The first one in a process:
//!
//! - finds Debian's `chromium` and `chromedriver` (`/usr/bin`), or installs them with
//!   `apt-get install chromium chromium-driver` when they are missing and this runs as root
//!   (as the build installs clang, and the PostgreSQL tests PostgreSQL);
//! - starts `chromedriver` on a free loopback port, in a process group of its own, and a small
//!   reaper process that kills that group (the driver and every browser it started) once this
//!   process has exited, however it exits.
//!
//! Nothing is mocked: pages load over HTTP from a real `jobhost serve`, scripts run, and what a
//! test reads is what the browser rendered.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use fantoccini::{Client, Locator};

/// Where the browser and its driver are.
#[derive(Debug, Clone)]
struct Installed {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

static DRIVER: OnceLock<Result<String, String>> = OnceLock::new();

fn first_file(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

fn find() -> Option<Installed> {
    Some(Installed {
        chromium: first_file(&["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"])?,
        chromedriver: first_file(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])?,
    })
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd.status().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("{cmd:?} failed with {status}")) }
}

fn install() -> Result<Installed, String> {
    if let Some(found) = find() {
        return Ok(found);
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !root {
        return Err("Chromium and its WebDriver are not installed: apt-get install chromium chromium-driver".into());
    }
    eprintln!("installing Chromium for the console tests (apt-get install chromium chromium-driver)");
    // Another test may be installing PostgreSQL at the same moment: wait for dpkg's lock.
    let install = || {
        run(Command::new("apt-get").args([
            "-o",
            "DPkg::Lock::Timeout=600",
            "install",
            "-y",
            "--no-install-recommends",
            "chromium",
            "chromium-driver",
        ]))
    };
    if install().is_err() {
        run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update"]))?;
        install()?;
    }
    find().ok_or_else(|| "apt-get installed chromium but /usr/bin/chromium or chromedriver is missing".into())
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn start_driver(log_dir: &Path) -> Result<String, String> {
    let installed = install()?;
    let port = free_port()?;
    std::fs::create_dir_all(log_dir).map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
    let log = log_dir.join(format!("chromedriver-{}.log", std::process::id()));
    // `setsid`: the driver leads a process group of its own, which the reaper kills whole.
    let child = Command::new("setsid")
        .arg(&installed.chromedriver)
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", installed.chromedriver.display()))?;
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -KILL -- -{driver} 2>/dev/null",
        me = std::process::id(),
        driver = child.id()
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the reaper: {e}"))?;
    // Ready once it accepts connections.
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("chromedriver did not listen on port {port} within 60 s (log: {})", log.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(format!("http://127.0.0.1:{port}"))
}

// Where the browser binary is, for the capabilities of each session.
static CHROMIUM: OnceLock<PathBuf> = OnceLock::new();

/// Opens a new browser session (a fresh profile: no cookies), 1400×1000, headless. `log_dir`
/// receives the driver's log (under `target/`).
pub async fn session(log_dir: &Path) -> Result<Client, String> {
    let dir = log_dir.to_path_buf();
    let driver = tokio::task::spawn_blocking(move || DRIVER.get_or_init(|| start_driver(&dir)).clone())
        .await
        .map_err(|e| e.to_string())??;
    let chromium = CHROMIUM.get_or_init(|| find().map(|i| i.chromium).unwrap_or_default());
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), "chrome".into());
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000", "--hide-scrollbars", "--no-first-run"],
        }),
    );
    fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver)
        .await
        .map_err(|e| format!("cannot open a browser session: {e}"))
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `within` of wall time; the
/// error names `what` and the last thing seen.
pub async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + within;
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e,
        }
        if Instant::now() > deadline {
            return Err(format!("{what} did not happen within {within:?} (last: {last})"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
