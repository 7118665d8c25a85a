//! Optional API key: `Authorization: Bearer KEY` on the `/v1` routes.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The key clients must present.
#[derive(Clone)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// Wraps `key`.
    pub fn new(key: &str) -> Self {
        Self(Arc::from(key))
    }
}

/// Middleware: answers 401 unless the request carries the key.
pub async fn require_api_key(State(key): State<ApiKey>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => {
            ApiError::Unauthorized("no API key was given: send it as `Authorization: Bearer KEY`")
                .into_response()
        }
        Some(given) if !same_secret(given.as_bytes(), key.0.as_bytes()) => {
            ApiError::Unauthorized("incorrect API key").into_response()
        }
        Some(_) => next.run(request).await,
    }
}

/// Compares without stopping at the first difference, so that timing does not tell how much
/// of a guess was right.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let differences = given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    differences == 0 && given.len() == expected.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(same_secret(b"sk-1", b"sk-1"));
        assert!(!same_secret(b"sk-1", b"sk-2"));
        assert!(!same_secret(b"sk-1", b"sk-10"));
        assert!(!same_secret(b"", b"sk"));
    }
}
