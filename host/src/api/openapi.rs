//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the
//! model's `ToSchema` derives: the document and the behaviour come from the same code.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::routes;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("jh_…").build()),
        );
    }
}

/// jobhost's HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "jobhost", description = "Jobs, multi-part jobs, records and events, with sandboxed WebAssembly listeners."),
    modifiers(&Bearer),
    paths(
        routes::healthz, routes::readyz, routes::metrics,
        routes::create_environment, routes::list_environments, routes::create_token, routes::list_tokens, routes::revoke_token,
        routes::create_sheet, routes::get_sheet, routes::sheet_counts, routes::list_records, routes::insert_records, routes::update_records,
        routes::create_job, routes::list_jobs, routes::get_job, routes::execute_job, routes::ack_job, routes::complete_job,
        routes::fail_job, routes::cancel_job, routes::retry_job, routes::split_job, routes::acknowledge_outcome,
        routes::list_events, routes::stream_events, routes::list_executions,
        routes::list_plugins, routes::deploy_plugin, routes::rollback_plugin, routes::delete_plugin,
    ),
    tags(
        (name = "jobs", description = "Jobs and their parts"),
        (name = "records", description = "Sheets and records"),
        (name = "events", description = "The event log, its live stream, and plugin execution records"),
        (name = "plugins", description = "The environment's plugins: deploy, roll back, delete"),
        (name = "admin", description = "Environments and tokens (admin token)"),
        (name = "health", description = "Liveness and readiness (no token)"),
    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn document() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
