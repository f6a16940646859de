//! The operator console on a real `jobhost serve`: its sessions, CSRF and isolation rules over
//! plain HTTP, then what a person sees in a real headless Chromium (installed by the tests when
//! missing) — the seeds' scenario going live in the parts grid, a failed part's log, a deploy
//! and a rollback, another environment's view, and a hostile plugin's markup shown as text.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{Reaped, http, spawn_logged, wait_line};
use jobhost_test_browser::{Client, Locator, until};

const ADMIN: &str = "admin-for-tests";

/// A `jobhost serve` with the seeds' plugin and the misbehaving one, and a token of its
/// default environment.
struct Served {
    _child: Reaped,
    dir: tempfile::TempDir,
    addr: String,
    token: String,
    env_id: String,
}

impl Served {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        std::fs::copy(jobhost_test_plugins::SUBMIT_LARGE_SHEET, plugins.join("submit-large-sheet.wasm")).unwrap();
        std::fs::copy(jobhost_test_plugins::TEST_MISBEHAVE, plugins.join("misbehave.wasm")).unwrap();
        let (child, mut lines) = spawn_logged(
            Command::new(env!("CARGO_BIN_EXE_jobhost"))
                .args(["serve", "--plugins", plugins.to_str().unwrap(), "--listen", "127.0.0.1:0"])
                .args(["--data", dir.path().join("data").to_str().unwrap()])
                .env("XDG_CACHE_HOME", dir.path().join("cache"))
                .env("JOBHOST_ADMIN_TOKEN", ADMIN),
        );
        let mut seen = Vec::new();
        let listening = wait_line(&mut lines, "listening on http://", &mut seen);
        let addr = listening.rsplit("http://").next().unwrap().trim().to_owned();
        wait_line(&mut lines, "serving 2 plugin(s)", &mut seen);
        // Keep reading its stderr so the host never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        let (status, envs) = http(&addr, "GET", "/v1/environments", ADMIN, None);
        assert_eq!(status, 200, "{envs}");
        let env_id = envs["data"][0]["id"].as_str().unwrap().to_owned();
        let token = new_token(&addr, &env_id, "console");
        Served { _child: child, dir, addr, token, env_id }
    }

    fn api(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, answer) = http(&self.addr, method, path, &self.token, body);
        assert!((200..300).contains(&status), "{method} {path}: {status} {answer}");
        answer["data"].clone()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn new_token(addr: &str, env_id: &str, name: &str) -> String {
    let (status, token) =
        http(addr, "POST", &format!("/v1/environments/{env_id}/tokens"), ADMIN, Some(&json!({ "name": name })));
    assert_eq!(status, 201, "{token}");
    token["data"]["token"].as_str().unwrap().to_owned()
}

/// A sheet of `n` sample people records; returns its id.
fn sheet_of(s: &Served, n: u64) -> String {
    let sheet = s.api("POST", "/v1/sheets", Some(&json!({"name": "people"})));
    let id = sheet["id"].as_str().unwrap().to_owned();
    let (records, _) = jobhost::scenario::sample_records(n);
    for chunk in records.chunks(10_000) {
        s.api("POST", &format!("/v1/sheets/{id}/records"), Some(&serde_json::to_value(chunk).unwrap()));
    }
    id
}

/// Waits (polling the API, under a wall-clock deadline) until job `id` is terminal.
async fn terminal(s: &Served, id: &str) -> Value {
    until("a terminal job", Duration::from_secs(300), || async {
        let job = s.api("GET", &format!("/v1/jobs/{id}"), None);
        Ok(["complete", "failed", "canceled"].contains(&job["status"].as_str().unwrap_or("")).then_some(job))
    })
    .await
    .unwrap()
}

/// A response of the console over HTTP/1.1: status, headers (lower-cased names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn cookie(&self) -> String {
        let set = self.header("set-cookie").unwrap_or_else(|| panic!("no Set-Cookie: {:?}", self.headers));
        set.split(';').next().unwrap().to_owned()
    }

    fn csrf(&self) -> String {
        let at = self.body.find("data-csrf=\"").unwrap_or_else(|| panic!("no CSRF token in {}", self.body)) + 11;
        self.body[at..].split('"').next().unwrap().to_owned()
    }
}

fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], form: &str) -> Answer {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    // As a browser's navigation, unless the test says what it accepts.
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("accept")) {
        head.push_str("Accept: text/html\r\n");
    }
    if method != "GET" {
        head.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            form.len()
        ));
    }
    write!(stream, "{head}\r\n{form}").unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // Chunked bodies keep their chunk sizes; the tests only look for text in them.
    Answer { status, headers, body: body.to_owned() }
}

