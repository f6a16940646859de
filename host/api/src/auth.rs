//! Bearer tokens.
//!
//! `Authorization: Bearer <token>` on every route but `/healthz`, `/readyz`, `/metrics` and
//! `/openapi.json`. An environment token (created by the admin, stored only as its SHA-256)
//! makes a request act in that environment — [`Tenant`] hands the handler an
//! [`Env`], so a handler cannot reach another environment by construction, and
//! another environment's ids are answered 404 by the engine. The admin token (from
//! `JOBHOST_ADMIN_TOKEN` or the config file) is accepted only by the admin routes ([`Admin`]).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::ApiState;
use super::error::ApiError;
use crate::model::ApiToken;
use jobhost_engine::{Env, token_hash};

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <token>`"))?;
    let text = header.to_str().map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
    text.strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))
}

/// A request made with an environment token: the API of that environment.
#[derive(Debug)]
pub struct Tenant {
    /// The environment's API, acting as `token:<id>`.
    pub env: Env,
    /// The token that was used.
    pub token: ApiToken,
}

impl FromRequestParts<ApiState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?;
        let record =
            state.engine.token(token).await?.ok_or_else(|| {
                ApiError::unauthorized("the token is not valid (revoked, mistyped, or an admin token)")
            })?;
        let env = state.engine.env(record.environment_id.clone()).as_actor(format!("token:{}", record.id));
        Ok(Self { env, token: record })
    }
}

/// A request made with the admin token.
#[derive(Debug)]
pub struct Admin;

impl FromRequestParts<ApiState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?;
        let Some(admin) = &state.admin_token else {
            return Err(ApiError::unauthorized("no admin token is configured on this host (JOBHOST_ADMIN_TOKEN)"));
        };
        // Compared as hashes: the comparison's time does not depend on how much of it matched.
        if token_hash(token) != token_hash(admin) {
            return Err(ApiError::unauthorized("this route needs the admin token"));
        }
        Ok(Admin)
    }
}
