//! The operator console: web pages for jobs, parts, executions, sheets, plugins and tokens,
//! served by the API's router under `/console`, from this binary (no CDN, no build step).
//!
//! - [`session`]: sign-in with a token, the session cookie, CSRF and same-origin checks.
//! - [`pages`]: the handlers; each renders HTML on the server with `maud`, which escapes
//!   every value it interpolates — what plugins, records and inputs wrote is text, never markup.
//! - [`view`]: the page shell and the pieces pages share (status badges, times, JSON, tables).
//! - `assets/`: one stylesheet and one script of our own, embedded with `include_str!`. The
//!   script makes pages live: it follows the session's event stream and, at most a few
//!   times a second, fetches the parts of the page that changed (coalesced), or a parent's
//!   part statuses for its grid.
//!
//! Every answer carries a Content-Security-Policy that allows scripts and styles from this
//! origin only (no `unsafe-inline`, no inline handlers), and forbids framing.

pub mod pages;
pub mod session;
pub mod view;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::ApiState;

/// What the console's handlers reach: the API's state and this host's sessions.
#[derive(Clone)]
pub struct ConsoleState {
    /// The API's state (engine, admin token, plugins).
    pub api: ApiState,
    /// Signed-in sessions.
    pub sessions: Arc<session::Sessions>,
}

/// The policy on every console answer: this origin's script and style only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// The console's routes, to be nested under `/console`.
pub fn router(api: ApiState) -> Router {
    use pages::*;
    let state = ConsoleState { api, sessions: Arc::new(session::Sessions::default()) };
    Router::new()
        .route("/", get(home))
        .route("/sign-in", get(sign_in_page).post(sign_in))
        .route("/sign-out", post(sign_out))
        .route("/stream", get(stream))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/grid", get(grid))
        .route("/jobs/{id}/parts/{index}", get(part))
        .route("/jobs/{id}/{action}", post(job_action))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/{id}/retry", post(retry_dead_letter))
        .route("/sheets", get(sheets))
        .route("/sheets/{id}", get(sheet))
        .route("/plugins", get(plugins))
        .route("/plugins/{name}", axum::routing::put(deploy_plugin))
        .route("/plugins/{name}/rollback", post(rollback_plugin))
        .route("/plugins/{name}/delete", post(delete_plugin))
        .route("/admin", get(admin))
        .route("/admin/environments", post(create_environment))
        .route("/admin/environments/{id}/tokens", post(create_token))
        .route("/admin/environments/{id}/tokens/{token_id}/revoke", post(revoke_token))
        .route("/assets/console.js", get(|| asset("text/javascript; charset=utf-8", SCRIPT)))
        .route("/assets/console.css", get(|| asset("text/css; charset=utf-8", STYLE)))
        .fallback(|| async {
            (StatusCode::NOT_FOUND, view::message_page("Not found", "There is no such console page."))
        })
        .layer(axum::middleware::from_fn(guard))
        .with_state(state)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Refuses cross-site state changes before any handler runs, and puts the security headers
/// on every answer.
async fn guard(request: Request, next: Next) -> Response {
    let mut response = if session::same_origin(request.method(), request.headers()) {
        next.run(request).await
    } else {
        (StatusCode::FORBIDDEN, "cross-site requests cannot change anything here").into_response()
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}
