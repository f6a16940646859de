//! The store conformance suite: what every backend must pass, run from the backend's own tests.
//!
//! ```ignore
//! // In a backend crate's tests (with `jobhost-engine = { features = ["conformance"] }`):
//! fn open(scratch: &std::path::Path) -> std::sync::Arc<dyn jobhost_store::Backend> {
//!     std::sync::Arc::new(MyBackend::open(scratch).unwrap())
//! }
//! jobhost_engine::conformance_suite!(open);
//! ```
//!
//! The macro expands to one `#[tokio::test]` per case, each on a fresh store:
//!
//! - [`primitives`]: every primitive of the boundary — atomic writes, retryable failures,
//!   fenced leases, subscriptions' version, hosts and reclaiming, locks that read what they lock.
//! - [`rules`]: every rule of `docs/job-model.md`, through the engine: the lifecycle table,
//!   parts and `job:parts-completed`, records, deliveries (retries, dead letters, leases),
//!   environments, secrets, the watchdog, the loop guard, the seeds' scenario.
//! - [`generated`]: generated sequences of creates and calls over several jobs and parts,
//!   checked after every step against a model of the job model (proptest, shrunk on failure);
//!   generated records (any unicode, integers at the ends of i64 and u64, floats, nulls,
//!   nesting) through an insert and an update and back; generated job listings (any mix of
//!   statuses, type, operation, parent, top level and creation window, in pages of 1–7)
//!   against the jobs that match.
//! - [`concurrency`]: what a backend gets wrong when it is right only because it has one
//!   writer — tasks racing the parts of several parents to their end (exactly one
//!   `job:parts-completed` each), two engines (two hosts) leasing from one store (no delivery
//!   handled twice at once), a lease stolen after it expired and the late answer refused.
//!
//! A case that needs a second host opens a second engine on the same backend: a backend whose
//! hosts would each have their own connection pool passes the same cases with one pool each.

pub mod concurrency;
pub mod generated;
pub mod primitives;
pub mod rules;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tempfile::TempDir;

use crate::model::{Event, Job, JobStatus};
use crate::store::Backend;
use crate::{Engine, EngineConfig, Env};

/// Opens a fresh, empty store whose data lives under `scratch` (or elsewhere: a database
/// server's fresh schema), for one test.
pub type Open = fn(scratch: &Path) -> Arc<dyn Backend>;

/// Opens a second backend on the store `first` uses, as another process would (its own
/// connections): the suite's second hosts then share nothing with the first but the database.
pub type OpenAgain = fn(first: &Arc<dyn Backend>) -> Arc<dyn Backend>;

static OPEN: OnceLock<Open> = OnceLock::new();
static OPEN_AGAIN: OnceLock<OpenAgain> = OnceLock::new();

/// Sets the backend the suite runs on (the first call wins; a test binary runs one backend).
pub fn install(open: Open) {
    let _ = OPEN.set(open);
}

/// For a backend many processes can open at once: second hosts get a backend of their own.
pub fn install_open_again(open_again: OpenAgain) {
    let _ = OPEN_AGAIN.set(open_again);
}

fn open_backend(scratch: &Path) -> Arc<dyn Backend> {
    let open = OPEN.get().expect("conformance::install(open) was not called");
    open(scratch)
}

/// An engine on a fresh store of the installed backend, with a scratch directory the test may
/// use; both go away when it is dropped.
pub struct TestHost {
    /// The engine.
    pub engine: Engine,
    /// The test's scratch directory (the store may live in it).
    pub dir: TempDir,
}

/// Settings for tests: quick retries, watchdog off unless a test turns it on.
pub fn test_config() -> EngineConfig {
    EngineConfig {
        ack_timeout: None,
        stale_timeout: None,
        retry_backoff: Duration::from_millis(5),
        lease: Duration::from_secs(60),
        secret_key: Some(test_key().clone()),
        ..EngineConfig::default()
    }
}

