//! A test plugin that makes the outbound HTTP requests its job's input lists and reports what
//! each one did, so the tests can hold the host's grants, address checks and limits to account.
//!
//! On `job:ready` of `space:http`, for each entry of `input.requests`
//! (`{method?, url, body?, headers?, repeat?, follow?}`) it sends the request (`repeat` times,
//! default 1; with `follow`, one redirect is followed by a new request to its `Location`) and
//! completes the job with `{results: [{status?, bytes?, text?, header?, error?}]}` — one result
//! per request sent, stopping an entry at its first error.

use jobhost_plugin_sdk::jobs::{self, Outcome};
use jobhost_plugin_sdk::{Event, Listener, Result, Value, http, json};

fn one(entry: &Value, url: &str) -> std::result::Result<http::Response, String> {
    let method = entry["method"].as_str().unwrap_or("GET");
    let mut request = match method {
        "POST" => http::post(url),
        "PUT" => http::put(url),
        "DELETE" => http::delete(url),
        _ => http::get(url),
    };
    if let Some(headers) = entry["headers"].as_object() {
        for (k, v) in headers {
            request = request.header(k, v.as_str().unwrap_or_default());
        }
    }
    if let Some(body) = entry["body"].as_str() {
        request = request.body(body.as_bytes().to_vec());
    }
    if let Some(n) = entry["bodyBytes"].as_u64() {
        request = request.body(vec![b'x'; n as usize]);
    }
    request.send().map_err(|e| e.to_string())
}

fn run(event: &Event) -> Result<()> {
    let job = jobs::get(event.job_id()?)?;
    let input = job.input()?;
    let mut results = Vec::new();
    for entry in input["requests"].as_array().cloned().unwrap_or_default() {
        let url = entry["url"].as_str().unwrap_or_default().to_owned();
        for _ in 0..entry["repeat"].as_u64().unwrap_or(1) {
            let mut answer = one(&entry, &url);
            if entry["follow"].as_bool() == Some(true)
                && let Ok(r) = &answer
                && (300..400).contains(&r.status())
                && let Some(location) = r.header("location").map(str::to_owned)
            {
                results.push(json!({ "status": r.status(), "location": location }));
                answer = one(&json!({}), &location);
            }
            match answer {
                Ok(r) => {
                    let text = r.text();
                    results.push(json!({
                        "status": r.status(),
                        "bytes": r.bytes().len(),
                        "text": text.chars().take(200).collect::<String>(),
                        "header": r.header("x-test"),
                    }));
                }
                Err(e) => {
                    results.push(json!({ "error": e }));
                    break;
                }
            }
        }
    }
    jobs::complete(job.id(), Outcome { outcome: json!({ "results": results }), info: None })?;
    Ok(())
}

fn listener() -> Listener {
    Listener::new().filter(json!({ "job": "space:http" }), |l| l.on("job:ready", run))
}

jobhost_plugin_sdk::export!(listener);
