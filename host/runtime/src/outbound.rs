//! Outbound HTTP for plugins: the standard `wasi:http` interfaces, denied by default and
//! granted host by host in the plugin's manifest (`[grants] allowed_outbound_hosts`).
//!
//! Every request a plugin makes comes to [`Outbound::send_request`] (the `wasi:http` hooks of
//! its instance), which sends it itself — never through a client that would resolve or
//! redirect on its own:
//!
//! 1. **Limits first**: at most `http_requests` per delivery; at most `http_in_flight` of the
//!    plugin's requests at once (a request waits up to its connect timeout for a slot).
//! 2. **The grant**: scheme, host and port must match an entry of `allowed_outbound_hosts`
//!    ([`Grant`]); otherwise the request is refused naming the host and the manifest key.
//! 3. **The address**: the host resolves the name once and checks every address it got. A
//!    loopback, private, link-local (cloud metadata), shared, multicast, documentation or
//!    otherwise special address ([`denied_range`]) is refused unless the grant names that
//!    address literally — so a granted name that resolves to 10.0.0.5 is refused. The
//!    connection goes to the address that was checked (no second lookup to race).
//! 4. **Redirects are not followed** by the host: a 3xx reaches the plugin as it is, and a
//!    client that follows it makes a new request, checked from step 1.
//! 5. **Time and size**: connect timeout, time to the response's head, total time (the
//!    response body included, so a slow drip is cut), request and response body bytes.
//!
//! Each request, granted or not, is an [`HttpCall`] in the delivery's execution record
//! (method, origin, path without its query string, status, bytes each way, duration, why it
//! was refused or cut — never headers or bodies), a note in the delivery's log when refused,
//! and a count in [`HttpStats`] per plugin, origin and result.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::limits::HttpLimits;
use crate::model::HttpCall;

/// One entry of `allowed_outbound_hosts`: `scheme://host[:port]`, where the host may be a
/// name, `*.name` (exactly one more label), or an IP address, and the port a number or `*`
/// (absent: the scheme's default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// As written.
    pub text: String,
    https: bool,
    host: GrantHost,
    /// `None`: any port.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum GrantHost {
    Name(String),
    OneLabelUnder(String),
    Ip(IpAddr),
}

fn valid_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Grant {
    /// Parses one entry; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Grant, String> {
        let bad = |why: &str| format!("`{text}` {why} (write scheme://host[:port], e.g. https://api.example.com)");
        let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("has no scheme"))?;
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => return Err(bad("is not http or https")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad("must be a scheme and a host only: no path, query or user"));
        }
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| bad("has an unclosed `[`"))?;
                match after {
                    "" => (host, None),
                    _ => (host, Some(after.strip_prefix(':').ok_or_else(|| bad("has text after `]`"))?)),
                }
            }
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            },
        };
        let port = match port {
            None => Some(if https { 443 } else { 80 }),
            Some("*") => None,
            Some(p) => Some(
                p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| bad("has a port that is not 1-65535 or *"))?,
            ),
        };
        let lower = host.to_ascii_lowercase();
        let host = if let Ok(ip) = lower.parse::<IpAddr>() {
            GrantHost::Ip(ip)
        } else if let Some(under) = lower.strip_prefix("*.") {
            if !valid_name(under) || !under.contains('.') {
                return Err(bad("needs a domain of two labels or more after `*.`"));
            }
            GrantHost::OneLabelUnder(under.to_owned())
        } else if valid_name(&lower) {
            GrantHost::Name(lower)
        } else {
            return Err(bad("has a host that is not a name, `*.name` or an IP address"));
        };
        Ok(Grant { text: text.to_owned(), https, host, port })
    }

    /// Whether a request to `https`, `host` (lower case, no brackets) and `port` is granted.
    fn matches(&self, https: bool, host: &str, port: u16) -> bool {
        if self.https != https || self.port.is_some_and(|p| p != port) {
            return false;
        }
        match &self.host {
            GrantHost::Name(name) => name == host,
            GrantHost::OneLabelUnder(under) => host
                .strip_suffix(under.as_str())
                .and_then(|label| label.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            GrantHost::Ip(ip) => host.parse::<IpAddr>().is_ok_and(|h| h == *ip),
        }
    }

    fn names(&self, ip: IpAddr) -> bool {
        matches!(self.host, GrantHost::Ip(g) if canonical(g) == canonical(ip))
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            if s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                IpAddr::V4(embedded)
            } else {
                ip
            }
        }
        v4 => v4,
    }
}

