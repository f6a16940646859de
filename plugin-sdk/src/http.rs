//! Outbound HTTP over the standard `wasi:http` interfaces.
//!
//! The host sends a request only to hosts the plugin's manifest grants
//! (`[grants] allowed_outbound_hosts = ["https://api.example.com"]`); anything else — a host
//! not granted, a name that resolves to a private or loopback address, more requests than the
//! delivery may make — fails with an [`Error`] here, and the delivery's log says
//! why. Redirects are returned as they are (a 3xx [`Response`]); following one is a new
//! request, checked the same way. Secrets belong in headers the plugin sets from
//! [`config::secret`](crate::config::secret), never in the manifest.
//!
//! ```no_run
//! use jobhost_plugin_sdk::{http, json};
//!
//! # fn f() -> jobhost_plugin_sdk::Result<()> {
//! let token = jobhost_plugin_sdk::config::secret("VERIFY_TOKEN")?;
//! let answer = http::post("https://verify.example.com/v1/check")
//!     .header("authorization", &format!("Bearer {token}"))
//!     .json(&json!({ "emails": ["ada@example.com"] }))
//!     .send()?;
//! if answer.status() == 200 {
//!     let flagged = answer.json()?;
//! #   let _ = flagged;
//! }
//! # Ok(()) }
//! ```

use wasip2::http::outgoing_handler;
use wasip2::http::types::{Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme};
use wasip2::io::streams::StreamError;

use crate::{Error, Result, Value};

/// A request being built; [`Request::send`] sends it and reads the whole response.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout_ms: Option<u64>,
}

/// A `GET` of `url`.
pub fn get(url: &str) -> Request {
    Request::new(Method::Get, url)
}

/// A `POST` to `url`.
pub fn post(url: &str) -> Request {
    Request::new(Method::Post, url)
}

/// A `PUT` to `url`.
pub fn put(url: &str) -> Request {
    Request::new(Method::Put, url)
}

/// A `DELETE` of `url`.
pub fn delete(url: &str) -> Request {
    Request::new(Method::Delete, url)
}

/// A response, its body read in full (the host cuts bodies past the manifest's
/// `http_response_bytes`, which fails the request instead).
#[derive(Debug, Clone)]
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first value of a header (names compare without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every header, as received.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The body's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.body
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).map_err(|e| Error::msg(format!("the response is not JSON: {e}")))
    }
}

/// `scheme`, `authority` and `path?query` of an absolute `http(s)://` URL.
fn split_url(url: &str) -> Result<(Scheme, &str, &str)> {
    let bad = || Error::msg(format!("`{url}` is not an http:// or https:// URL"));
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        _ => return Err(bad()),
    };
    let cut = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(cut);
    if authority.is_empty() {
        return Err(bad());
    }
    Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
}

/// The first line of a host error's text, at most 300 characters: the reason, without any
/// detail the host appends below it.
fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().chars().take(300).collect()
}

fn failed(what: &str, url: &str, detail: impl std::fmt::Debug) -> Error {
    Error::msg(format!("HTTP {what} of {url} failed: {detail:?} (the delivery's log says why a request was refused)"))
}

impl Request {
    fn new(method: Method, url: &str) -> Self {
        Self { method, url: url.to_owned(), headers: Vec::new(), body: Vec::new(), timeout_ms: None }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and `content-type: application/json`.
    pub fn json(self, value: &Value) -> Self {
        self.header("content-type", "application/json").body(value.to_string())
    }

    /// Waits at most this long to connect and for the response's head (the manifest's
    /// limits still apply when they are shorter).
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = Some(ms);
        self
    }

    /// Sends the request and reads the whole response.
    pub fn send(self) -> Result<Response> {
        let url = self.url.as_str();
        let (scheme, authority, path) = split_url(url)?;
        let headers = Fields::new();
        for (k, v) in &self.headers {
            headers.append(k, v.as_bytes()).map_err(|e| failed("header", url, e))?;
        }
        // The length is known: say it, so servers that do not read chunked bodies get it.
        if !self.body.is_empty() && !self.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
            headers
                .append("content-length", self.body.len().to_string().as_bytes())
                .map_err(|e| failed("header", url, e))?;
        }
        let request = OutgoingRequest::new(headers);
        let set = |ok: core::result::Result<(), ()>, what: &str| ok.map_err(|()| failed("request", url, what));
        set(request.set_method(&self.method), "method")?;
        set(request.set_scheme(Some(&scheme)), "scheme")?;
        set(request.set_authority(Some(authority)), "authority")?;
        set(request.set_path_with_query(Some(path)), "path")?;
        let body = request.body().map_err(|()| failed("request", url, "body"))?;
        let options = self.timeout_ms.map(|ms| {
            let o = RequestOptions::new();
            let ns = ms.saturating_mul(1_000_000);
            let _ = o.set_connect_timeout(Some(ns));
            let _ = o.set_first_byte_timeout(Some(ns));
            o
        });
        let pending = outgoing_handler::handle(request, options).map_err(|e| failed("request", url, e))?;
        {
            let out = body.write().map_err(|()| failed("request body", url, "stream"))?;
            for chunk in self.body.chunks(4096) {
                out.blocking_write_and_flush(chunk).map_err(|e| failed("request body", url, e))?;
            }
        }
        OutgoingBody::finish(body, None).map_err(|e| failed("request body", url, e))?;
        let response = loop {
            match pending.get() {
                Some(Ok(Ok(response))) => break response,
                Some(Ok(Err(code))) => return Err(failed("request", url, code)),
                Some(Err(())) => return Err(failed("request", url, "the response was already taken")),
                None => pending.subscribe().block(),
            }
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response.consume().map_err(|()| failed("response", url, "body"))?;
        let mut bytes = Vec::new();
        {
            let stream = incoming.stream().map_err(|()| failed("response", url, "stream"))?;
            loop {
                match stream.blocking_read(64 << 10) {
                    Ok(chunk) => bytes.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        let code = wasip2::http::types::http_error_code(&e);
                        return Err(failed(
                            "response body",
                            url,
                            code.map_or_else(|| first_line(&e.to_debug_string()), |c| format!("{c:?}")),
                        ));
                    }
                }
            }
        }
        let _trailers = IncomingBody::finish(incoming);
        Ok(Response { status, headers, body: bytes })
    }
}
