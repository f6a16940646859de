//! The PostgreSQL backend against the store conformance suite, on a real server (started by
//! the tests: see `jobhost-test-postgres`), one fresh database per test. Second hosts open a
//! backend of their own on the same database, as a second process would.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use jobhost_store::Backend;
use jobhost_store_postgres::{PgBackend, PgOptions};

/// The database URL of each backend opened here, by its address.
static URLS: Mutex<Option<HashMap<usize, String>>> = Mutex::new(None);

fn key(b: &Arc<dyn Backend>) -> usize {
    Arc::as_ptr(b) as *const () as usize
}

fn open_url(url: String) -> Arc<dyn Backend> {
    let backend: Arc<dyn Backend> =
        Arc::new(PgBackend::open(PgOptions::new(url.clone())).expect("open the PostgreSQL store"));
    URLS.lock().unwrap().get_or_insert_default().insert(key(&backend), url);
    backend
}

fn open(_scratch: &Path) -> Arc<dyn Backend> {
    open_url(jobhost_test_postgres::server().fresh_database())
}

fn open_again(first: &Arc<dyn Backend>) -> Arc<dyn Backend> {
    let url = URLS.lock().unwrap().as_ref().and_then(|m| m.get(&key(first)).cloned()).expect("a backend opened here");
    open_url(url)
}

jobhost_engine::conformance_suite!(open, open_again = open_again);
