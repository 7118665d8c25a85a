//! The one place where failures become HTTP statuses and OpenAI's error envelope
//! `{"error": {"message", "type", "param", "code"}}`.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use candlewick_engine::sampling::SamplingError;
use candlewick_engine::EngineError;
use candlewick_scheduler::SchedulerError;
use schemars::JsonSchema;
use serde::Serialize;

use crate::chat_template::ChatTemplateError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not the JSON this route takes (serde's message).
    #[error("{0}")]
    MalformedRequest(String),

    /// A parameter is present but out of range, or not supported.
    #[error("{message}")]
    InvalidParameter {
        /// The request field at fault.
        param: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },

    /// The request names a model this server does not serve.
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),

    /// `Authorization: Bearer KEY` is missing or wrong.
    #[error("{0}")]
    Unauthorized(&'static str),

    /// The served model's head does another task than the route's.
    #[error(
        "the model `{model}` ({architecture}) does {task}; this route needs a model for {wanted}"
    )]
    WrongTask {
        /// The served model's name.
        model: String,
        /// Its architecture.
        architecture: String,
        /// What it does.
        task: &'static str,
        /// What the route needs.
        wanted: &'static str,
    },

    /// The body is larger than the configured limit.
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },

    /// No route has this path.
    #[error("no route for {0}")]
    RouteNotFound(String),

    /// The path exists but not with this method.
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),

    /// The scheduler refused the request, or it failed after it was accepted (shared with the
    /// other requests of the failed step); `prompt_param` is the field that holds the prompt
    /// ("prompt", "messages", "input"), for errors about it.
    #[error("{source}")]
    Scheduler {
        /// Why it was refused or failed.
        source: Arc<SchedulerError>,
        /// The request field that holds the prompt.
        prompt_param: &'static str,
    },

    /// The chat template is missing, does not compile, or raised an exception.
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),

    /// The engine failed outside the scheduler (most often the tokenizer, on the prompt); the
    /// engine error says whose fault it is.
    #[error(transparent)]
    Engine(#[from] EngineError),

    /// The engine thread went away before the request finished.
    #[error("{0}")]
    GenerationFailed(String),

    /// A blocking task could not be run.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<SchedulerError> for ApiError {
    fn from(source: SchedulerError) -> Self {
        Arc::new(source).into()
    }
}

impl From<Arc<SchedulerError>> for ApiError {
    fn from(source: Arc<SchedulerError>) -> Self {
        Self::Scheduler {
            source,
            prompt_param: "prompt",
        }
    }
}