/// Why a request may not reach `ip` unless a grant names it: `None` for a public address.
pub fn denied_range(ip: IpAddr) -> Option<&'static str> {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            match (a, b, c) {
                (0, _, _) => Some("a \"this network\" address (0.0.0.0/8)"),
                (10, _, _) => Some("a private address (10.0.0.0/8)"),
                (100, 64..=127, _) => Some("a shared (carrier-grade NAT) address (100.64.0.0/10)"),
                (127, _, _) => Some("a loopback address (127.0.0.0/8)"),
                (169, 254, _) => Some("a link-local address, where cloud metadata services live (169.254.0.0/16)"),
                (172, 16..=31, _) => Some("a private address (172.16.0.0/12)"),
                (192, 0, 0) => Some("an IETF protocol address (192.0.0.0/24)"),
                (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Some("a documentation address"),
                (192, 168, _) => Some("a private address (192.168.0.0/16)"),
                (198, 18..=19, _) => Some("a benchmarking address (198.18.0.0/15)"),
                (224..=239, _, _) => Some("a multicast address"),
                (240..=255, _, _) => Some("a reserved or broadcast address"),
                _ => None,
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            if v6 == Ipv6Addr::UNSPECIFIED {
                Some("the unspecified address")
            } else if v6 == Ipv6Addr::LOCALHOST {
                Some("a loopback address (::1)")
            } else if s[..6] == [0, 0, 0, 0, 0, 0] {
                Some("an IPv4-compatible address (::/96)")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("a unique local address (fc00::/7)")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("a link-local address (fe80::/10)")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("a multicast address")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("a documentation address (2001:db8::/32)")
            } else {
                None
            }
        }
    }
}

/// Outbound requests per plugin, origin and result, for `/metrics`.
#[derive(Debug, Default)]
pub struct HttpStats {
    counts: Mutex<BTreeMap<(String, String, &'static str), HttpCount>>,
}

/// Requests and bytes of one plugin, origin and result.
#[derive(Debug, Default, Clone, Copy)]
pub struct HttpCount {
    /// Requests.
    pub requests: u64,
    /// Request body bytes sent.
    pub sent: u64,
    /// Response body bytes received.
    pub received: u64,
}

/// Origins counted per plugin before the rest are counted together (refused origins are the
/// plugin's choice, so their number is not bounded by the grants).
const MAX_ORIGINS: usize = 1000;

impl HttpStats {
    fn count(&self, plugin: &str, origin: &str, result: &'static str, sent: u64, received: u64) {
        let Ok(mut counts) = self.counts.lock() else { return };
        let origin = if counts.len() >= MAX_ORIGINS && !counts.keys().any(|(p, o, _)| p == plugin && o == origin) {
            "other"
        } else {
            origin
        };
        let c = counts.entry((plugin.to_owned(), origin.to_owned(), result)).or_default();
        c.requests += 1;
        c.sent += sent;
        c.received += received;
    }

    /// Every `(plugin, origin, result)` with its counts.
    pub fn snapshot(&self) -> Vec<(String, String, &'static str, HttpCount)> {
        let Ok(counts) = self.counts.lock() else { return Vec::new() };
        counts.iter().map(|((p, o, r), c)| (p.clone(), o.clone(), *r, *c)).collect()
    }
}

/// What outbound requests of one plugin share across its deliveries.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Its requests in flight.
    pub in_flight: Arc<Semaphore>,
    /// The runtime's counters.
    pub stats: Arc<HttpStats>,
}

/// A delivery's requests as the execution record will show them.
pub type Calls = Arc<Mutex<Vec<HttpCall>>>;

/// Writes a line into the delivery's log.
pub type Note = Arc<dyn Fn(&str) + Send + Sync>;

/// The `wasi:http` hooks of one instance: the plugin's grants and limits, and what its
/// requests did.
pub struct Outbound {
    plugin: Arc<str>,
    grants: Arc<[Grant]>,
    limits: HttpLimits,
    shared: Option<Shared>,
    requests: u32,
    calls: Calls,
    note: Note,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").field("plugin", &self.plugin).field("requests", &self.requests).finish()
    }
}

impl Outbound {
    /// The hooks of a delivery of `plugin`; `shared: None` while loading (no requests then).
    pub fn new(plugin: Arc<str>, grants: Arc<[Grant]>, limits: HttpLimits, shared: Option<Shared>, note: Note) -> Self {
        Self { plugin, grants, limits, shared, requests: 0, calls: Arc::default(), note }
    }