/// The secret key of [`test_config`]: one per test process.
pub fn test_key() -> &'static crate::SecretKey {
    static KEY: OnceLock<crate::SecretKey> = OnceLock::new();
    KEY.get_or_init(|| crate::SecretKey::generate().expect("a random key"))
}

impl TestHost {
    /// A host with [`test_config`].
    pub fn new() -> Self {
        Self::with_config(test_config())
    }

    /// A host with explicit settings.
    pub fn with_config(config: EngineConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = Engine::with_backend(open_backend(dir.path()), config);
        Self { engine, dir }
    }

    /// A second host on the same store: an engine of its own (its own host id), as another
    /// process would have — with a backend of its own too where the backend installed
    /// [`install_open_again`].
    pub fn second_host(&self, config: EngineConfig) -> Engine {
        let first = self.engine.store().backend();
        let backend = match OPEN_AGAIN.get() {
            Some(open_again) => open_again(first),
            None => first.clone(),
        };
        Engine::with_backend(backend, config)
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

/// Waits until job `id` is terminal and returns it.
pub async fn until_terminal(env: &Env, id: &str) -> Job {
    let (env2, id) = (env.clone(), id.to_owned());
    wait_for(env.engine(), "a job reaching a terminal status", move || {
        let (env, id) = (env2.clone(), id.clone());
        async move { Ok(Some(env.job(&id).await?).filter(|j| j.status.is_terminal())) }
    })
    .await
    .expect("wait for a terminal job")
}

/// Waits until job `id` has `status`.
pub async fn until_status(env: &Env, id: &str, status: JobStatus) -> Job {
    let (env2, id) = (env.clone(), id.to_owned());
    wait_for(env.engine(), "a job reaching a status", move || {
        let (env, id) = (env2.clone(), id.clone());
        async move { Ok(Some(env.job(&id).await?).filter(|j| j.status == status)) }
    })
    .await
    .expect("wait for a job status")
}

/// How long, in wall-clock time, a case may wait for something to happen.
const REAL_DEADLINE: Duration = Duration::from_secs(120);

/// Ends the test process if the wait it guards has not ended within [`REAL_DEADLINE`] of wall
/// time, so a case that would wait forever fails instead of hanging the suite. Wall time, not
/// tokio's: many cases run on a paused clock, where a tokio timeout fires whenever the
/// runtime idles while a backend thread works.
pub struct Deadline {
    // Dropped with the guard, which tells the watching thread the wait ended.
    _ended: std::sync::mpsc::Sender<()>,
}

impl Deadline {
    /// Starts the deadline for `what`; dropping the guard ends it.
    pub fn new(what: &'static str) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(REAL_DEADLINE) {
                // Straight to the process's stderr: the test harness captures `eprintln!`,
                // and its capture is lost with the abort.
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "conformance: {what} did not happen within {REAL_DEADLINE:?}; aborting the test process"
                );
                std::process::abort();
            }
        });
        Self { _ended: tx }
    }
}

