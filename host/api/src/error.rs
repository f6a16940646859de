//! Errors as JSON: `{"error": {"code": "not-found", "message": "…"}}`, with the status the
//! error's kind means. Extractors that fail (bad JSON, a body too large, a bad query) answer in
//! the same shape.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use jobhost_engine::error::{Error, ErrorKind};

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable code (`not-found`, `conflict`, `invalid`, `unauthorized`, …).
    pub code: &'static str,
    /// What was refused and why.
    pub message: String,
}

/// The body of every error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable code to switch on.
    pub code: String,
    /// What was refused and why.
    pub message: String,
}

impl ApiError {
    /// A 401: no token, or a token that is not valid here.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self { status: StatusCode::UNAUTHORIZED, code: "unauthorized", message: message.into() }
    }

    /// A 404 naming what was not found.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, code: "not-found", message: message.into() }
    }

    /// A 400.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, code: "invalid", message: message.into() }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, code) = match e.kind() {
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not-found"),
            ErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorKind::Invalid => (StatusCode::BAD_REQUEST, "invalid"),
            ErrorKind::Denied => (StatusCode::FORBIDDEN, "denied"),
            ErrorKind::Limit => (StatusCode::UNPROCESSABLE_ENTITY, "limit"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "request failed");
        }
        Self { status, code, message: e.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { code: self.code.to_owned(), message: self.message } };
        (self.status, axum::Json(body)).into_response()
    }
}

fn rejection(status: StatusCode, text: String) -> ApiError {
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too-large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported-media-type",
        _ => "invalid",
    };
    ApiError { status, code, message: text }
}

/// A JSON body; a malformed or oversized one is answered as an [`ApiError`].
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(e) => {
                let e: JsonRejection = e;
                Err(rejection(e.status(), e.body_text()))
            }
        }
    }
}

/// A JSON body that must be an object. serde would also read a struct from an array of its
/// fields in order (`[null, null]`), which no client means and the OpenAPI document forbids.
#[derive(Debug)]
pub struct JsonObject<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonObject<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<serde_json::Value>::from_request(req, state).await?;
        if !value.is_object() {
            return Err(rejection(StatusCode::UNPROCESSABLE_ENTITY, "the body must be a JSON object".into()));
        }
        serde_json::from_value(value).map(Self).map_err(|e| {
            rejection(StatusCode::UNPROCESSABLE_ENTITY, format!("Failed to deserialize the JSON body: {e}"))
        })
    }
}

/// A query string; a malformed one is answered as an [`ApiError`].
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(e) => {
                let e: QueryRejection = e;
                Err(rejection(StatusCode::BAD_REQUEST, e.body_text()))
            }
        }
    }
}

/// Path parameters; a malformed one is answered as an [`ApiError`].
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Self(v)),
            Err(e) => {
                let e: PathRejection = e;
                Err(rejection(StatusCode::BAD_REQUEST, e.body_text()))
            }
        }
    }
}