    /// Requests the guest has made so far, sent or refused.
    pub fn attempts(&self) -> u32 {
        self.requests
    }

    /// The delivery's requests so far.
    pub fn calls(&self) -> Vec<HttpCall> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// A refusal or failure: the guest's error code, the words for the record and the log, and
/// the result it is counted as (`denied`, `limit`, `timeout`, `error`).
struct Failed(HttpError, String, &'static str);

/// One request's entry in the record, updated as its response arrives.
#[derive(Clone)]
struct Entry {
    calls: Calls,
    index: usize,
    started: Instant,
    plugin: Arc<str>,
    origin: String,
    stats: Option<Arc<HttpStats>>,
}

impl Entry {
    fn update(&self, f: impl FnOnce(&mut HttpCall)) {
        if let Ok(mut calls) = self.calls.lock()
            && let Some(call) = calls.get_mut(self.index)
        {
            f(call);
            call.duration_us = self.started.elapsed().as_micros() as i64;
        }
    }

    /// Counts the request once it has ended, as `result`.
    fn end(&self, result: &'static str) {
        let (sent, received) = self
            .calls
            .lock()
            .ok()
            .and_then(|c| c.get(self.index).map(|c| (c.sent_bytes, c.received_bytes)))
            .unwrap_or_default();
        if let Some(stats) = &self.stats {
            stats.count(&self.plugin, &self.origin, result, sent, received);
        }
    }
}

type Sent = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>), HttpError>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_done: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        let uri = request.uri().clone();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let host = host.strip_suffix('.').unwrap_or(&host).to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let origin = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("{}://[{host}]:{port}", if https { "https" } else { "http" }),
            _ => format!("{}://{host}:{port}", if https { "https" } else { "http" }),
        };
        let method = request.method().to_string();
        self.requests += 1;
        let index = {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            calls.push(HttpCall {
                method: method.clone(),
                origin: origin.clone(),
                path: uri.path().to_owned(),
                status: None,
                sent_bytes: 0,
                received_bytes: 0,
                duration_us: 0,
                error: None,
            });
            calls.len() - 1
        };
        let entry = Entry {
            calls: self.calls.clone(),
            index,
            started: Instant::now(),
            plugin: self.plugin.clone(),
            origin: origin.clone(),
            stats: self.shared.as_ref().map(|s| s.stats.clone()),
        };
        let note = self.note.clone();
        let fail = move |entry: &Entry, failed: Failed| {
            let Failed(code, words, result) = failed;
            entry.update(|c| c.error = Some(words.clone()));
            entry.end(result);
            note(&format!("[jobhost] {result}: {method} {origin}: {words}"));
            Err(code)
        };
        let limits = self.limits.clone();
        if self.requests > limits.max_requests {
            let words = format!(
                "more than {} requests in one delivery (http_requests in [limits] of the manifest)",
                limits.max_requests
            );
            return Box::new(std::future::ready(fail(
                &entry,
                Failed(HttpError::ConnectionLimitReached, words, "limit"),
            )));
        }
        let Some(grant) = self.grants.iter().find(|g| g.matches(https, &host, port)).cloned() else {
            let words = format!(
                "{} is not granted: add it to allowed_outbound_hosts in [grants] of the plugin's manifest",
                entry.origin
            );
            return Box::new(std::future::ready(fail(&entry, Failed(HttpError::HttpRequestDenied, words, "denied"))));
        };
        let Some(shared) = self.shared.clone() else {
            let words = "no requests while the plugin loads".to_owned();
            return Box::new(std::future::ready(fail(&entry, Failed(HttpError::HttpRequestDenied, words, "denied"))));
        };
        // Timeouts the guest asked for may be shorter than the manifest's, never longer.
        let shorter = |mine: Duration, theirs: Option<Duration>| theirs.map_or(mine, |t| t.min(mine));
        let connect = shorter(limits.connect, options.and_then(|o| o.connect_timeout));
        let first_byte = shorter(limits.first_byte, options.and_then(|o| o.first_byte_timeout));
        Box::new(async move {
            let deadline = tokio::time::Instant::now() + limits.total;
            let sent =
                send(request, https, &host, port, &grant, &shared, &limits, connect, first_byte, deadline, &entry)
                    .await;
            match sent {
                Ok(response) => Ok((response, Box::new(async { Ok(()) }) as Box<dyn Future<Output = _> + Send>)),
                Err(failed) => fail(&entry, failed),
            }
        })
    }
}

