//! Per-plugin limits and capabilities, and the manifest an operator writes to change them.
//!
//! A plugin without a manifest runs with [`Limits::default`] and no capabilities. The manifest
//! is `NAME.toml` beside `NAME.wasm`; it is parsed strictly (an unknown key or a value out of
//! range refuses the whole plugin version, with the key named) and hot-reloaded with the
//! component:
//!
//! ```toml
//! [limits]
//! memory_mib = 32            # every memory of an instance together
//! cpu_ms = 2000              # CPU time in guest code per delivery (epoch deadline)
//! wall_ms = 10000            # wall-clock time per delivery, host calls included
//! fuel = 500_000_000         # optional; the host must run with fuel metering on
//! max_instances = 8          # deliveries of this plugin running at once
//! max_jobs_per_delivery = 10000    # jobs created (`create`, and each part of a `split`)
//! max_events_per_delivery = 50000  # events written by the delivery's calls, all together
//! http_connect_ms = 5000     # outbound HTTP: resolve and connect (and TLS)
//! http_first_byte_ms = 10000 #   request sent → response head
//! http_total_ms = 30000      #   request sent → end of the response body
//! http_response_bytes = 16777216
//! http_request_bytes = 16777216
//! http_requests = 100        #   per delivery
//! http_in_flight = 16        #   of the plugin at once, all its deliveries
//!
//! [grants]
//! dirs = [{ host = "/srv/reference", guest = "/reference" }]   # read-only
//! env = { TZ = "UTC" }
//! secrets = ["API_TOKEN"]    # environment secrets it may read
//! any_job = false            # act only on the event's job family (the default)
//! allowed_outbound_hosts = ["https://api.example.com", "https://*.example.org:*"]
//!
//! [config]
//! endpoint = "https://example.invalid/hook"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{MAX_PAGE_SIZE, MAX_PARTS};

/// What one plugin may use per delivery. Every field has a safe default.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Bytes of linear memory per instance, all memories together.
    pub memory: usize,
    /// Elements per instance, all tables together.
    pub table_elements: usize,
    /// CPU time in guest code per delivery (epoch deadline).
    pub cpu: Duration,
    /// Wall-clock time per delivery, including time blocked in host calls.
    pub wall: Duration,
    /// Fuel (roughly, wasm instructions) per delivery; `None` for no fuel limit.
    pub fuel: Option<u64>,
    /// Parts per `split`.
    pub max_split_parts: u32,
    /// Records per `records.page`.
    pub max_page_size: u32,
    /// Records per `records.insert` or `records.update` call.
    pub max_records_per_write: usize,
    /// Records inserted or updated in one delivery, all calls together.
    pub max_records_per_delivery: u64,
    /// Jobs one delivery may create: one per `jobs.create`, one per part of a `jobs.split`.
    /// A delivery that fails after running into it is dead-lettered, not retried (a retry
    /// would create them again).
    pub max_jobs_per_delivery: u64,
    /// Events one delivery's calls may write, all together (each job call writes one or
    /// more; a split writes two per ready part). Dead-lettered like `max_jobs_per_delivery`.
    pub max_events_per_delivery: u64,
    /// Bytes of stdout, stderr and `log` kept per delivery; the rest is cut with a note.
    pub max_log_bytes: usize,
    /// Bytes of an outcome, info or input JSON the plugin passes to a job call, and of the
    /// error message its handler returns (which is cut, not refused).
    pub max_outcome_bytes: usize,
    /// Deliveries of this plugin running at once (per environment).
    pub max_instances: usize,
    /// Outbound HTTP (only for hosts granted in `allowed_outbound_hosts`).
    pub http: HttpLimits,
}

/// Limits of a plugin's outbound HTTP requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpLimits {
    /// To resolve, connect (and finish TLS).
    pub connect: Duration,
    /// From sending the request to the response's head.
    pub first_byte: Duration,
    /// From sending the request to the end of the response body.
    pub total: Duration,
    /// Response body bytes; past them the body is cut with an error.
    pub max_response_bytes: u64,
    /// Request body bytes; past them the request fails.
    pub max_request_bytes: u64,
    /// Requests per delivery.
    pub max_requests: u32,
    /// The plugin's requests in flight at once, all its deliveries together.
    pub max_in_flight: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(10),
            total: Duration::from_secs(30),
            max_response_bytes: 16 << 20,
            max_request_bytes: 16 << 20,
            max_requests: 100,
            max_in_flight: 16,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: 64 << 20,
            table_elements: 100_000,
            cpu: Duration::from_secs(5),
            wall: Duration::from_secs(30),
            fuel: None,
            max_split_parts: 10_000,
            max_page_size: MAX_PAGE_SIZE,
            max_records_per_write: 10_000,
            max_records_per_delivery: 1_000_000,
            // One split at `max_split_parts` fits, with its events (created and ready per part).
            max_jobs_per_delivery: 10_000,
            max_events_per_delivery: 50_000,
            max_log_bytes: 64 << 10,
            max_outcome_bytes: 64 << 10,
            max_instances: 64,
            http: HttpLimits::default(),
        }
    }
}

