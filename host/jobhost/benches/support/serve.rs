//! A `jobhost serve` process for the benchmarks that measure the product as users run it.

use std::io::BufRead;

/// A running `jobhost serve`, stopped when dropped.
pub struct Serve {
    child: std::process::Child,
    /// `host:port` it listens on.
    pub addr: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `jobhost serve` with its data, plugins and cache under `dir/name-*`, the admin token
/// `bench-admin` and `args` added; returns once it listens and serves its plugins.
pub fn serve(dir: &std::path::Path, name: &str, args: &[&str]) -> Serve {
    std::fs::create_dir_all(dir.join(format!("{name}-plugins"))).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_jobhost"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .arg("--plugins")
        .arg(dir.join(format!("{name}-plugins")))
        .arg("--data")
        .arg(dir.join(format!("{name}-data")))
        .env("XDG_CACHE_HOME", dir.join(format!("{name}-cache")))
        .env("JOBHOST_ADMIN_TOKEN", "bench-admin")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start jobhost serve");
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut addr, mut seen) = (String::new(), Vec::new());
    for line in lines.by_ref() {
        let line = line.expect("read the host's log");
        seen.push(line.clone());
        if let Some(a) = line.split("listening on http://").nth(1) {
            addr = a.trim().to_owned();
        }
        if line.contains("serving ") {
            break;
        }
    }
    assert!(!addr.is_empty(), "jobhost serve ended before listening:\n{}", seen.join("\n"));
    // Keep draining the log so the host never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Serve { child, addr }
}

/// Sends a request and reads its JSON answer.
pub async fn answer(request: reqwest::RequestBuilder) -> serde_json::Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// The first environment's id and a new token for it (through the admin token).
pub async fn environment_token(http: &reqwest::Client, addr: &str) -> (String, String) {
    let envs = answer(http.get(format!("http://{addr}/v1/environments")).bearer_auth("bench-admin")).await;
    let env_id = envs["data"][0]["id"].as_str().unwrap().to_owned();
    let token = answer(
        http.post(format!("http://{addr}/v1/environments/{env_id}/tokens"))
            .bearer_auth("bench-admin")
            .json(&serde_json::json!({"name": "bench"})),
    )
    .await;
    (env_id, token["data"]["token"].as_str().unwrap().to_owned())
}
