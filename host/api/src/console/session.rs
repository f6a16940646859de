//! Sign-in, sessions and cross-site request protection.
//!
//! A person signs in with a token (an environment's, or the admin token) and gets a session:
//! a random 256-bit id in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` when the request
//! came over HTTPS, told by the URL or by a proxy's `X-Forwarded-Proto`). The host keeps the
//! session, never the token: an environment session holds its token's SHA-256 and looks the
//! token up on every request, so revoking the token ends every session made with it at the
//! next click. Sessions live in this host's memory (idle for 8 hours or 24 hours old: gone;
//! a restart signs everyone out, which loses no data).
//!
//! Every request that changes something passes two checks: the browser's own word that it
//! came from this origin (`Sec-Fetch-Site`, else `Origin` against `Host`; a request with
//! neither is not from a browser page and has no cookie to abuse), and the session's CSRF
//! token, sent back as a form field or an `X-CSRF-Token` header.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use super::ConsoleState;
use jobhost_engine::{Env, token_hash};

/// The session cookie's name.
pub const COOKIE: &str = "jobhost_session";
/// A session unused this long is gone.
const IDLE: Duration = Duration::from_secs(8 * 3600);
/// A session this old is gone, used or not.
const MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Sessions kept at most; the least recently used go first.
const MAX_SESSIONS: usize = 10_000;

/// A page or answer that refuses the request (boxed: a response is large, and most calls succeed).
#[derive(Debug)]
pub struct Refused(pub Box<Response>);

impl From<Response> for Refused {
    fn from(r: Response) -> Self {
        Self(Box::new(r))
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        *self.0
    }
}

/// Who a session acts as.
#[derive(Debug, Clone)]
pub enum Who {
    /// An environment, through one of its tokens.
    Env {
        /// SHA-256 of the token (the token itself is not kept).
        token_hash: String,
        /// The token's id, for the actor of what the session does.
        token_id: String,
        /// The environment.
        environment_id: String,
        /// Its name, for the header.
        environment_name: String,
    },
    /// The admin token: environments and tokens.
    Admin,
}

#[derive(Debug)]
struct Session {
    who: Who,
    csrf: String,
    created: Instant,
    seen: Instant,
    flash: Option<Flash>,
}

/// A message shown once, on the next page the session opens.
#[derive(Debug, Clone)]
pub struct Flash {
    /// True for a refusal or failure.
    pub error: bool,
    /// The words.
    pub text: String,
}

/// This host's console sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Starts a session for `who`; returns its id.
    pub fn start(&self, who: Who) -> std::io::Result<String> {
        let id = jobhost_engine::random_hex(32)?;
        let csrf = jobhost_engine::random_hex(32)?;
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| live(s, now));
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.seen).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), Session { who, csrf, created: now, seen: now, flash: None });
        Ok(id)
    }

    /// Ends a session.
    pub fn end(&self, id: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    /// Leaves a message for the session's next page.
    pub fn flash(&self, id: &str, error: bool, text: impl Into<String>) {
        if let Some(s) = self.map.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
            s.flash = Some(Flash { error, text: text.into() });
        }
    }

    fn touch(&self, id: &str, take_flash: bool) -> Option<(Who, String, Option<Flash>)> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let session = map.get_mut(id)?;
        if !live(session, now) {
            map.remove(id);
            return None;
        }
        session.seen = now;
        let flash = if take_flash { session.flash.take() } else { None };
        Some((session.who.clone(), session.csrf.clone(), flash))
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.duration_since(s.seen) < IDLE && now.duration_since(s.created) < MAX_AGE
}

/// The session cookie's value, when the request carries one.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// Whether the request reached us over HTTPS (directly or through a proxy that says so).
pub fn over_https(parts_headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    uri.scheme_str() == Some("https")
        || parts_headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// `Set-Cookie` for a new session (or, with `None`, one that clears it).
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!("{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict{secure}"),
        None => format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// Whether a state-changing request comes from a page of this origin, as the browser tells.
pub fn same_origin(method: &Method, headers: &HeaderMap) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return true;
    }
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin" || site == "none";
    }
    match (headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()), headers.get(header::HOST)) {
        (Some(origin), Some(host)) => {
            let origin = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            host.to_str().is_ok_and(|h| h == origin)
        }
        // No Origin: not sent by a page (old clients, curl); a cross-site page's request has one.
        (None, _) => true,
        (Some(_), None) => false,
    }
}