/// A directory granted read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where the plugin sees it (an absolute guest path such as `/reference`).
    pub guest: String,
}

/// What a plugin may reach beyond its own memory. Nothing by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Directories the plugin may read (never write).
    #[serde(default)]
    pub dirs: Vec<DirGrant>,
    /// Environment variables the plugin sees, with their values.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of environment secrets the plugin may read through `config.secret`.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Lets the plugin ack, complete, fail, cancel and split any job of its environment, not
    /// only the event's job, its parent and its parts.
    #[serde(default)]
    pub any_job: bool,
    /// Where the plugin may send HTTP requests: `scheme://host[:port]` each (see
    /// [`Grant`](crate::outbound::Grant)); none by default.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
}

/// A plugin's limits, capabilities and configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Manifest {
    /// Limits.
    pub limits: Limits,
    /// Capabilities.
    pub grants: Grants,
    /// Values the plugin reads through `config.get`.
    pub config: BTreeMap<String, String>,
    /// `grants.allowed_outbound_hosts`, parsed once with the manifest (every delivery uses them).
    #[serde(skip)]
    pub outbound: Arc<[crate::outbound::Grant]>,
}

/// The `[limits]` table as written; absent keys keep the host's defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    memory_mib: Option<u64>,
    table_elements: Option<u64>,
    cpu_ms: Option<u64>,
    wall_ms: Option<u64>,
    fuel: Option<u64>,
    max_split_parts: Option<u32>,
    max_page_size: Option<u32>,
    max_records_per_write: Option<u64>,
    max_records_per_delivery: Option<u64>,
    max_jobs_per_delivery: Option<u64>,
    max_events_per_delivery: Option<u64>,
    max_log_bytes: Option<u64>,
    max_outcome_bytes: Option<u64>,
    max_instances: Option<u64>,
    http_connect_ms: Option<u64>,
    http_first_byte_ms: Option<u64>,
    http_total_ms: Option<u64>,
    http_response_bytes: Option<u64>,
    http_request_bytes: Option<u64>,
    http_requests: Option<u32>,
    http_in_flight: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    grants: Grants,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

/// What the host allows a manifest to ask for.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    /// The largest memory an instance can have (the pooling allocator's slot size).
    pub memory: usize,
    /// Whether the engine meters fuel.
    pub fuel: bool,
}

/// A manifest or `[limits]` table that cannot be used; the message names the key (and the
/// manifest file, when there is one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

impl From<String> for ManifestError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

fn range<T: PartialOrd + std::fmt::Display + Copy>(key: &str, v: T, min: T, max: T) -> Result<T, String> {
    if v < min || v > max {
        return Err(format!("[limits] {key} = {v} is out of range {min}..={max}"));
    }
    Ok(v)
}