fn sign_in(addr: &str, token: &str) -> (String, String) {
    let a = request(addr, "POST", "/console/sign-in", &[], &format!("token={token}&next=%2Fconsole%2Fjobs"));
    assert_eq!(a.status, 303, "{}", a.body);
    let cookie = a.cookie();
    let page = request(addr, "GET", "/console/jobs", &[("Cookie", &cookie)], "");
    assert_eq!(page.status, 200, "{}", page.body);
    (cookie.clone(), page.csrf())
}

#[test]
fn console_sessions_refuse_cross_site_requests_and_keep_environments_apart() {
    let s = Served::start();
    let addr = s.addr.as_str();
    // A job whose handler traps on every attempt: a dead letter by the end of this test.
    let trapped = s.api("POST", "/v1/jobs", Some(&json!({"type": "space", "operation": "trap"})));

    // Signed out: the sign-in page, with the way back; every answer carries the policy.
    let a = request(addr, "GET", "/console/jobs?status=failed", &[], "");
    assert_eq!(a.status, 303);
    assert_eq!(a.header("location"), Some("/console/sign-in?next=/console/jobs%3Fstatus%3Dfailed"));
    let csp = a.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(a.header("x-frame-options"), Some("DENY"));

    // What the page's script fetches, and the event stream, answer 401 instead.
    let fetched = request(addr, "GET", "/console/stream", &[("Accept", "text/event-stream")], "");
    assert_eq!(fetched.status, 401);

    // A wrong token is refused in words and sets no cookie.
    let a = request(addr, "POST", "/console/sign-in", &[], "token=jh_wrong");
    assert_eq!(a.status, 401);
    assert!(a.body.contains("That token is not valid"), "{}", a.body);
    assert!(a.header("set-cookie").is_none());

    // A good one: an HttpOnly, SameSite=Strict cookie; Secure when the request came over TLS.
    let a = request(
        addr,
        "POST",
        "/console/sign-in",
        &[],
        &format!("token={}&next=https%3A%2F%2Fevil.example%2F", s.token),
    );
    assert_eq!((a.status, a.header("location")), (303, Some("/console/")), "never a redirect elsewhere");
    let set = a.header("set-cookie").unwrap();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && !set.contains("Secure"), "{set}");
    let tls =
        request(addr, "POST", "/console/sign-in", &[("X-Forwarded-Proto", "https")], &format!("token={}", s.token));
    assert!(tls.header("set-cookie").unwrap().contains("; Secure"), "{:?}", tls.headers);
    let (cookie, csrf) = sign_in(addr, &s.token);

    // A job to act on. Cancel needs this session's CSRF token and a same-origin request.
    let job = s.api("POST", "/v1/jobs", Some(&json!({"type": "space", "operation": "idle", "trigger": "manual"})));
    let id = job["id"].as_str().unwrap();
    let cancel = format!("/console/jobs/{id}/cancel");
    let c = [("Cookie", cookie.as_str())];
    // The page says what an open job waits for.
    let page = request(addr, "GET", &format!("/console/jobs/{id}"), &c, "");
    assert!(
        page.body.contains(
            "<p id=\"waiting\"><strong>Waiting: </strong>created with trigger manual: it waits for an execute call</p>"
        ),
        "{}",
        page.body
    );
    assert_eq!(request(addr, "POST", &cancel, &c, "csrf=forged").status, 403);
    let cross = [("Cookie", cookie.as_str()), ("Origin", "http://evil.example")];
    let a = request(addr, "POST", &cancel, &cross, &format!("csrf={csrf}"));
    assert_eq!(a.status, 403);
    assert!(a.body.contains("cross-site"), "{}", a.body);
    let fetch_cross = [("Cookie", cookie.as_str()), ("Sec-Fetch-Site", "cross-site")];
    assert_eq!(request(addr, "POST", &cancel, &fetch_cross, &format!("csrf={csrf}")).status, 403);
    assert_eq!(s.api("GET", &format!("/v1/jobs/{id}"), None)["status"], "created", "nothing changed");
    let same = [("Cookie", cookie.as_str()), ("Origin", &*format!("http://{addr}"))];
    let a = request(addr, "POST", &cancel, &same, &format!("csrf={csrf}"));
    assert_eq!((a.status, a.header("location")), (303, Some(&*format!("/console/jobs/{id}"))));
    assert_eq!(s.api("GET", &format!("/v1/jobs/{id}"), None)["status"], "canceled");
    // The refusal of a second cancel is shown in the engine's words on the next page.
    request(addr, "POST", &cancel, &c, &format!("csrf={csrf}"));
    let page = request(addr, "GET", &format!("/console/jobs/{id}"), &c, "");
    assert!(page.body.contains("class=\"flash error\"") && page.body.contains("canceled"), "{}", page.body);
    assert!(!page.body.contains("id=\"waiting\""), "an ended job waits for nothing");

    // Retry needs a failed job: refused in words; acknowledging the outcome is allowed once.
    assert_eq!(request(addr, "POST", &format!("/console/jobs/{id}/retry"), &c, &format!("csrf={csrf}")).status, 303);
    let page = request(addr, "GET", &format!("/console/jobs/{id}"), &c, "");
    assert!(page.body.contains("retry needs failed"), "{}", page.body);
    request(addr, "POST", &format!("/console/jobs/{id}/acknowledge"), &c, &format!("csrf={csrf}"));
    let page = request(addr, "GET", &format!("/console/jobs/{id}"), &c, "");
    assert!(page.body.contains("Acknowledged the outcome of"), "{}", page.body);
    assert!(s.api("GET", &format!("/v1/jobs/{id}"), None)["outcomeAcknowledgedAt"].is_i64());
    assert!(!page.body.contains("/acknowledge\""), "the button is gone once acknowledged");

    // A plugin file that does not load is shown with the reason; the others keep serving.
    std::fs::write(s.dir.path().join("plugins/broken.wasm"), b"not a component").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let shown = rt.block_on(until("the load error on the plugins page", Duration::from_secs(60), || async {
        let page = request(addr, "GET", "/console/plugins", &c, "");
        Ok(page.body.contains("Did not load").then_some(page.body))
    }));
    let shown = shown.unwrap();
    assert!(shown.contains("<strong>broken</strong>") && shown.contains("id=\"plugin-misbehave\""), "{shown}");

    // Filters that mean nothing are refused in words.
    let bad = request(addr, "GET", "/console/jobs?from=yesterday", &c, "");
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("`yesterday` is not a time"), "{}", bad.body);
    let bad = request(addr, "GET", "/console/jobs?status=finished", &c, "");
    assert!(bad.status == 400 && bad.body.contains("unknown JobStatus `finished`"), "{}", bad.body);
    let listed = request(addr, "GET", "/console/jobs?status=canceled&job=space:idle&from=2020-01-01", &c, "");
    assert!(listed.body.contains(id), "{}", listed.body);
    let none = request(addr, "GET", "/console/jobs?status=canceled&to=2020-01-01", &c, "");
    assert!(!none.body.contains(id) && none.body.contains("No jobs match"), "{}", none.body);

    // The trapped job's delivery, once dead, is listed with its error and can be retried.
    let trapped = trapped["id"].as_str().unwrap();
    let dead = rt.block_on(until("a dead letter", Duration::from_secs(300), || async {
        let dead = s.api("GET", "/v1/dead-letters", None);
        Ok(dead.as_array().filter(|d| !d.is_empty()).map(|d| d[0].clone()))
    }));
    let dead = dead.unwrap();
    let page = request(addr, "GET", "/console/dead-letters", &c, "");
    assert!(page.body.contains(trapped) && page.body.contains("trap"), "{}", page.body);
    let retry = format!("/console/dead-letters/{}/retry", dead["deliveryId"]);
    assert_eq!(request(addr, "POST", &retry, &c, "csrf=forged").status, 403);
    let a = request(addr, "POST", &retry, &c, &format!("csrf={csrf}"));
    assert_eq!((a.status, a.header("location")), (303, Some("/console/dead-letters")));
    let page = request(addr, "GET", "/console/dead-letters", &c, "");
    assert!(page.body.contains("is due again"), "{}", page.body);
    let again = request(addr, "POST", &retry, &c, &format!("csrf={csrf}"));
    assert_eq!(again.status, 303);
    let page = request(addr, "GET", "/console/dead-letters", &c, "");
    // Through the API too: no longer a dead letter, so not found.
    let (status, _) = http(addr, "POST", &format!("/v1/dead-letters/{}/retry", dead["deliveryId"]), &s.token, None);
    assert_eq!(status, 404);
    // Due again, so no longer a dead letter: a second retry is refused in words.
    assert!(page.body.contains(&format!("dead letter {} not found", dead["deliveryId"])), "{}", page.body);

    // Another environment's session finds none of this one's jobs.
    let (status, other) = http(addr, "POST", "/v1/environments", ADMIN, Some(&json!({"name": "other"})));
    assert_eq!(status, 201);
    let other_token = new_token(addr, other["data"]["id"].as_str().unwrap(), "other");
    let (other_cookie, _) = sign_in(addr, &other_token);
    let o = [("Cookie", other_cookie.as_str())];
    assert_eq!(request(addr, "GET", &format!("/console/jobs/{id}"), &o, "").status, 404);
    assert!(!request(addr, "GET", "/console/jobs?status=canceled", &o, "").body.contains(id));
    assert_eq!(request(addr, "GET", &format!("/console/jobs/{id}/grid"), &o, "").status, 404);

    // The admin manages tokens; a token is shown once, and revoking it ends its sessions.
    let a = request(addr, "POST", "/console/sign-in", &[], &format!("token={ADMIN}"));
    assert_eq!(a.header("location"), Some("/console/admin"));
    let admin_cookie = a.cookie();
    let ac = [("Cookie", admin_cookie.as_str())];
    let page = request(addr, "GET", "/console/admin", &ac, "");
    assert!(page.body.contains(&s.env_id), "{}", page.body);
    assert_eq!(request(addr, "GET", "/console/jobs", &ac, "").status, 403, "the admin sees no environment's jobs");
    let made = request(
        addr,
        "POST",
        &format!("/console/admin/environments/{}/tokens", s.env_id),
        &ac,
        &format!("csrf={}&name=ops", page.csrf()),
    );
    assert_eq!(made.status, 200);
    let at = made.body.find("id=\"new-token\">").expect("the new token is shown") + 15;
    let shown = made.body[at..].split('<').next().unwrap().to_owned();
    assert!(shown.starts_with("jh_"), "{shown}");
    assert!(!request(addr, "GET", "/console/admin", &ac, "").body.contains(&shown), "shown once only");
    let (ops_cookie, _) = sign_in(addr, &shown);
    let tokens = http(addr, "GET", &format!("/v1/environments/{}/tokens", s.env_id), ADMIN, None).1;
    let ops = tokens["data"].as_array().unwrap().iter().find(|t| t["name"] == "ops").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoke = format!("/console/admin/environments/{}/tokens/{ops}/revoke", s.env_id);
    assert_eq!(request(addr, "POST", &revoke, &ac, &format!("csrf={}", page.csrf())).status, 303);
    let after = request(addr, "GET", "/console/jobs", &[("Cookie", &ops_cookie)], "");
    assert_eq!(after.status, 303, "a revoked token's session is over");
    assert!(after.header("location").unwrap().starts_with("/console/sign-in"));

    // Signing out ends the session and clears the cookie.
    let out = request(addr, "POST", "/console/sign-out", &c, &format!("csrf={csrf}"));
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(request(addr, "GET", "/console/jobs", &c, "").status, 303);
    drop(s.dir);
}

