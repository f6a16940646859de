//! Errors of the engine API.
//!
//! Every refused call returns an [`Error`] that says what was refused and why, and changes
//! nothing (each call runs in its own savepoint). [`Error::kind`] is the stable classification
//! a listener (and later the WIT contract) switches on.
//!
//! A store failure keeps its cause ([`StoreError`]): what was being done, the backend's own
//! error as the `source`, and whether running the write again may succeed (a serialization
//! failure, a deadlock, a busy database) — the engine retries those, callers never see them.

use std::fmt;
use std::sync::Arc;

use crate::model::JobStatus;

/// The stable class of an error; what a caller should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The resource does not exist in this environment (or belongs to another one).
    NotFound,
    /// The resource is in a state that refuses the call (e.g. completing a complete job).
    Conflict,
    /// The input is malformed or out of range.
    Invalid,
    /// The caller may not do this.
    Denied,
    /// A configured limit was reached.
    Limit,
    /// The store failed; the call may be retried.
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "not-found",
            Self::Conflict => "conflict",
            Self::Invalid => "invalid",
            Self::Denied => "denied",
            Self::Limit => "limit",
            Self::Internal => "internal",
        })
    }
}

/// An engine error.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// `kind` `id` does not exist in the caller's environment.
    #[error("{kind} {id} not found")]
    NotFound {
        /// `job`, `sheet`, `record`, `environment`, …
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// A job call made in a status that does not allow it.
    #[error("job {id} is {status}; {call} needs {needs}")]
    WrongStatus {
        /// The job.
        id: String,
        /// Its current status.
        status: JobStatus,
        /// The refused call.
        call: &'static str,
        /// What the call needs, in words.
        needs: &'static str,
    },
    /// Another state conflict, described.
    #[error("{0}")]
    Conflict(String),
    /// Malformed input, described.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A limit, described.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A failure of the store, with its cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("store error: {context}")]
pub struct StoreError {
    /// What the store was doing, in words.
    pub context: String,
    /// True when running the same write again may succeed (serialization failure, deadlock,
    /// a busy database): the engine retries these.
    pub retryable: bool,
    /// The backend's own error.
    #[source]
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl StoreError {
    /// A store failure described in words, with no underlying error.
    pub fn new(context: impl Into<String>) -> Self {
        Self { context: context.into(), retryable: false, source: None }
    }

    /// A failure caused by the backend's `source`; its message becomes part of the context.
    pub fn caused_by(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        let context = context.into();
        let context = if context.is_empty() { source.to_string() } else { format!("{context}: {source}") };
        Self { context, retryable: false, source: Some(Arc::new(source)) }
    }

    /// Marks the failure as one a new attempt of the same write may not meet.
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }
}

impl PartialEq for StoreError {
    fn eq(&self, other: &Self) -> bool {
        self.context == other.context && self.retryable == other.retryable
    }
}

impl Error {
    /// `kind id not found`.
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound { kind, id: id.into() }
    }

    /// Malformed input.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    /// The stable class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::WrongStatus { .. } | Self::Conflict(_) => ErrorKind::Conflict,
            Self::Invalid(_) => ErrorKind::Invalid,
            Self::Limit(_) => ErrorKind::Limit,
            Self::Store(_) => ErrorKind::Internal,
        }
    }

    /// A store failure described in words.
    pub fn store(context: impl Into<String>) -> Self {
        Self::Store(StoreError::new(context))
    }

    /// True for a store failure that running the write again may not meet.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Store(e) if e.retryable)
    }

    /// True when a job call was refused because the job already ended — what a listener sees
    /// when an event is delivered a second time after its work was done.
    pub fn is_already_terminal(&self) -> bool {
        matches!(self, Self::WrongStatus { status, .. } if status.is_terminal())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Self::Store(StoreError::caused_by("stored JSON is unreadable", e))
    }
}

impl From<crate::model::UnknownValue> for Error {
    fn from(e: crate::model::UnknownValue) -> Self {
        Self::Invalid(e.0)
    }
}

/// Result of engine calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