/// [`Engine::wait_for`] under a [`Deadline`] naming `what`: every wait of the suite goes
/// through here.
pub async fn wait_for<T, F, Fut>(engine: &Engine, what: &'static str, check: F) -> crate::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<Option<T>>>,
{
    let _deadline = Deadline::new(what);
    engine.wait_for(check).await
}

/// Every event of the environment, oldest first.
pub async fn all_events(env: &Env) -> Vec<Event> {
    env.events(0, u32::MAX).await.expect("events")
}

/// The events of `topic` about `job_id`.
pub async fn events_of(env: &Env, job_id: &str, topic: &str) -> Vec<Event> {
    env.job_events(job_id).await.expect("job events").into_iter().filter(|e| e.topic == topic).collect()
}

/// Expands to one test per case of the suite, each on a fresh store opened by `$open` (an
/// [`Open`] function). See the module documentation.
#[macro_export]
macro_rules! conformance_suite {
    ($open:path, open_again = $again:path) => {
        fn __install_open_again() {
            $crate::conformance::install_open_again($again);
        }
        $crate::conformance_suite!(@cases $open, __install_open_again);
    };
    ($open:path) => {
        fn __install_open_again() {}
        $crate::conformance_suite!(@cases $open, __install_open_again);
    };
    (@cases $open:path, $again:path) => {
        $crate::__conformance_case!(
            $open, $again,
            rules,
            every_call_from_every_status_is_allowed_or_refused_with_nothing_changed,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, refusals_say_what_and_why, [tokio::test]);
        $crate::__conformance_case!($open, $again, rules, create_writes_created_then_ready_or_only_created, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            ack_is_repeatable_and_updates_info_progress_and_estimate,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, retry_increments_attempt_and_outcome_ack_is_once, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            scheduled_and_waiting_jobs_start_when_their_condition_is_met,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, split_gives_parts_their_data_and_refuses_bad_splits, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            parts_completed_fires_once_with_counts_derived_from_the_parts,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            rules,
            many_parts_ending_at_the_same_moment_yield_exactly_one_parts_completed,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            rules,
            cancel_cascades_to_open_parts_and_suppresses_parts_completed,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, sequential_parts_run_strictly_one_after_another, [tokio::test]);
        $crate::__conformance_case!($open, $again, rules, seeds_scenario_with_native_listeners, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            seeds_scenario_with_failed_and_canceled_parts_fails_the_parent,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, a_failing_handler_is_retried_then_succeeds, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            exhausted_deliveries_are_dead_lettered_with_the_reason,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, a_retried_dead_letter_is_delivered_again_once, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            listings_filter_count_and_page_within_an_environment,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            rules,
            a_handler_that_outlives_its_lease_gets_the_event_again,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, a_panicking_handler_fails_only_its_delivery, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            events_stored_while_a_listener_is_down_are_delivered_when_it_returns,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, listeners_only_see_their_environment_and_their_filter, [tokio::test]);
        $crate::__conformance_case!($open, $again, rules, records_insert_in_bulk_page_stably_and_count_validity, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            record_updates_merge_values_replace_messages_and_derive_validity,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, record_deletion_is_all_or_none_and_keeps_pages_dense, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            a_record_id_marks_only_its_own_sheet_even_after_a_delete,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            rules,
            many_marks_at_once_reach_only_their_sheets_records,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, rules, a_page_handed_row_by_row_is_the_page_read_whole, [tokio::test]);
        $crate::__conformance_case!($open, $again, rules, nothing_crosses_environments, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            watchdog_fails_unacked_and_stale_jobs_and_promotes_scheduled_ones,
            [tokio::test(start_paused = true)]
        );
        $crate::__conformance_case!(
            $open, $again,
            rules,
            a_split_parent_is_not_stale_while_parts_run_and_abandoned_parts_still_complete_it,
            [tokio::test(start_paused = true)]
        );
        $crate::__conformance_case!(
            $open, $again,
            rules,
            the_background_watchdog_runs_without_being_called,
            [tokio::test(start_paused = true)]
        );
        $crate::__conformance_case!(
            $open, $again,
            rules,
            watchdogs_of_many_hosts_sweeping_at_once_change_each_job_once,
            [tokio::test(start_paused = true)]
        );
        $crate::__conformance_case!($open, $again, rules, secrets_are_scoped_to_their_environment_and_validated, [tokio::test]);
        $crate::__conformance_case!($open, $again, rules, secrets_are_sealed_at_rest_and_open_only_with_their_key, [tokio::test]);
        $crate::__conformance_case!($open, $again, rules, retention_deletes_old_history_and_keeps_what_is_still_in_use, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            rules,
            a_native_listener_that_retriggers_itself_is_stopped_by_the_loop_guard,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            generated,
            generated_call_sequences_leave_the_store_and_its_events_as_the_model_says,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            generated,
            generated_records_come_back_from_the_store_as_written,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            generated,
            generated_job_listings_return_every_match_across_their_pages,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            rules,
            a_waiting_job_says_what_it_waits_for_and_a_retry_shows_its_next_attempt,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            rules,
            an_event_budget_refuses_the_call_that_would_pass_it_and_that_call_writes_nothing,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            a_refused_write_keeps_nothing_and_leaves_the_writes_beside_it,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            a_refused_write_among_many_leaves_each_other_applied_once,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            a_chain_counts_only_the_charges_that_were_kept,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            a_job_read_in_a_write_is_the_stored_job_after_updates_and_refusals,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            part_counts_read_in_a_write_follow_every_kept_change,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            a_retryable_failure_runs_the_write_again_and_applies_it_once,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, primitives, a_write_is_answered_by_its_last_run, [tokio::test]);
        $crate::__conformance_case!($open, $again, primitives, leases_are_fenced_by_owner_and_attempt, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            an_expired_lease_is_due_again_and_its_old_holder_is_refused,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            a_released_delivery_is_due_at_once_without_spending_an_attempt,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, primitives, dead_letters_keep_their_reason, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            the_subscriptions_version_changes_with_every_change_and_never_repeats,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, primitives, hosts_register_heartbeat_and_leave, [tokio::test]);
        $crate::__conformance_case!($open, $again, primitives, reclaiming_spares_the_leases_of_live_hosts, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            a_job_read_for_update_is_the_stored_job_and_parts_come_by_index,
            [tokio::test]
        );
        $crate::__conformance_case!(
            $open, $again,
            concurrency,
            racing_parts_of_many_parents_fire_parts_completed_exactly_once_each,
            [tokio::test(flavor = "multi_thread", worker_threads = 4)]
        );
        $crate::__conformance_case!(
            $open, $again,
            concurrency,
            two_hosts_never_handle_one_delivery_at_once,
            [tokio::test(flavor = "multi_thread", worker_threads = 4)]
        );
        $crate::__conformance_case!(
            $open, $again,
            concurrency,
            hosts_asking_for_one_named_environment_at_once_get_the_same_one,
            [tokio::test(flavor = "multi_thread", worker_threads = 4)]
        );
        $crate::__conformance_case!(
            $open, $again,
            concurrency,
            a_lease_stolen_after_expiry_refuses_the_late_answer,
            [tokio::test(flavor = "multi_thread", worker_threads = 4)]
        );
        $crate::__conformance_case!(
            $open, $again,
            concurrency,
            routing_sees_subscriptions_written_by_another_host,
            [tokio::test(flavor = "multi_thread", worker_threads = 4)]
        );
        $crate::__conformance_case!(
            $open, $again,
            concurrency,
            the_leases_of_a_host_that_stopped_heartbeating_are_handed_out_again,
            [tokio::test(flavor = "multi_thread", worker_threads = 4)]
        );
        $crate::__conformance_case!(
            $open, $again,
            primitives,
            routing_forgets_a_subscription_whose_write_was_rolled_back,
            [tokio::test]
        );
        $crate::__conformance_case!($open, $again, primitives, a_leased_delivery_carries_its_event_as_stored, [tokio::test]);
        $crate::__conformance_case!($open, $again, primitives, a_delivery_whose_event_was_deleted_is_not_due, [tokio::test]);
        $crate::__conformance_case!($open, $again, primitives, every_delivery_of_an_event_carries_it_each_time_it_is_due, [tokio::test]);
        $crate::__conformance_case!(
            $open, $again,
            concurrency,
            a_starting_host_never_takes_the_leases_of_a_live_host,
            [tokio::test(flavor = "multi_thread", worker_threads = 4)]
        );
        $crate::__conformance_case!(
            $open, $again,
            concurrency,
            a_stopping_host_keeps_its_leases_until_its_handlers_have_answered,
            [tokio::test(flavor = "multi_thread", worker_threads = 4)]
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_case {
    ($open:path, $again:path, $module:ident, $name:ident, [$($attr:tt)*]) => {
        #[$($attr)*]
        async fn $name() {
            $crate::conformance::install($open);
            $again();
            $crate::conformance::$module::$name().await;
        }
    };
}
