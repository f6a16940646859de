//! A client of jobhost's HTTP API, for the operator commands (`jobhost jobs|plugin|records`)
//! and for anything else that drives a running host from Rust.
//!
//! Every answer is `{"data": …}` or `{"error": {"code", "message"}}`; [`Client`] unwraps the
//! first into the caller's type and turns the second into [`ClientError::Api`], so a command
//! can print the host's own message. Plain HTTP only: put a TLS-terminating proxy in front of
//! a host that is reached over a network.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a request did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not an http:// URL.
    #[error("`{0}` is not an http:// URL of a jobhost (e.g. http://127.0.0.1:7070)")]
    BadUrl(String),
    /// No connection, or it broke.
    #[error("cannot reach jobhost at {url}: {reason} (is `jobhost serve` running there?)")]
    Unreachable {
        /// The host's base URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The host answered with an error.
    #[error("{message} ({status} {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error's stable code (`not-found`, `conflict`, …).
        code: String,
        /// The host's message.
        message: String,
    },
    /// The answer was not what the API documents.
    #[error("unexpected answer from {url}: {reason}")]
    Protocol {
        /// The request's URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl ClientError {
    /// The error's code when the host answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A client for one host and one token.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the host at `base` (`http://host:port`), sending `token` when given.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/');
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(ClientError::BadUrl(base.to_owned()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ClientError::Unreachable { url: base.to_owned(), reason: e.to_string() })?;
        Ok(Self { base: base.to_owned(), token, http })
    }

    /// The host's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path` → `data`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.request(reqwest::Method::GET, path)).await
    }

    /// `POST path` with a JSON body → `data`.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, ClientError> {
        self.send(self.request(reqwest::Method::POST, path).json(body)).await
    }

    /// `POST path` with a body already encoded as JSON → `data`.
    pub async fn post_json_bytes<T: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<T, ClientError> {
        let req = self.request(reqwest::Method::POST, path).header("content-type", "application/json").body(body);
        self.send(req).await
    }

    /// `PUT path` with raw bytes of `content_type` → `data`.
    pub async fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        self.send(self.request(reqwest::Method::PUT, path).header("content-type", content_type).body(body)).await
    }

    /// `DELETE path` → `data`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.request(reqwest::Method::DELETE, path)).await
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            // reqwest's top-level message is generic; the cause names the real failure.
            reason: std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .last()
                .map_or_else(|| e.to_string(), ToString::to_string),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let url = resp.url().to_string();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        let protocol = |reason: String| ClientError::Protocol { url: url.clone(), reason };
        let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
            protocol(format!("{status}, not JSON ({e}): {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)])))
        })?;
        if !status.is_success() {
            let err = &body["error"];
            return Err(ClientError::Api {
                status: status.as_u16(),
                code: err["code"].as_str().unwrap_or("unknown").to_owned(),
                message: err["message"].as_str().unwrap_or("no message").to_owned(),
            });
        }
        match body {
            Value::Object(mut o) if o.contains_key("data") => {
                let data = o.remove("data").unwrap_or(Value::Null);
                serde_json::from_value(data).map_err(|e| protocol(format!("`data` has an unexpected shape: {e}")))
            }
            _ => Err(protocol("no `data` in a successful answer".into())),
        }
    }
}
