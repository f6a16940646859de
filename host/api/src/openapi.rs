//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the
//! model's `ToSchema` derives: the document and the behaviour come from the same code.

use serde_json::{Value, json};
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
        routes::delete_records,
        routes::create_job, routes::list_jobs, routes::get_job, routes::job_waiting, routes::execute_job, routes::ack_job, routes::complete_job,
        routes::fail_job, routes::cancel_job, routes::retry_job, routes::split_job, routes::acknowledge_outcome,
        routes::list_events, routes::stream_events, routes::list_executions, routes::list_dead_letters, routes::retry_dead_letter,
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

/// The document as served: the generated one plus what every route of a kind shares, added
/// here once instead of on each handler (and checked against the server by schemathesis).
pub fn document_json() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let error = json!({ "description": "error", "content": { "application/json": {
        "schema": { "$ref": "#/components/schemas/ErrorBody" } } } });
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(ops) = item.as_object_mut() else { continue };
            for op in ops.values_mut() {
                let json_body = op["requestBody"]["content"].get("application/json").is_some();
                let plugin_name = path.starts_with("/v1/plugins/{name}");
                let Some(responses) = op["responses"].as_object_mut() else { continue };
                // Every JSON body can be malformed (400), too big (413), of another media
                // type (415) or of the wrong shape (422); a plugin name can be malformed (400).
                let shared: &[&str] = match (json_body, plugin_name) {
                    (true, _) => &["400", "413", "415", "422"],
                    (false, true) => &["400"],
                    _ => &[],
                };
                for status in shared {
                    responses.entry(*status).or_insert_with(|| error.clone());
                }
                if plugin_name && let Some(params) = op["parameters"].as_array_mut() {
                    for p in params.iter_mut().filter(|p| p["name"] == "name") {
                        p["schema"]["pattern"] = json!(super::plugins::NAME_PATTERN);
                    }
                }
            }
        }
    }
    // Field keys of a record are never empty (the derive has no way to say so of a map's keys).
    for schema in ["NewRecord", "RecordUpdate"] {
        if let Some(values) = doc["components"]["schemas"][schema]["properties"].get_mut("values") {
            values["propertyNames"] = json!({ "minLength": 1 });
        }
    }
    doc
}

/// `GET /openapi.json`.
pub async fn document() -> axum::Json<Value> {
    axum::Json(document_json())
}
