//! Outbound HTTP from plugins (`wasi:http`): granted hosts work; everything else is refused or
//! cut with the right attribution, the host unharmed, and a second environment's plugin keeps
//! completing its work meanwhile. The servers are loopback servers these tests start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::support::{TestHost, test_config, test_runtime_config, until_terminal};
use jobhost::model::{Execution, HttpCall, JobStatus, JobType, NewJob};
use jobhost::runtime::{Plugin, Runtime, RuntimeConfig};
use jobhost::{EngineConfig, Env};
use jobhost_test_plugins as artifacts;

/// A loopback server with one route per behaviour a test needs; counts `/count` requests.
struct Server {
    port: u16,
    counted: Arc<AtomicU64>,
}

impl Server {
    async fn start() -> Self {
        let counted = Arc::new(AtomicU64::new(0));
        let c = counted.clone();
        let app = Router::new()
            .route("/hello", get(|| async { ([("x-test", "yes")], "hello") }))
            .route(
                "/echo",
                post(|headers: HeaderMap, body: axum::body::Bytes| async move {
                    let tag = headers.get("x-tag").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                    (StatusCode::CREATED, format!("{tag}:{}", String::from_utf8_lossy(&body)))
                }),
            )
            .route(
                "/status/{code}",
                get(|axum::extract::Path(code): axum::extract::Path<u16>| async move {
                    StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT)
                }),
            )
            .route(
                "/chunked",
                get(|| async {
                    let parts = (0..5).map(|i| Ok::<_, std::io::Error>(format!("part{i};")));
                    Body::from_stream(futures_util::stream::iter(parts))
                }),
            )
            .route(
                "/redirect",
                get(|| async { (StatusCode::FOUND, [("location", "http://169.254.169.254/latest/meta-data/")]) }),
            )
            .route("/never", get(std::future::pending::<String>))
            .route(
                "/huge",
                get(|| async {
                    // 1 GiB in 64 KiB chunks, made as they are read.
                    let chunk = axum::body::Bytes::from(vec![b'z'; 64 << 10]);
                    let chunks = (0..16_384).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
                    Body::from_stream(futures_util::stream::iter(chunks)).into_response()
                }),
            )
            .route(
                "/drip",
                get(|| async {
                    let drip = futures_util::stream::unfold((), |()| async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Some((Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b".")), ()))
                    });
                    Body::from_stream(drip)
                }),
            )
            .route(
                "/count",
                get(move || {
                    let c = c.clone();
                    async move {
                        c.fetch_add(1, Ordering::SeqCst);
                        "ok"
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Server { port, counted }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// The HTTP plugin in one environment (granted the test server by address, and `localhost`
/// on its port by name), the well-behaved one in another.
struct Arena {
    host: TestHost,
    attacker: Env,
    victim: Env,
    rt: Arc<Runtime>,
    running: jobhost::delivery::Running,
    server: Server,
    _plugins: tempfile::TempDir,
}

impl Arena {
    async fn new() -> Self {
        let server = Server::start().await;
        let host = TestHost::with_config(EngineConfig { max_attempts: 1, ..test_config() });
        let (attacker, victim) = (host.env().await, host.env().await);
        let manifest = format!(
            "[limits]\nwall_ms = 20000\nhttp_first_byte_ms = 1000\nhttp_total_ms = 3000\n\
             http_response_bytes = 1048576\nhttp_request_bytes = 65536\nhttp_requests = 50\n\n\
             [grants]\nallowed_outbound_hosts = [\"http://127.0.0.1:{port}\", \"http://localhost:{port}\"]\n",
            port = server.port
        );
        let rt = Runtime::new(RuntimeConfig { max_instances: 64, ..test_runtime_config() }).unwrap();
        let (plugin, dir) = with_manifest(&rt, artifacts::TEST_HTTP.as_ref(), "http", &manifest).await;
        let noop = Arc::new(rt.load(std::path::Path::new(artifacts::TEST_NOOP)).await.unwrap());
        let running =
            host.engine.run(vec![rt.listener(plugin, attacker.id()), rt.listener(noop, victim.id())]).await.unwrap();
        Self { host, attacker, victim, rt, running, server, _plugins: dir }
    }

    /// Runs the plugin on `requests`; returns the job's results and the delivery's record.
    async fn run(&self, requests: Value) -> (Vec<Value>, Execution) {
        let new = NewJob { input: json!({ "requests": requests }), ..NewJob::new(JobType::Space, "http") };
        let job = self.attacker.create_job(new).await.unwrap();
        // The delivery's record is stored as the delivery ends: wait for it rather than for the
        // job, so a delivery that fails (and leaves the job open) fails the test with its reason.
        let execution = record_of(&self.host, &self.attacker, &job.id).await;
        let job = self.attacker.job(&job.id).await.unwrap();
        assert_eq!(job.status, JobStatus::Complete, "{job:?}\n{execution:?}");
        (job.outcome["results"].as_array().unwrap().clone(), execution)
    }

    /// A job in the victim's environment, run to completion by its well-behaved plugin.
    async fn witness(&self) {
        let job = self.victim.create_job(NewJob::new(JobType::Space, "work")).await.unwrap();
        assert_eq!(until_terminal(&self.victim, &job.id).await.status, JobStatus::Complete);
    }

    fn count(&self, origin: &str, result: &str) -> u64 {
        let stats = self.rt.stats().http();
        stats
            .iter()
            .filter(|(p, o, r, _)| p == "http" && o == origin && *r == result)
            .map(|(_, _, _, c)| c.requests)
            .sum()
    }

    async fn stop(self) {
        self.running.shutdown().await;
        drop(self.host);
    }
}

/// Component `from` loaded by `rt` as plugin `name` with `manifest` beside it (the directory
/// must outlive the plugin's deliveries).
async fn with_manifest(
    rt: &Arc<Runtime>,
    from: &std::path::Path,
    name: &str,
    manifest: &str,
) -> (Arc<Plugin>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.wasm"));
    std::fs::copy(from, &path).unwrap();
    std::fs::write(dir.path().join(format!("{name}.toml")), manifest).unwrap();
    (Arc::new(rt.load(&path).await.unwrap_or_else(|e| panic!("{e}"))), dir)
}

/// The record of the first delivery for job `id`, once it is stored (as the delivery ends,
/// just after what the handler did to the job).
async fn record_of(host: &TestHost, env: &Env, id: &str) -> Execution {
    let (env, id) = (env.clone(), id.to_owned());
    jobhost_engine::conformance::wait_for(&host.engine, "the delivery's record", move || {
        let (env, id) = (env.clone(), id.clone());
        async move { Ok(env.executions(Some(&id), 10).await?.into_iter().next()) }
    })
    .await
    .unwrap()
}

fn call<'a>(e: &'a Execution, path: &str) -> &'a HttpCall {
    e.http.iter().find(|c| c.path == path).unwrap_or_else(|| panic!("no call to {path}: {:?}", e.http))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_host_answers_get_and_post_and_each_request_is_on_the_record() {
    let a = Arena::new().await;
    let origin = format!("http://127.0.0.1:{}", a.server.port);
    let (results, exec) = a
        .run(json!([
            { "url": a.server.url("/hello?token=secret-in-query") },
            { "method": "POST", "url": a.server.url("/echo"), "body": "ping", "headers": { "x-tag": "header-secret" } },
            { "url": a.server.url("/status/404") },
            { "url": a.server.url("/chunked") },
        ]))
        .await;
    assert_eq!(results[0], json!({"status": 200, "bytes": 5, "text": "hello", "header": "yes"}));
    assert_eq!((results[1]["status"].clone(), results[1]["text"].clone()), (json!(201), json!("header-secret:ping")));
    assert_eq!(results[2]["status"], 404);
    assert_eq!(results[3]["text"], "part0;part1;part2;part3;part4;");
    // The record: origin, the path without its query, status, bytes each way — no headers, no body.
    assert_eq!(exec.http.len(), 4);
    let hello = call(&exec, "/hello");
    assert_eq!((hello.method.as_str(), hello.origin.as_str(), hello.status), ("GET", origin.as_str(), Some(200)));
    assert_eq!((hello.sent_bytes, hello.received_bytes, hello.error.clone()), (0, 5, None));
    let echo = call(&exec, "/echo");
    assert_eq!((echo.method.as_str(), echo.status, echo.sent_bytes, echo.received_bytes), ("POST", Some(201), 4, 18));
    assert_eq!(call(&exec, "/chunked").received_bytes, 30);
    let record = serde_json::to_string(&exec).unwrap();
    assert!(!record.contains("secret-in-query") && !record.contains("header-secret"), "{record}");
    assert_eq!(a.count(&origin, "ok"), 4);
    a.witness().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_not_granted_and_denied_addresses_are_refused_with_the_reason() {
    let a = Arena::new().await;
    let port = a.server.port;
    let (results, exec) = a
        .run(json!([
            // Another port of the same address: not granted.
            { "url": format!("http://127.0.0.1:{}/hello", port + 1) },
            // An address literal nobody granted.
            { "url": "http://10.1.2.3/latest" },
            // A granted name that resolves to a loopback address: refused all the same.
            { "url": format!("http://localhost:{port}/hello") },
            // A redirect reaches the plugin as it is; following it is a new request, refused.
            { "url": a.server.url("/redirect"), "follow": true },
            { "url": "https://example.com/" },
        ]))
        .await;
    for (i, r) in results.iter().enumerate() {
        if i != 3 {
            assert!(r["error"].as_str().is_some(), "result {i} is an error: {r}");
        }
    }
    assert_eq!(results[3], json!({"status": 302, "location": "http://169.254.169.254/latest/meta-data/"}));
    assert!(results[4]["error"].as_str().unwrap().contains("HttpRequestDenied"), "{}", results[4]);
    let by_origin =
        |o: &str| exec.http.iter().find(|c| c.origin == o).unwrap_or_else(|| panic!("{o}: {:?}", exec.http));
    let other_port = by_origin(&format!("http://127.0.0.1:{}", port + 1));
    assert!(
        other_port.error.as_deref().unwrap().contains("is not granted: add it to allowed_outbound_hosts"),
        "{other_port:?}"
    );
    assert!(by_origin("http://10.1.2.3:80").error.as_deref().unwrap().contains("is not granted"));
    let named = by_origin(&format!("http://localhost:{port}"));
    let why = named.error.as_deref().unwrap();
    assert!(
        why.contains("resolves to") && why.contains("loopback") && why.contains("unless a grant names that address"),
        "{why}"
    );
    assert!(by_origin("http://169.254.169.254:80").error.as_deref().unwrap().contains("is not granted"));
    assert_eq!(named.status, None);
    // The delivery's log says it too, and the metrics count each refusal.
    assert!(exec.logs.contains("[jobhost] denied: GET http://10.1.2.3:80"), "{}", exec.logs);
    assert_eq!(a.count("http://10.1.2.3:80", "denied"), 1);
    assert_eq!(a.count(&format!("http://localhost:{port}"), "denied"), 1);
    a.witness().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_huge_and_dripping_servers_are_cut_at_their_limits_while_others_work() {
    let a = Arena::new().await;
    let origin = format!("http://127.0.0.1:{}", a.server.port);
    let attack = async {
        a.run(json!([
            { "url": a.server.url("/never") },
            { "url": a.server.url("/huge") },
            { "url": a.server.url("/drip") },
            { "url": a.server.url("/hello") },
        ]))
        .await
    };
    // The victim's work completes while the attack runs (its requests take seconds).
    let (attacked, ()) = tokio::join!(attack, a.witness());
    let (results, exec) = attacked;
    for r in &results[..3] {
        assert!(r["error"].as_str().is_some(), "{r}");
    }
    assert_eq!(results[3]["status"], 200, "the plugin goes on after a refusal");
    // What the guest reads is the reason in one line — never host internals such as a
    // backtrace (the suite runs with RUST_BACKTRACE=1 in CI and here).
    let cut = results[1]["error"].as_str().unwrap();
    assert!(cut.contains("1048576") && !cut.contains('\n') && cut.len() < 500, "{cut}");
    let never = call(&exec, "/never");
    assert!(never.error.as_deref().unwrap().contains("no response within 1000 ms"), "{never:?}");
    let huge = call(&exec, "/huge");
    assert!(huge.error.as_deref().unwrap().contains("larger than 1048576 bytes (http_response_bytes)"), "{huge:?}");
    assert_eq!(huge.received_bytes, 1 << 20, "counted up to the limit");
    let drip = call(&exec, "/drip");
    assert!(drip.error.as_deref().unwrap().contains("longer than 3000 ms in all (http_total_ms)"), "{drip:?}");
    assert!(drip.received_bytes > 0 && drip.received_bytes < 30, "{drip:?}");
    assert_eq!((a.count(&origin, "timeout"), a.count(&origin, "limit")), (2, 1));
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_makes_at_most_its_requests_and_the_rest_are_refused() {
    let a = Arena::new().await;
    // A request body past `http_request_bytes` is refused; one within it goes.
    let (results, exec) = a
        .run(json!([
            { "method": "POST", "url": a.server.url("/echo"), "bodyBytes": 100_000 },
            { "method": "POST", "url": a.server.url("/echo"), "bodyBytes": 60_000 },
        ]))
        .await;
    assert!(results[0]["error"].as_str().is_some(), "{}", results[0]);
    assert_eq!(results[1]["status"], 201);
    let big = &exec.http[0];
    assert!(big.error.as_deref().unwrap().contains("larger than 65536 bytes (http_request_bytes)"), "{big:?}");
    assert_eq!(exec.http[1].sent_bytes, 60_000);

    let (results, exec) = a.run(json!([{ "url": a.server.url("/count"), "repeat": 10_000 }])).await;
    assert_eq!(results.len(), 51, "50 answered, then one refusal ends the loop");
    assert!(results[50]["error"].as_str().unwrap().contains("ConnectionLimitReached"), "{}", results[50]);
    assert_eq!(a.server.counted.load(Ordering::SeqCst), 50, "the server saw exactly the allowed requests");
    let refused = exec.http.last().unwrap();
    assert!(refused.error.as_deref().unwrap().contains("more than 50 requests in one delivery (http_requests"));
    a.witness().await;
    a.stop().await;
}

/// The example's verification service (`plugins/enrich-emails/verify-service.py`) on a free
/// loopback port, stopped when dropped.
pub(crate) struct VerifyService {
    child: std::process::Child,
    pub(crate) port: u16,
}

impl VerifyService {
    pub(crate) fn start() -> Self {
        use std::io::BufRead;
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/enrich-emails/verify-service.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg("0")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs the example's service");
        crate::cli::kill_after(child.id(), 300);
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("listening on ").and_then(|p| p.parse().ok()).expect("the port");
        Self { child, port }
    }
}

impl Drop for VerifyService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enrich_example_flags_addresses_through_the_service_it_ships() {
    enrich_example(std::path::Path::new(artifacts::ENRICH_EMAILS), "enrich-emails").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_enrich_example_does_the_same_with_fetch() {
    enrich_example(&crate::languages::built("js/enrich-emails"), "js/enrich-emails").await;
}

/// The enrich example (`component`, its manifest in `plugins/{source}`) against the service it
/// ships: two addresses in five flagged with a warning, one request per part.
async fn enrich_example(component: &std::path::Path, source: &str) {
    let service = VerifyService::start();
    let host = TestHost::new();
    let env = host.env().await;
    // The shipped manifest, pointed at this test's port.
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../plugins/{source}/enrich-emails.toml")),
    )
    .unwrap()
    .replace("8787", &service.port.to_string());
    let rt = crate::languages::runtime();
    let (plugin, _dir) = with_manifest(&rt, component, "enrich-emails", &manifest).await;
    let running = host.engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap();

    let sheet = env.create_sheet("people").await.unwrap();
    let records: Vec<jobhost::model::NewRecord> = (0..2500)
        .map(|i| {
            let email = match i % 5 {
                0 => format!("u{i}@mailinator.com"),
                1 => "admin@acme.example".to_owned(),
                _ => format!("person{i}@acme.example"),
            };
            serde_json::from_value(json!({ "values": { "email": email } })).unwrap()
        })
        .collect();
    env.insert_records(&sheet.id, records).await.unwrap();
    let job = env.create_job(NewJob::sheet("enrichEmails", &sheet.id)).await.unwrap();
    let job = until_terminal(&env, &job.id).await;
    running.shutdown().await;
    assert_eq!(job.status, JobStatus::Complete, "{job:?}");
    assert_eq!(job.outcome["parts"]["completed"], 3);
    assert_eq!((&job.outcome["checked"], &job.outcome["flagged"]), (&json!(2500), &json!(1000)), "{job:?}");
    let page = env.records(&sheet.id, 2500, 1).await.unwrap();
    let flagged: Vec<_> = page.records.iter().filter(|r| !r.values["email"].messages.is_empty()).collect();
    assert_eq!(flagged.len(), 1000, "two addresses in five are flagged");
    assert!(flagged.iter().all(|r| r.valid), "a warning leaves the record valid");
    let message = &page.records[0].values["email"].messages[0];
    assert_eq!(message.message, "the verification service flags this address: disposable domain");
    assert_eq!(
        page.records[1].values["email"].messages[0].message,
        "the verification service flags this address: role account"
    );
    assert_eq!(env.record_counts(&sheet.id).await.unwrap().error, 0);
    // One request per part, each on its part's record.
    let executions = env.executions(None, 100).await.unwrap();
    let calls: Vec<_> = executions.iter().flat_map(|e| &e.http).collect();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls.iter().all(|c| c.status == Some(200) && c.path == "/verify" && c.method == "POST"));
}

/// A TLS server on loopback with a self-signed certificate (tests/fixtures, for 127.0.0.1):
/// tells how each handshake ended.
async fn self_signed_tls() -> (u16, tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>) {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
    let cert = CertificateDer::from_pem_file(format!("{fixtures}/self-signed.crt")).unwrap();
    let key = PrivateKeyDer::from_pem_file(format!("{fixtures}/self-signed.key")).unwrap();
    let config =
        tokio_rustls::rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(vec![cert], key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tx.send(acceptor.accept(tcp).await.map(drop).map_err(|e| e.to_string()));
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_checks_the_certificate_and_a_self_signed_server_is_refused() {
    let (port, mut handshakes) = self_signed_tls().await;
    let host = TestHost::with_config(EngineConfig { max_attempts: 1, ..test_config() });
    let env = host.env().await;
    // Granted by address, so loopback is allowed: only the certificate stands in the way.
    let manifest = format!("[grants]\nallowed_outbound_hosts = [\"https://127.0.0.1:{port}\"]\n");
    let rt = Runtime::new(test_runtime_config()).unwrap();
    let (plugin, _dir) = with_manifest(&rt, artifacts::TEST_HTTP.as_ref(), "http", &manifest).await;
    let running = host.engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap();

    let requests = json!([{ "url": format!("https://127.0.0.1:{port}/hello") }]);
    let new = NewJob { input: json!({ "requests": requests }), ..NewJob::new(JobType::Space, "http") };
    let job = env.create_job(new).await.unwrap();
    let job = until_terminal(&env, &job.id).await;
    assert_eq!(job.status, JobStatus::Complete, "{job:?}");
    let result = &job.outcome["results"][0];
    assert!(result["error"].as_str().is_some_and(|e| e.contains("TlsCertificateError")), "{result}");
    let execution = record_of(&host, &env, &job.id).await;
    let call = call(&execution, "/hello");
    let why = call.error.as_deref().unwrap_or_else(|| panic!("{call:?}"));
    assert!(why.contains("certificate"), "{why}");
    assert_eq!(call.status, None);
    // The client broke the handshake off: no request reached the server.
    let handshake = tokio::time::timeout(Duration::from_secs(60), handshakes.recv()).await.expect("a handshake");
    assert!(handshake.as_ref().is_some_and(Result::is_err), "{handshake:?}");
    assert!(handshakes.try_recv().is_err(), "one connection only");
    running.shutdown().await;
}

/// A plugin in another language (`plugins/{dir}`, built from source) making the granted and
/// refused requests through that language's client: what it sees (`refusals`: what the client
/// says of the two refused requests), and what the record says.
async fn a_guest_language_reaches_granted_hosts_and_is_refused_elsewhere(dir: &str, refusals: [&str; 2]) {
    let server = Server::start().await;
    let host = TestHost::with_config(EngineConfig { max_attempts: 1, ..test_config() });
    let env = host.env().await;
    let port = server.port;
    let manifest =
        format!("[grants]\nallowed_outbound_hosts = [\"http://127.0.0.1:{port}\", \"http://localhost:{port}\"]\n");
    let rt = crate::languages::runtime();
    let (plugin, _dir) = with_manifest(&rt, &crate::languages::built(dir), "fetch", &manifest).await;
    let running = host.engine.run(vec![rt.listener(plugin, env.id())]).await.unwrap();

    let requests = json!([
        { "url": server.url("/hello") },
        { "method": "POST", "url": server.url("/echo"), "body": "payload", "headers": { "x-tag": "t" } },
        { "url": server.url("/chunked") },
        // Not granted, and a granted name that resolves to a loopback address.
        { "url": "http://10.1.2.3/latest" },
        { "url": format!("http://localhost:{port}/hello") },
    ]);
    let new = NewJob { input: json!({ "requests": requests }), ..NewJob::new(JobType::Space, "fetch") };
    let job = env.create_job(new).await.unwrap();
    let exec = record_of(&host, &env, &job.id).await;
    let job = env.job(&job.id).await.unwrap();
    assert_eq!(job.status, JobStatus::Complete, "{job:?}\n{exec:?}");
    let results = &job.outcome["results"];
    assert_eq!(results[0], json!({"status": 200, "body": "hello", "header": "yes"}), "{results}");
    assert_eq!(results[1], json!({"status": 201, "body": "t:payload", "header": null}), "{results}");
    assert_eq!(results[2], json!({"status": 200, "body": "part0;part1;part2;part3;part4;", "header": null}));
    for (refused, says) in [&results[3], &results[4]].into_iter().zip(refusals) {
        assert!(refused["error"].as_str().is_some_and(|e| e.contains(says)), "{says}: {results}");
    }
    // The host's record attributes each request, the refusals with their reasons.
    assert_eq!(exec.http.len(), 5, "{:?}", exec.http);
    let echo = call(&exec, "/echo");
    assert_eq!((echo.method.as_str(), echo.status, echo.sent_bytes, echo.received_bytes), ("POST", Some(201), 7, 9));
    assert_eq!(call(&exec, "/chunked").received_bytes, 30);
    let by_origin =
        |o: &str| exec.http.iter().find(|c| c.origin == o).unwrap_or_else(|| panic!("{o}: {:?}", exec.http));
    assert!(by_origin("http://10.1.2.3:80").error.as_deref().unwrap().contains("is not granted"));
    let named = by_origin(&format!("http://localhost:{port}")).error.as_deref().unwrap();
    assert!(named.contains("resolves to") && named.contains("loopback"), "{named}");
    // Whatever the client says, the delivery's log has the host's reason.
    assert!(exec.logs.contains("[jobhost] denied: GET http://10.1.2.3:80"), "{}", exec.logs);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_fetch_reaches_granted_hosts_and_is_refused_elsewhere() {
    // fetch reports every failure as the standard's one TypeError.
    let network = "TypeError: NetworkError";
    a_guest_language_reaches_granted_hosts_and_is_refused_elsewhere("js/test-fetch", [network, network]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_client_reaches_granted_hosts_and_is_refused_elsewhere() {
    let refusals = ["HttpRequestDenied", "DestinationIpProhibited"];
    a_guest_language_reaches_granted_hosts_and_is_refused_elsewhere("python/test-fetch", refusals).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_added_or_removed_in_the_manifest_applies_without_a_restart() {
    use jobhost::reload::{PluginHost, ReloadEvent};
    let server = Server::start().await;
    let host = TestHost::with_config(EngineConfig { max_attempts: 1, ..test_config() });
    let env = host.env().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(artifacts::TEST_HTTP, dir.path().join("http.wasm")).unwrap();
    let running = Arc::new(host.engine.run(vec![]).await.unwrap());
    let (plugins, _) =
        PluginHost::start(crate::support::test_runtime(), running.clone(), env.id(), dir.path()).await.unwrap();
    let mut reloads = plugins.subscribe();
    let _watch = plugins.watch(Duration::from_millis(20)).unwrap();
    let hello = async || {
        let input = json!({ "requests": [{ "url": server.url("/hello") }] });
        let job = env.create_job(NewJob { input, ..NewJob::new(JobType::Space, "http") }).await.unwrap();
        let exec = record_of(&host, &env, &job.id).await;
        (env.job(&job.id).await.unwrap().outcome["results"][0].clone(), exec)
    };
    let mut manifest_applied = async |text: Option<String>| {
        let path = dir.path().join("http.toml");
        match text {
            Some(text) => {
                std::fs::write(dir.path().join(".http.toml.tmp"), text).unwrap();
                std::fs::rename(dir.path().join(".http.toml.tmp"), &path).unwrap();
            }
            None => std::fs::remove_file(&path).unwrap(),
        }
        // A safety net against a hang, not a synchronisation: the wait is on the reload event.
        tokio::time::timeout(Duration::from_secs(60), async {
            while !matches!(reloads.recv().await.unwrap(), ReloadEvent::Loaded { name, .. } if name == "http") {}
        })
        .await
        .expect("the manifest reloads within 60 s");
    };

    let (refused, exec) = hello().await;
    assert!(refused["error"].as_str().unwrap().contains("HttpRequestDenied"), "{refused}");
    assert!(exec.http[0].error.as_deref().unwrap().contains("is not granted"), "{:?}", exec.http);
    let origin = format!("http://127.0.0.1:{}", server.port);
    manifest_applied(Some(format!("[grants]\nallowed_outbound_hosts = [\"{origin}\"]\n"))).await;
    let (answered, _) = hello().await;
    assert_eq!(answered["status"], 200, "{answered}");
    manifest_applied(None).await;
    let (refused, _) = hello().await;
    assert!(refused["error"].as_str().unwrap().contains("HttpRequestDenied"), "a removed grant is gone: {refused}");
    running.shutdown().await;
}