impl LimitsFile {
    /// These keys over `base`, each checked against its range and the host's `ceiling`.
    fn apply(self, base: &Limits, ceiling: Ceiling) -> Result<Limits, String> {
        let l = self;
        let mut limits = base.clone();
        let max_mib = (ceiling.memory >> 20) as u64;
        if let Some(v) = l.memory_mib {
            limits.memory = (range("memory_mib", v, 1, max_mib).map_err(|e| {
                format!("{e} (the host's instance pool has {max_mib} MiB slots; raise its memory limit to allow more)")
            })? << 20) as usize;
        }
        if let Some(v) = l.table_elements {
            limits.table_elements = range("table_elements", v, 1, 10_000_000)? as usize;
        }
        if let Some(v) = l.cpu_ms {
            limits.cpu = Duration::from_millis(range("cpu_ms", v, 1, 3_600_000)?);
        }
        if let Some(v) = l.wall_ms {
            limits.wall = Duration::from_millis(range("wall_ms", v, 1, 3_600_000)?);
        }
        if let Some(v) = l.fuel {
            if !ceiling.fuel {
                return Err(
                    "[limits] fuel is set but the host does not meter fuel (enable it in the runtime config)".into()
                );
            }
            limits.fuel = Some(range("fuel", v, 1, u64::MAX / 2)?);
        }
        if let Some(v) = l.max_split_parts {
            limits.max_split_parts = range("max_split_parts", v, 1, MAX_PARTS)?;
        }
        if let Some(v) = l.max_page_size {
            limits.max_page_size = range("max_page_size", v, 1, MAX_PAGE_SIZE)?;
        }
        if let Some(v) = l.max_records_per_write {
            limits.max_records_per_write = range("max_records_per_write", v, 1, 1_000_000)? as usize;
        }
        if let Some(v) = l.max_records_per_delivery {
            limits.max_records_per_delivery = range("max_records_per_delivery", v, 1, 1_000_000_000)?;
        }
        if let Some(v) = l.max_jobs_per_delivery {
            limits.max_jobs_per_delivery = range("max_jobs_per_delivery", v, 1, 1_000_000)?;
        }
        if let Some(v) = l.max_events_per_delivery {
            limits.max_events_per_delivery = range("max_events_per_delivery", v, 1, 10_000_000)?;
        }
        if let Some(v) = l.max_log_bytes {
            limits.max_log_bytes = range("max_log_bytes", v, 0, 64 << 20)? as usize;
        }
        if let Some(v) = l.max_outcome_bytes {
            limits.max_outcome_bytes = range("max_outcome_bytes", v, 2, 16 << 20)? as usize;
        }
        if let Some(v) = l.max_instances {
            limits.max_instances = range("max_instances", v, 1, 100_000)? as usize;
        }
        let ms = |key: &str, v: u64| range(key, v, 1, 3_600_000).map(Duration::from_millis);
        if let Some(v) = l.http_connect_ms {
            limits.http.connect = ms("http_connect_ms", v)?;
        }
        if let Some(v) = l.http_first_byte_ms {
            limits.http.first_byte = ms("http_first_byte_ms", v)?;
        }
        if let Some(v) = l.http_total_ms {
            limits.http.total = ms("http_total_ms", v)?;
        }
        if let Some(v) = l.http_response_bytes {
            limits.http.max_response_bytes = range("http_response_bytes", v, 0, 1 << 30)?;
        }
        if let Some(v) = l.http_request_bytes {
            limits.http.max_request_bytes = range("http_request_bytes", v, 0, 1 << 30)?;
        }
        if let Some(v) = l.http_requests {
            limits.http.max_requests = range("http_requests", v, 1, 100_000)?;
        }
        if let Some(v) = l.http_in_flight {
            limits.http.max_in_flight = range("http_in_flight", v, 1, 10_000)? as usize;
        }
        Ok(limits)
    }
}

/// A `[limits]` table (a manifest's keys, e.g. from the host's config file) over `base`.
pub fn limits_from_table(table: toml::Table, base: &Limits, ceiling: Ceiling) -> Result<Limits, ManifestError> {
    let file: LimitsFile =
        toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| format!("[limits]: {}", e.message()))?;
    Ok(file.apply(base, ceiling)?)
}