fn tls() -> Arc<tokio_rustls::rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<tokio_rustls::rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = tokio_rustls::rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            Arc::new(tokio_rustls::rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
        })
        .clone()
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

#[allow(clippy::too_many_arguments)]
async fn send(
    mut request: http::Request<WasiBody>,
    https: bool,
    host: &str,
    port: u16,
    grant: &Grant,
    shared: &Shared,
    limits: &HttpLimits,
    connect: Duration,
    first_byte: Duration,
    deadline: tokio::time::Instant,
    entry: &Entry,
) -> Result<http::Response<WasiBody>, Failed> {
    let connect_by = (tokio::time::Instant::now() + connect).min(deadline);
    let permit = tokio::time::timeout_at(connect_by, shared.in_flight.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            Failed(
                HttpError::ConnectionLimitReached,
                format!(
                    "{} of the plugin's requests were in flight for the whole connect timeout \
                     (http_in_flight in [limits] of the manifest)",
                    limits.max_in_flight
                ),
                "limit",
            )
        })?;
    // Resolved once, here; the connection goes to an address checked below.
    let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => match tokio::time::timeout_at(connect_by, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(found)) => found.collect(),
            Ok(Err(e)) => {
                return Err(Failed(
                    HttpError::DnsError { rcode: None, info_code: None },
                    format!("{host} does not resolve: {e}"),
                    "error",
                ));
            }
            Err(_) => return Err(Failed(HttpError::DnsTimeout, format!("resolving {host} timed out"), "error")),
        },
    };
    if addresses.is_empty() {
        return Err(Failed(HttpError::DestinationNotFound, format!("{host} has no address"), "error"));
    }
    for a in &addresses {
        if let Some(range) = denied_range(a.ip())
            && !grant.names(a.ip())
        {
            return Err(Failed(
                HttpError::DestinationIpProhibited,
                format!("{host} resolves to {}, {range}: refused unless a grant names that address itself", a.ip()),
                "denied",
            ));
        }
    }
    let mut tcp = None;
    let mut last = String::new();
    for a in &addresses {
        match tokio::time::timeout_at(connect_by, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(stream)) => {
                tcp = Some(stream);
                break;
            }
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => {
                return Err(Failed(HttpError::ConnectionTimeout, format!("connecting to {a} timed out"), "error"));
            }
        }
    }
    let tcp = tcp.ok_or_else(|| Failed(HttpError::ConnectionRefused, format!("cannot connect: {last}"), "error"))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Stream> = if https {
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
            Failed(HttpError::TlsProtocolError, format!("{host} is not a TLS server name: {e}"), "error")
        })?;
        let tls = tokio_rustls::TlsConnector::from(tls());
        match tokio::time::timeout_at(connect_by, tls.connect(name, tcp)).await {
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => return Err(Failed(HttpError::TlsCertificateError, format!("TLS with {host}: {e}"), "error")),
            Err(_) => return Err(Failed(HttpError::ConnectionTimeout, format!("TLS with {host} timed out"), "error")),
        }
    } else {
        Box::new(tcp)
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(wasmtime_wasi_http::io::TokioIo::new(stream)).await {
            Ok(pair) => pair,
            Err(e) => return Err(Failed(HttpError::HttpProtocolError, format!("HTTP handshake: {e}"), "error")),
        };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "an outbound HTTP connection ended with an error");
        }
    });
    // The request line in origin form (the path and query), as to a server, not a proxy.
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    *request.uri_mut() =
        http::Uri::try_from(path).map_err(|e| Failed(HttpError::HttpRequestUriInvalid, e.to_string(), "error"))?;
    let request = request.map(|body| Counted::request(body, limits.max_request_bytes, entry.clone()).boxed_unsync());
    let head_by = (tokio::time::Instant::now() + first_byte).min(deadline);
    let response = match tokio::time::timeout_at(head_by, sender.send_request(request)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let too_big = entry.calls.lock().ok().and_then(|c| c.get(entry.index).and_then(|c| c.error.clone()));
            return Err(match too_big {
                Some(words) => Failed(HttpError::HttpRequestBodySize(Some(limits.max_request_bytes)), words, "limit"),
                None => Failed(HttpError::HttpProtocolError, format!("the request failed: {e}"), "error"),
            });
        }
        Err(_) => {
            return Err(Failed(
                HttpError::ConnectionReadTimeout,
                format!("no response within {} ms (http_first_byte_ms or the total time)", first_byte.as_millis()),
                "timeout",
            ));
        }
    };
    let status = response.status().as_u16();
    entry.update(|c| c.status = Some(status));
    Ok(response.map(|incoming| {
        Counted::response(incoming, limits.max_response_bytes, limits.total, deadline, entry.clone(), permit)
            .boxed_unsync()
    }))
}