/// A signed-in person: who, the environment's API when it is an environment session, the CSRF
/// token for forms, and a message left for this page.
#[derive(Debug)]
pub struct Viewer {
    /// The session id.
    pub session: String,
    /// Who.
    pub who: Who,
    /// The environment's API (environment sessions).
    pub env: Option<Env>,
    /// The session's CSRF token.
    pub csrf: String,
    /// A message from the last action.
    pub flash: Option<Flash>,
}

impl Viewer {
    /// The environment's API, or the page that says an admin session has none.
    pub fn env(&self) -> Result<&Env, Refused> {
        self.env.as_ref().ok_or_else(|| {
            (StatusCode::FORBIDDEN, "the admin session manages environments and tokens; sign in with an environment's token to see its jobs")
                .into_response()
                .into()
        })
    }

    /// Whether this is the admin's session.
    pub fn is_admin(&self) -> bool {
        matches!(self.who, Who::Admin)
    }

    /// Refuses a form whose CSRF token is not this session's.
    pub fn check_csrf(&self, sent: &str) -> Result<(), Refused> {
        // Compared as hashes: the time taken does not tell how much matched.
        if token_hash(sent) == token_hash(&self.csrf) {
            Ok(())
        } else {
            Err((
                StatusCode::FORBIDDEN,
                "this form is stale or was not sent from the console: reload the page and try again",
            )
                .into_response()
                .into())
        }
    }
}

/// Where an unsigned request goes: the sign-in page for pages, 401 for what scripts fetch.
#[derive(Debug)]
pub struct SignIn {
    next: Option<String>,
}

impl IntoResponse for SignIn {
    fn into_response(self) -> Response {
        match self.next {
            Some(next) => {
                Redirect::to(&format!("/console/sign-in?next={}", super::pages::url_encode(&next))).into_response()
            }
            None => (StatusCode::UNAUTHORIZED, "signed out").into_response(),
        }
    }
}

impl FromRequestParts<ConsoleState> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &ConsoleState) -> Result<Self, Self::Rejection> {
        // A page (a navigation: the browser accepts HTML) comes back here after signing in;
        // what the script fetches and the event stream answer 401.
        let accepts_html =
            parts.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
        let page =
            parts.method == Method::GET && accepts_html && !parts.uri.query().unwrap_or_default().contains("fragment=");
        let next = page.then(|| format!("/console{}", parts.uri.path_and_query().map_or("", |p| p.as_str())));
        let signed_out = || SignIn { next: next.clone() }.into_response();
        let Some(id) = cookie(&parts.headers).map(str::to_owned) else { return Err(signed_out()) };
        let Some((who, csrf, flash)) = state.sessions.touch(&id, page) else { return Err(signed_out()) };
        let env = match &who {
            Who::Env { token_hash, token_id, environment_id, .. } => {
                // The token is looked up on every request: revoking it ends this session.
                match state.api.engine.token_by_hash(token_hash).await {
                    Ok(Some(t)) if &t.environment_id == environment_id => {}
                    Ok(_) => {
                        state.sessions.end(&id);
                        return Err(signed_out());
                    }
                    Err(e) => {
                        return Err((StatusCode::SERVICE_UNAVAILABLE, format!("the store does not answer: {e}"))
                            .into_response());
                    }
                }
                Some(state.api.engine.env(environment_id.clone()).as_actor(format!("console:token:{token_id}")))
            }
            Who::Admin => {
                if state.api.admin_token.is_none() {
                    state.sessions.end(&id);
                    return Err(signed_out());
                }
                None
            }
        };
        Ok(Viewer { session: id, who, env, csrf, flash })
    }
}