impl Manifest {
    /// Parses a manifest over `base` (the host's defaults). Every error names the key.
    pub fn parse(text: &str, base: &Limits, ceiling: Ceiling) -> Result<Self, ManifestError> {
        let file: ManifestFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        let limits = file.limits.apply(base, ceiling)?;
        for d in &file.grants.dirs {
            if !d.guest.starts_with('/') {
                return Err(format!("[grants] dirs: guest path `{}` must be absolute", d.guest).into());
            }
            if !d.host.is_dir() {
                return Err(format!("[grants] dirs: {} is not a directory", d.host.display()).into());
            }
        }
        for s in &file.grants.secrets {
            crate::model::validate_secret_name(s).map_err(|e| format!("[grants] secrets: {e}"))?;
        }
        let outbound = file
            .grants
            .allowed_outbound_hosts
            .iter()
            .map(|g| crate::outbound::Grant::parse(g).map_err(|e| format!("[grants] allowed_outbound_hosts: {e}")))
            .collect::<Result<Arc<[_]>, _>>()?;
        for k in file.grants.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("[grants] env: `{k}` is not a variable name").into());
            }
        }
        Ok(Self { limits, grants: file.grants, config: file.config, outbound })
    }

    /// The text of `NAME.toml` beside a component; `None` when there is none.
    pub fn read_text(component: &Path) -> Result<Option<String>, ManifestError> {
        let path = component.with_extension("toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display()).into()),
        }
    }

    /// The manifest of the component at `component` from its text (`None`: the defaults);
    /// errors name the manifest file.
    pub fn from_text(
        component: &Path,
        text: Option<&str>,
        base: &Limits,
        ceiling: Ceiling,
    ) -> Result<Self, ManifestError> {
        match text {
            Some(text) => Self::parse(text, base, ceiling)
                .map_err(|e| format!("{}: {e}", component.with_extension("toml").display()).into()),
            None => Ok(Self { limits: base.clone(), ..Self::default() }),
        }
    }

    /// Reads `NAME.toml` beside a component, or the defaults when there is none.
    pub fn for_component(component: &Path, base: &Limits, ceiling: Ceiling) -> Result<Self, ManifestError> {
        Self::from_text(component, Self::read_text(component)?.as_deref(), base, ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CEIL: Ceiling = Ceiling { memory: 64 << 20, fuel: false };

    #[test]
    fn defaults_without_keys_and_overrides_with_them() {
        let base = Limits::default();
        assert_eq!(Manifest::parse("", &base, CEIL).unwrap().limits, base);
        let m = Manifest::parse(
            "[limits]\nmemory_mib = 16\ncpu_ms = 250\nmax_instances = 2\nmax_jobs_per_delivery = 7\nmax_events_per_delivery = 9\n[grants]\nsecrets = [\"API_KEY\"]\nenv = { TZ = \"UTC\" }\n[config]\nurl = \"x\"\n",
            &base,
            CEIL,
        )
        .unwrap();
        assert_eq!(m.limits.memory, 16 << 20);
        assert_eq!(m.limits.cpu, Duration::from_millis(250));
        assert_eq!(m.limits.max_instances, 2);
        assert_eq!((m.limits.max_jobs_per_delivery, m.limits.max_events_per_delivery), (7, 9));
        assert_eq!(m.limits.wall, base.wall);
        assert_eq!(m.grants.secrets, ["API_KEY"]);
        assert_eq!(m.grants.env["TZ"], "UTC");
        assert_eq!(m.config["url"], "x");
        assert!(!m.grants.any_job);
    }

    #[test]
    fn strict_parsing_names_the_key() {
        let base = Limits::default();
        let cases = [
            ("[limits]\nmemroy_mib = 1\n", "memroy_mib"),
            ("[limit]\n", "limit"),
            ("[limits]\nmemory_mib = 128\n", "memory_mib = 128 is out of range"),
            ("[limits]\ncpu_ms = 0\n", "cpu_ms = 0"),
            ("[limits]\ncpu_ms = \"5s\"\n", "cpu_ms"),
            ("[limits]\nfuel = 10\n", "does not meter fuel"),
            ("[limits]\nmax_page_size = 20000\n", "max_page_size"),
            ("[limits]\nmax_split_parts = 1000000000\n", "max_split_parts"),
            ("[grants]\ndirs = [{ host = \"/\", guest = \"rel\" }]\n", "must be absolute"),
            ("[grants]\ndirs = [{ host = \"/definitely/not/here\", guest = \"/x\" }]\n", "not a directory"),
            ("[grants]\nsecrets = [\"bad name\"]\n", "secrets"),
            ("[grants]\nnetwork = true\n", "network"),
            ("[config]\nport = 8080\n", "expected a string"),
            (
                "[grants]\nallowed_outbound_hosts = [\"api.example.com\"]\n",
                "allowed_outbound_hosts: `api.example.com` has no scheme",
            ),
            ("[limits]\nhttp_requests = 0\n", "http_requests = 0 is out of range"),
            ("[limits]\nmax_jobs_per_delivery = 0\n", "max_jobs_per_delivery = 0 is out of range 1..=1000000"),
            ("[limits]\nmax_events_per_delivery = 20000000\n", "max_events_per_delivery = 20000000 is out of range"),
        ];
        for (text, needle) in cases {
            let e = Manifest::parse(text, &base, CEIL).unwrap_err();
            assert!(e.0.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn fuel_is_accepted_when_the_host_meters_it() {
        let m = Manifest::parse("[limits]\nfuel = 1000\n", &Limits::default(), Ceiling { fuel: true, ..CEIL }).unwrap();
        assert_eq!(m.limits.fuel, Some(1000));
    }
}
