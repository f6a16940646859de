//! The HTTP API: JSON over axum, shaped after Flatfile's routes, secured per environment.
//!
//! - [`router`] builds the routes over an [`ApiState`]; [`serve`] runs them until a shutdown
//!   signal, finishing requests in flight.
//! - [`auth`]: bearer tokens. An environment token reaches only its environment (anything else
//!   is answered 404, so ids do not leak); the admin token manages environments and tokens.
//! - [`error`]: every error is `{"error": {"code", "message"}}` with the status its kind means.
//! - [`routes`]: the handlers, one per route, each a thin call into [`Env`](jobhost_engine::Env).
//! - [`console`]: the operator console (HTML pages under `/console`, signed in with a token).
//! - [`openapi`]: the OpenAPI document, generated from the handlers' annotations and the
//!   model's schemas, served at `/openapi.json`.

pub mod auth;
pub mod console;
pub mod error;
pub mod openapi;
pub mod plugins;
pub mod routes;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use jobhost_engine::Engine;

// The crates this one sits on, under the names the handlers use.
pub(crate) use jobhost_engine::{ErrorKind, filter, model};
pub(crate) use jobhost_registry as reload;
pub(crate) use jobhost_runtime as runtime;

/// Bytes of a JSON request body, at most. Bulk record imports are sent in pages under this.
pub const MAX_BODY: usize = 32 << 20;

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    /// The engine.
    pub engine: Engine,
    /// The admin token, when one is configured; without it the admin routes answer 401.
    pub admin_token: Option<Arc<str>>,
    /// Plugins per environment; `None` on a host that runs no plugins.
    pub plugins: Option<Arc<plugins::Plugins>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").field("admin_token", &self.admin_token.as_ref().map(|_| "…")).finish()
    }
}

/// All routes.
pub fn router(state: ApiState) -> Router {
    use routes::*;
    let v1 = Router::new()
        .route("/environments", post(create_environment).get(list_environments))
        .route("/environments/{id}/tokens", post(create_token).get(list_tokens))
        .route("/environments/{id}/tokens/{token_id}", axum::routing::delete(revoke_token))
        .route("/sheets", post(create_sheet))
        .route("/sheets/{id}", get(get_sheet))
        .route("/sheets/{id}/counts", get(sheet_counts))
        .route(
            "/sheets/{id}/records",
            get(list_records).post(insert_records).patch(update_records).delete(delete_records),
        )
        .route("/jobs", post(create_job).get(list_jobs))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/waiting", get(job_waiting))
        .route("/jobs/{id}/execute", post(execute_job))
        .route("/jobs/{id}/ack", post(ack_job))
        .route("/jobs/{id}/complete", post(complete_job))
        .route("/jobs/{id}/fail", post(fail_job))
        .route("/jobs/{id}/cancel", post(cancel_job))
        .route("/jobs/{id}/retry", post(retry_job))
        .route("/jobs/{id}/split", post(split_job))
        .route("/jobs/{id}/outcome/acknowledge", post(acknowledge_outcome))
        .route("/events", get(list_events))
        .route("/events/stream", get(stream_events))
        .route("/executions", get(list_executions))
        .route("/dead-letters", get(list_dead_letters))
        .route("/dead-letters/{id}/retry", post(retry_dead_letter))
        .route("/plugins", get(list_plugins))
        .route("/plugins/{name}", axum::routing::put(deploy_plugin).delete(delete_plugin))
        .route("/plugins/{name}/rollback", post(rollback_plugin));
    Router::new()
        .nest("/v1", v1)
        .nest_service("/console", console::router(state.clone()))
        .route("/", get(|| async { axum::response::Redirect::to("/console/") }))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves; requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