// ---- in a real browser ----

fn shots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(b: &Client, name: &str) {
    let png = b.screenshot().await.unwrap();
    std::fs::write(shots().join(name), png).unwrap();
}

/// The text of the element `css`, finding it again if the page's script replaced it between
/// the find and the read (a live section is re-rendered when its stream connects: the element
/// found goes stale).
async fn text(b: &Client, css: &str) -> String {
    until(&format!("the text of {css}"), Duration::from_secs(30), || async {
        let el = b.find(Locator::Css(css)).await.map_err(|e| e.to_string())?;
        Ok(Some(el.text().await.map_err(|e| e.to_string())?))
    })
    .await
    .unwrap()
}

/// Waits until the element `css` exists and its text contains `needle`.
async fn until_text(b: &Client, css: &str, needle: &str, within: Duration) -> String {
    until(&format!("{css} showing {needle:?}"), within, || async {
        match b.find(Locator::Css(css)).await {
            Ok(el) => {
                let t = el.text().await.map_err(|e| e.to_string())?;
                if t.contains(needle) { Ok(Some(t)) } else { Err(format!("it shows {t:?}")) }
            }
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap()
}

/// Clicks the element `css`, finding it again if the page's script replaced it meanwhile (a
/// live section is re-rendered when the stream connects).
async fn click(b: &Client, css: &str) {
    until(&format!("a click on {css}"), Duration::from_secs(30), || async {
        let el = b.find(Locator::Css(css)).await.map_err(|e| e.to_string())?;
        el.click().await.map_err(|e| e.to_string())?;
        Ok(Some(()))
    })
    .await
    .unwrap()
}

async fn browser_sign_in(b: &Client, s: &Served, token: &str) {
    b.goto(&s.url("/console/")).await.unwrap();
    let field = b.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css("input[name=token]")).await.unwrap();
    field.send_keys(token).await.unwrap();
    click(b, "form button[type=submit]").await;
    b.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css("header.top nav")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    let s = Served::start();
    let b = jobhost_test_browser::session(&shots()).await.unwrap();
    browser_sign_in(&b, &s, &s.token).await;
    assert_eq!(text(&b, "h1").await, "Jobs");

    // The seeds' scenario, started by hand so the page is open before anything happens.
    let sheet = sheet_of(&s, 100_000);
    let job = s.api(
        "POST",
        "/v1/jobs",
        Some(&json!({"type": "sheet", "operation": "submitLargeSheet", "source": sheet, "trigger": "manual"})),
    );
    let id = job["id"].as_str().unwrap().to_owned();
    // The list is live: the new job appears without a reload.
    until_text(&b, "#live table.jobs", &id, Duration::from_secs(60)).await;
    click(&b, &format!("a[href='/console/jobs/{id}']")).await;
    until_text(&b, "#jobstatus", "created", Duration::from_secs(30)).await;
    s.api("POST", &format!("/v1/jobs/{id}/execute"), None);
    // The grid appears, fills, and the parent turns complete: no reload.
    until_text(&b, "#partcounts", "100 of 100 ended", Duration::from_secs(300)).await;
    until_text(&b, "#jobstatus", "complete", Duration::from_secs(60)).await;
    let counts = text(&b, "#partcounts").await;
    assert!(counts.contains("completed 100") && counts.contains("failed 0"), "{counts}");
    assert!(!text(&b, "#partscompleted").await.contains("not yet"));
    let cells = b.find_all(Locator::Css("#grid a.cell.s-complete")).await.unwrap();
    assert_eq!(cells.len(), 100);
    screenshot(&b, "parent-with-parts.png").await;

    // A failed part: from its cell in the grid to its execution's log.
    let small = sheet_of(&s, 3_000);
    let failing = s.api(
        "POST",
        "/v1/jobs",
        Some(&json!({"type": "sheet", "operation": "submitLargeSheet", "source": small, "input": {"failParts": [1]}})),
    );
    let failing = failing["id"].as_str().unwrap().to_owned();
    assert_eq!(terminal(&s, &failing).await["status"], "failed");
    b.goto(&s.url(&format!("/console/jobs/{failing}"))).await.unwrap();
    until_text(&b, "#partcounts", "failed 1", Duration::from_secs(30)).await;
    click(&b, &format!("#grid a[href='/console/jobs/{failing}/parts/1']")).await;
    // The part's page (the parent's page also says "failed": wait for what only the part has).
    until_text(&b, "table.facts", &format!("{failing} part 1"), Duration::from_secs(30)).await;
    until_text(&b, "#jobstatus", "failed", Duration::from_secs(30)).await;
    click(&b, "tbody.execution summary").await;
    let log = until_text(&b, "tbody.execution pre.logs", "failing it on purpose", Duration::from_secs(30)).await;
    assert!(log.contains("part 1 is listed in the parent's failParts"), "{log}");
    b.execute("document.querySelector('tbody.execution').scrollIntoView({block: 'center'})", vec![]).await.unwrap();
    screenshot(&b, "execution-log.png").await;

    // Deploy a plugin, deploy a new version, roll back — and a refused upload, in words.
    let files = s.dir.path().join("uploads");
    std::fs::create_dir(&files).unwrap();
    let v1 = std::fs::read(jobhost_test_plugins::TEST_NOOP).unwrap();
    let mut v2 = v1.clone();
    v2.extend_from_slice(&[0, 4, 3, b'a', b'b', b'c']); // a custom section: a new version
    std::fs::write(files.join("noop-1.wasm"), &v1).unwrap();
    std::fs::write(files.join("noop-2.wasm"), &v2).unwrap();
    std::fs::write(files.join("broken.wasm"), b"not a component").unwrap();
    let (ver1, ver2) = (jobhost::runtime::version_of(&v1), jobhost::runtime::version_of(&v2));
    let plugins_url = s.url("/console/plugins");
    let deploy = |file: &'static str| {
        let (b, path, url) = (&b, files.join(file), plugins_url.clone());
        async move {
            b.goto(&url).await.unwrap();
            b.find(Locator::Css("#deploy input[name=name]")).await.unwrap().send_keys("noop").await.unwrap();
            b.find(Locator::Css("#deploy input[type=file]"))
                .await
                .unwrap()
                .send_keys(path.to_str().unwrap())
                .await
                .unwrap();
            click(b, "#deploy button").await;
        }
    };
    deploy("broken.wasm").await;
    let refused = until_text(&b, "#deploy-result", "Not deployed", Duration::from_secs(60)).await;
    assert!(refused.to_lowercase().contains("component") || refused.contains("wasm"), "{refused}");
    deploy("noop-1.wasm").await;
    until_text(&b, "p.flash", "Plugin noop is loaded", Duration::from_secs(120)).await;
    deploy("noop-2.wasm").await;
    until_text(&b, "p.flash", &format!("is version {} now", &ver2[..12]), Duration::from_secs(120)).await;
    click(&b, "#plugin-noop form[action$='/rollback'] button").await;
    until_text(
        &b,
        "p.flash",
        &format!("is version {} now (was {})", &ver1[..12], &ver2[..12]),
        Duration::from_secs(60),
    )
    .await;
    let plugins = s.api("GET", "/v1/plugins", None);
    let noop = plugins.as_array().unwrap().iter().find(|p| p["name"] == "noop").unwrap();
    assert_eq!(noop["version"], ver1.as_str(), "the API agrees with what the page said");

    // A hostile plugin's markup: shown as text everywhere, and nothing of it runs.
    let xss_sheet =
        s.api("POST", "/v1/sheets", Some(&json!({"name": "<b>sheet</b>"})))["id"].as_str().unwrap().to_owned();
    let xss = s.api("POST", "/v1/jobs", Some(&json!({"type": "sheet", "operation": "xss", "source": xss_sheet, "input": {"note": "<script>document.title='XSS-input'</script>"}})));
    let xss = xss["id"].as_str().unwrap().to_owned();
    assert_eq!(terminal(&s, &xss).await["status"], "failed");
    for page in [
        format!("/console/jobs/{xss}"),
        format!("/console/sheets/{xss_sheet}"),
        "/console/jobs".into(),
        "/console/sheets".into(),
    ] {
        b.goto(&s.url(&page)).await.unwrap();
        b.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css("main h1")).await.unwrap();
        let main = text(&b, "main").await;
        let title = b.title().await.unwrap();
        assert!(!title.contains("XSS"), "{page}: a payload ran (title {title:?})");
        let injected =
            b.find_all(Locator::Css("main img, main script, main a[href^='javascript:'], main b")).await.unwrap();
        assert!(injected.is_empty(), "{page}: {} injected elements", injected.len());
        if page.contains(&xss) {
            assert!(main.contains("failed <script>document.title='XSS-script'</script>"), "{page}: {main}");
            assert!(main.contains("<img src=x onerror="), "{page}: {main}");
            click(&b, "tbody.execution summary").await;
            let logs = text(&b, "pre.logs").await;
            assert!(logs.contains("<a href=\"javascript:document.title='XSS-link'\">click</a>"), "{logs}");
        }
        if page.contains(&xss_sheet) {
            assert!(main.contains("<img src=x onerror=") && main.contains("javascript:"), "{page}: {main}");
            assert_eq!(b.find_all(Locator::Css("td.err")).await.unwrap().len(), 1, "the error cell is marked");
        }
    }
    // A script URL typed into the page's address would run; links the console makes never are.
    let hrefs = b
        .execute("return Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'))", vec![])
        .await
        .unwrap();
    assert!(hrefs.as_array().unwrap().iter().all(|h| !h.as_str().unwrap_or("").starts_with("javascript")), "{hrefs}");
    b.close().await.unwrap();

    // Another environment, in a browser of its own, sees none of these jobs.
    let (status, other) = http(&s.addr, "POST", "/v1/environments", ADMIN, Some(&json!({"name": "elsewhere"})));
    assert_eq!(status, 201);
    let other_token = new_token(&s.addr, other["data"]["id"].as_str().unwrap(), "elsewhere");
    let b = jobhost_test_browser::session(&shots()).await.unwrap();
    browser_sign_in(&b, &s, &other_token).await;
    assert!(text(&b, "#live").await.contains("No jobs match"));
    b.goto(&s.url(&format!("/console/jobs/{id}"))).await.unwrap();
    assert!(text(&b, "main").await.contains(&format!("job {id} not found")), "{}", text(&b, "main").await);
    b.close().await.unwrap();
}
