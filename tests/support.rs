//! Shared helpers for the integration tests: a host on the embedded store in a temporary data
//! directory, the conformance suite's ways to wait on observable state, runtimes and
//! hand-written components.

use std::time::Duration;

use jobhost::{Engine, EngineConfig, Env};
// The waiting helpers and settings of the store conformance suite, shared.
pub use jobhost_engine::conformance::{events_of, test_config, until_terminal};
use tempfile::TempDir;

/// [`Engine::wait_for`] under a real-time deadline: a wait that never ends aborts the test
/// process naming what it waited for (time may be paused, so no tokio timeout would do).
pub trait WaitNamed {
    /// Waits until `check` returns `Some`, re-checking after every commit; `what` names it.
    fn wait_named<T, F, Fut>(&self, what: &'static str, check: F) -> impl Future<Output = jobhost::Result<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = jobhost::Result<Option<T>>>;
}

impl WaitNamed for Engine {
    fn wait_named<T, F, Fut>(&self, what: &'static str, check: F) -> impl Future<Output = jobhost::Result<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = jobhost::Result<Option<T>>>,
    {
        jobhost_engine::conformance::wait_for(self, what, check)
    }
}

/// An engine on a temporary data directory, removed when dropped.
pub struct TestHost {
    /// The engine.
    pub engine: Engine,
    /// Keeps the directory alive.
    pub dir: TempDir,
}

impl TestHost {
    /// A host with [`test_config`].
    pub fn new() -> Self {
        Self::with_config(test_config())
    }

    /// A host with explicit settings.
    pub fn with_config(config: EngineConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = jobhost::open_engine(dir.path(), config).expect("open engine");
        Self { engine, dir }
    }

    /// A new environment's API.
    pub async fn env(&self) -> Env {
        let e = self.engine.create_environment("test").await.expect("create environment");
        self.engine.env(e.id)
    }
}

impl Default for TestHost {
    fn default() -> Self {
        Self::new()
    }
}

/// Runtime settings for tests: short CPU and wall limits, no compilation cache shared with
/// anything outside the test.
pub fn test_runtime_config() -> jobhost::runtime::RuntimeConfig {
    jobhost::runtime::RuntimeConfig {
        limits: jobhost::runtime::Limits {
            cpu: Duration::from_millis(300),
            wall: Duration::from_secs(10),
            ..Default::default()
        },
        max_instances: 32,
        cache_dir: None,
        ..Default::default()
    }
}

/// A runtime with [`test_runtime_config`].
pub fn test_runtime() -> std::sync::Arc<jobhost::runtime::Runtime> {
    jobhost::runtime::Runtime::new(test_runtime_config()).expect("runtime")
}

/// Loads a plugin that must load.
pub async fn load(
    rt: &std::sync::Arc<jobhost::runtime::Runtime>,
    path: &str,
) -> std::sync::Arc<jobhost::runtime::Plugin> {
    std::sync::Arc::new(rt.load(std::path::Path::new(path)).await.unwrap_or_else(|e| panic!("load {path}: {e}")))
}

/// Builds a component from a hand-written core module (WAT) for the `jobhost:plugin` world,
/// or for a world of `extra_wit` (a package that may use `jobhost:plugin`) when given.
///
/// The module must follow the canonical ABI itself: export `memory`, `cabi_realloc` and the
/// `jobhost:plugin/listener@0.1.0#…` functions. Used for attacks no Rust guest can express.
pub fn wat_component(wat: &str, extra_wit: Option<(&str, &str)>) -> Vec<u8> {
    let wit_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit");
    let mut resolve = wit_parser::Resolve::default();
    let (pkg, _) = resolve.push_dir(&wit_dir).expect("parse wit/");
    let world = match extra_wit {
        None => resolve.select_world(&[pkg], Some("plugin")).expect("plugin world"),
        Some((text, world)) => {
            let extra = resolve.push_str("extra.wit", text).expect("parse the extra WIT");
            resolve.select_world(&[extra], Some(world)).expect("extra world")
        }
    };
    let mut module = wat::parse_str(wat).expect("parse WAT");
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8, false)
        .expect("embed component metadata");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("core module")
        .validate(true)
        .encode()
        .expect("encode component")
}

/// The canonical-ABI scaffolding of a WAT listener with one route `job:ready` filtered on
/// `{"job": "<job>"}`, whose `handle` runs `body` (which must not return normally).
pub fn wat_listener(job: &str, imports: &str, body: &str) -> String {
    let filter = format!("{{\"job\":\"{job}\"}}");
    let le = |n: usize| (n as u32).to_le_bytes().iter().map(|b| format!("\\{b:02x}")).collect::<String>();
    // topic at 1024, filter at 1040, the subscription record at 1100, the returned list at 1200.
    let record = format!("{}{}{}{}{}", le(1024), le(9), le(1), le(1040), le(filter.len()));
    let escaped = filter.replace('"', "\\\"");
    let list = format!("{}{}", le(1100), le(1));
    format!(
        r#"(module
  {imports}
  (memory (export "memory") 1)
  (table $t 1 funcref)
  (global $heap (mut i32) (i32.const 8192))
  (data (i32.const 1024) "job:ready")
  (data (i32.const 1040) "{escaped}")
  (data (i32.const 1100) "{record}")
  (data (i32.const 1200) "{list}")
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
                           (i32.sub (i32.const 0) (local.get 2))))
    (global.set $heap (i32.add (local.get $p) (local.get 3)))
    (block $ok
      (br_if $ok (i32.le_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
      (drop (memory.grow (i32.add (i32.shr_u (i32.sub (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
                                             (i32.const 16)) (i32.const 1)))))
    (local.get $p))
  (func (export "jobhost:plugin/listener@0.1.0#subscriptions") (result i32)
    (i32.const 1200))
  (func (export "jobhost:plugin/listener@0.1.0#handle") (param i32) (result i32)
    {body}
    unreachable)
)"#,
    )
}

/// The precompiled artifacts (`*.cwasm`) in a compilation cache directory.
pub fn compiled_entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    walk(dir).into_iter().filter(|p| p.extension().is_some_and(|e| e == "cwasm")).collect()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
