//! The HTTP surface: the router, its layers, and the JSON body extractor every POST route uses.

pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod encoders;
pub mod health;
pub mod models;
pub mod openapi;
pub mod tokenize;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::routing::{get, post};
use axum::{middleware, Extension, Router};
use serde::de::DeserializeOwned;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::auth::{require_api_key, ApiKey};
use crate::config::ConfigError;
use crate::error::ApiError;
use crate::state::Served;

/// What shapes the router besides the model.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterOptions {
    /// When set, `/v1` routes require `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Larger bodies are answered with 413.
    pub max_body_bytes: usize,
    /// Origins allowed by CORS; `*` allows any. Empty: no CORS headers.
    pub cors_allow_origins: Vec<String>,
}

/// The body limit, for the 413 message.
#[derive(Debug, Clone, Copy)]
struct BodyLimit(usize);

/// Builds the router: `/v1`, `/tokenize` and `/detokenize` (behind the API key when one is
/// set), `/health`, `/ready` and `/metrics`, with request metrics, logs, the body limit and CORS.
pub fn router(served: impl Into<Served>, options: &RouterOptions) -> Result<Router, ConfigError> {
    let state = Arc::new(served.into());
    let mut v1 = Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/classify", post(encoders::classify))
        .route("/v1/token-classify", post(encoders::token_classify))
        .route("/v1/question-answering", post(encoders::question_answering))
        .route("/v1/fill-mask", post(encoders::fill_mask))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*model}", get(models::retrieve))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize));
    if let Some(key) = &options.api_key {
        v1 = v1.route_layer(middleware::from_fn_with_state(
            ApiKey::new(key),
            require_api_key,
        ));
    }
    let mut router = v1
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn(crate::metrics::track_requests))
        .layer(Extension(BodyLimit(options.max_body_bytes)))
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state);
    if !options.cors_allow_origins.is_empty() {
        router = router.layer(cors(&options.cors_allow_origins)?);
    }
    Ok(router)
}

fn cors(origins: &[String]) -> Result<CorsLayer, ConfigError> {
    let allow_origin = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|origin| {
                HeaderValue::from_str(origin)
                    .map_err(|_| ConfigError::InvalidOrigin(origin.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(values)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_string())
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// A JSON request body. Unlike axum's `Json`, every rejection (a body over the limit, bad
/// JSON, unknown fields) is answered with OpenAI's error envelope, and the content type is not
/// checked, as clients do not all set it.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let limit = request
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |limit| limit.0);
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::BodyTooLarge { limit }
                } else {
                    ApiError::MalformedRequest(rejection.body_text())
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|error| ApiError::MalformedRequest(error.to_string()))
    }
}