/// A body that counts its bytes into the request's entry, refuses to pass its limit, and (a
/// response) ends at the request's deadline.
struct Counted<B> {
    inner: B,
    bytes: u64,
    limit: u64,
    response: bool,
    total: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    entry: Entry,
    done: bool,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Counted<WasiBody> {
    fn request(inner: WasiBody, limit: u64, entry: Entry) -> Self {
        Self {
            inner,
            bytes: 0,
            limit,
            response: false,
            total: Duration::ZERO,
            deadline: None,
            entry,
            done: false,
            _permit: None,
        }
    }
}

impl Counted<hyper::body::Incoming> {
    fn response(
        inner: hyper::body::Incoming,
        limit: u64,
        total: Duration,
        deadline: tokio::time::Instant,
        entry: Entry,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        Self {
            inner,
            bytes: 0,
            limit,
            response: true,
            total,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            entry,
            done: false,
            _permit: Some(permit),
        }
    }
}

impl<B> Counted<B> {
    fn finish(&mut self, error: Option<String>, result: &'static str) {
        if self.done {
            return;
        }
        self.done = true;
        if self.response {
            self.entry.update(|c| c.error = c.error.take().or(error));
            self.entry.end(result);
        } else if let Some(e) = error {
            self.entry.update(|c| c.error = Some(e));
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        // A response the plugin stopped reading still counts as a request made.
        if self.response {
            self.finish(None, "ok");
        }
    }
}

impl<B, E> Body for Counted<B>
where
    B: Body<Data = Bytes, Error = E> + Unpin,
    E: std::fmt::Display,
{
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        if this.done && this.response {
            return Poll::Ready(None);
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            let words = format!("the response took longer than {} ms in all (http_total_ms)", this.total.as_millis());
            this.finish(Some(words), "timeout");
            return Poll::Ready(Some(Err(HttpError::HttpResponseTimeout)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.finish(None, "ok");
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let words = format!("the {} body failed: {e}", if this.response { "response" } else { "request" });
                this.finish(Some(words), "error");
                Poll::Ready(Some(Err(HttpError::HttpProtocolError)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                this.bytes += n;
                let (bytes, response) = (this.bytes.min(this.limit), this.response);
                this.entry.update(|c| if response { c.received_bytes = bytes } else { c.sent_bytes = bytes });
                if this.bytes > this.limit {
                    let (what, key) =
                        if response { ("response", "http_response_bytes") } else { ("request", "http_request_bytes") };
                    let words = format!("cut: the {what} body is larger than {} bytes ({key})", this.limit);
                    this.finish(Some(words), "limit");
                    return Poll::Ready(Some(Err(if response {
                        HttpError::HttpResponseBodySize(Some(this.limit))
                    } else {
                        HttpError::HttpRequestBodySize(Some(this.limit))
                    })));
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_and_match_scheme_host_and_port() {
        let g = Grant::parse("https://api.example.com").unwrap();
        assert!(g.matches(true, "api.example.com", 443));
        assert!(!g.matches(false, "api.example.com", 80), "the scheme is part of the grant");
        assert!(!g.matches(true, "api.example.com", 8443), "the default port only");
        assert!(!g.matches(true, "evil.api.example.com", 443));
        let any = Grant::parse("http://127.0.0.1:*").unwrap();
        assert!(any.matches(false, "127.0.0.1", 9) && any.names("127.0.0.1".parse().unwrap()));
        let wild = Grant::parse("https://*.example.org").unwrap();
        assert!(wild.matches(true, "a.example.org", 443));
        assert!(!wild.matches(true, "example.org", 443) && !wild.matches(true, "a.b.example.org", 443));
        assert!(!wild.matches(true, "aexample.org", 443));
        let v6 = Grant::parse("http://[::1]:8080").unwrap();
        assert!(v6.matches(false, "::1", 8080));
        for bad in [
            "api.example.com",
            "ftp://x.example",
            "https://x.example/path",
            "https://user@x.example",
            "https://x.example:0",
            "https://x.example:99999",
            "https://*.com",
            "https://exa mple.com",
            "https://*",
        ] {
            assert!(Grant::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn special_addresses_are_denied_and_public_ones_are_not() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "::127.0.0.1",
        ] {
            assert!(denied_range(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(denied_range(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }
}