impl ApiError {
    /// A refused parameter.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            param,
            message: message.into(),
        }
    }

    /// A scheduler error about the field `prompt_param`.
    pub fn scheduler(source: impl Into<Arc<SchedulerError>>, prompt_param: &'static str) -> Self {
        Self::Scheduler {
            source: source.into(),
            prompt_param,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedRequest(_) | Self::InvalidParameter { .. } | Self::WrongTask { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Scheduler { source, .. } => match &**source {
                SchedulerError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
                SchedulerError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
                SchedulerError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                error => fault_status(error.is_request_fault()),
            },
            Self::Engine(error) => fault_status(error.is_request_fault()),
            Self::ChatTemplate(error) => match error {
                ChatTemplateError::Missing | ChatTemplateError::Raised(_) => {
                    StatusCode::BAD_REQUEST
                }
                ChatTemplateError::Invalid(_) | ChatTemplateError::Render(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            Self::GenerationFailed(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The request field at fault, when one is.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Self::InvalidParameter { param, .. } => Some(param),
            Self::ModelNotFound(_) | Self::WrongTask { .. } => Some("model"),
            Self::Scheduler {
                source,
                prompt_param,
            } => match &**source {
                SchedulerError::PromptTooLong { .. } => Some(prompt_param),
                SchedulerError::Engine(error) if error.is_request_fault() => Some(prompt_param),
                SchedulerError::TotalTooLong { .. } => Some("max_tokens"),
                SchedulerError::Sampling(SamplingError::InvalidParameter { name, .. }) => {
                    Some(name)
                }
                SchedulerError::Sampling(SamplingError::TokenOutOfVocabulary { .. }) => {
                    Some("logit_bias")
                }
                SchedulerError::InvalidRequest(_) => Some(prompt_param),
                _ => None,
            },
            Self::ChatTemplate(ChatTemplateError::Missing | ChatTemplateError::Raised(_)) => {
                Some("messages")
            }
            _ => None,
        }
    }

    /// OpenAI's machine-readable code, when there is one.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::ModelNotFound(_) => Some("model_not_found"),
            Self::WrongTask { .. } => Some("unsupported_task"),
            Self::Unauthorized(_) => Some("invalid_api_key"),
            Self::BodyTooLarge { .. } => Some("request_too_large"),
            Self::Scheduler { source, .. } => match &**source {
                SchedulerError::PromptTooLong { .. }
                | SchedulerError::TotalTooLong { .. }
                | SchedulerError::Engine(EngineError::ContextOverflow { .. }) => {
                    Some("context_length_exceeded")
                }
                SchedulerError::Timeout { .. } => Some("timeout"),
                SchedulerError::QueueFull { .. } => Some("rate_limit_exceeded"),
                SchedulerError::Stopped => Some("server_shutting_down"),
                _ => None,
            },
            _ => None,
        }
    }

    /// The error envelope as JSON, for responses and for an SSE data line.
    pub fn envelope(&self) -> ErrorEnvelope {
        let status = self.status();
        ErrorEnvelope {
            error: ErrorBody {
                message: self.to_string(),
                kind: if status.is_server_error() {
                    "server_error"
                } else {
                    "invalid_request_error"
                },
                param: self.param(),
                code: self.code(),
            },
        }
    }
}

/// 400 for what the request is at fault for, 500 for the server's failures.
fn fault_status(request_fault: bool) -> StatusCode {
    if request_fault {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

/// `{"error": {...}}`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorEnvelope {
    /// The error.
    pub error: ErrorBody,
}

/// The fields of OpenAI's error object.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub message: String,
    /// "invalid_request_error" (4xx) or "server_error" (5xx).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, or null.
    pub param: Option<&'static str>,
    /// A machine-readable code, or null.
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request refused");
        }
        (status, axum::Json(self.envelope())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::to_bytes;
    use serde_json::Value;

    async fn body_of(error: ApiError) -> (StatusCode, Value) {
        let response = error.into_response();
        let status = response.status();
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn error_response_is_openais_envelope() {
        let (status, body) = body_of(ApiError::ModelNotFound("gpt-9".into())).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "message": "The model `gpt-9` does not exist",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }})
        );
    }

    #[test]
    fn every_scheduler_error_maps_to_its_status_type_and_code() {
        let engine = || EngineError::Internal("boom".into());
        // (error, status, type, param, code)
        type Case = (
            SchedulerError,
            u16,
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                SchedulerError::InvalidRequest("the prompt is empty".into()),
                400,
                "invalid_request_error",
                Some("prompt"),
                None,
            ),
            (
                SchedulerError::PromptTooLong {
                    tokens: 600,
                    max: 512,
                },
                400,
                "invalid_request_error",
                Some("prompt"),
                Some("context_length_exceeded"),
            ),
            (
                SchedulerError::TotalTooLong {
                    prompt: 500,
                    max_new_tokens: 20,
                    max: 512,
                },
                400,
                "invalid_request_error",
                Some("max_tokens"),
                Some("context_length_exceeded"),
            ),
            (
                SchedulerError::QueueFull { max_waiting: 64 },
                429,
                "invalid_request_error",
                None,
                Some("rate_limit_exceeded"),
            ),
            (
                SchedulerError::Stopped,
                503,
                "server_error",
                None,
                Some("server_shutting_down"),
            ),
            (
                SchedulerError::Engine(engine()),
                500,
                "server_error",
                None,
                None,
            ),
            (
                SchedulerError::Engine(EngineError::InvalidRequest("token id 9 is out".into())),
                400,
                "invalid_request_error",
                Some("prompt"),
                None,
            ),
            (
                SchedulerError::Engine(EngineError::ContextOverflow {
                    tokens: 600,
                    max_context: 512,
                }),
                400,
                "invalid_request_error",
                Some("prompt"),
                Some("context_length_exceeded"),
            ),
            (
                SchedulerError::Engine(EngineError::NoFreeSlot { slots: 4 }),
                500,
                "server_error",
                None,
                None,
            ),
            (
                SchedulerError::Timeout {
                    limit: std::time::Duration::from_secs(600),
                },
                504,
                "server_error",
                None,
                Some("timeout"),
            ),
            (
                SchedulerError::Sampling(SamplingError::AllTokensMasked),
                500,
                "server_error",
                None,
                None,
            ),
            (
                SchedulerError::Sampling(SamplingError::InvalidParameter {
                    name: "top_p",
                    allowed: "in (0, 1]",
                    value: "1.5".into(),
                }),
                400,
                "invalid_request_error",
                Some("top_p"),
                None,
            ),
            (
                SchedulerError::Sampling(SamplingError::TokenOutOfVocabulary {
                    token: 5000,
                    vocab_size: 1024,
                }),
                400,
                "invalid_request_error",
                Some("logit_bias"),
                None,
            ),
        ];
        for (source, status, kind, param, code) in cases {
            let message = source.to_string();
            let error = ApiError::from(source);
            assert_eq!(error.status().as_u16(), status, "{message}");
            let envelope = error.envelope();
            assert_eq!(envelope.error.message, message);
            assert_eq!(envelope.error.kind, kind, "{message}");
            assert_eq!(envelope.error.param, param, "{message}");
            assert_eq!(envelope.error.code, code, "{message}");
        }
    }

    #[test]
    fn prompt_too_long_names_both_numbers_and_the_chat_field() {
        let error = ApiError::scheduler(
            SchedulerError::PromptTooLong {
                tokens: 600,
                max: 512,
            },
            "messages",
        );
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error.param(), Some("messages"));
        let message = error.to_string();
        assert!(
            message.contains("600") && message.contains("512"),
            "{message}"
        );
    }

    #[test]
    fn engine_errors_outside_the_scheduler_are_4xx_when_the_request_is_at_fault() {
        let tokenizer = ApiError::from(EngineError::Tokenizer("no token for 'x'".into()));
        assert_eq!(tokenizer.status(), StatusCode::BAD_REQUEST);
        assert_eq!(tokenizer.envelope().error.kind, "invalid_request_error");
        let missing = ApiError::from(EngineError::MissingFile {
            file: "tokenizer.json".into(),
            location: "/models".into(),
        });
        assert_eq!(missing.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(missing.envelope().error.kind, "server_error");
    }
}
