//! The encoder task routes, shaped like the Hugging Face Inference API
//! (`{"inputs": ..., "parameters": {...}}`) and answering with the outputs of the transformers
//! pipeline of the same task: `/v1/classify`, `/v1/token-classify`, `/v1/question-answering`,
//! `/v1/fill-mask`.

use candlewick_engine::encoder::EncoderInput;
use candlewick_scheduler::{EncodedSequence, EncoderScheduler, SchedulerError};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// A task request: the inputs, the pipeline's parameters, and optionally the model's name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// The pipeline's inputs (a text, a list of texts, a question and context, ...).
    pub inputs: Value,
    /// The pipeline's parameters; absent means the defaults.
    #[serde(default)]
    pub parameters: Option<Value>,
    /// The served model's name; optional, as the Inference API has the model in the URL.
    #[serde(default)]
    pub model: Option<String>,
    /// Accepted for compatibility with Inference API clients; has no effect here.
    #[serde(default)]
    pub options: Option<Value>,
}

/// Runs `inputs` through the encoder thread and waits for their outputs. Errors about a
/// sequence's length name `param`.
pub async fn run_encoder(
    scheduler: &EncoderScheduler,
    inputs: Vec<EncoderInput>,
    param: &'static str,
) -> Result<Vec<EncodedSequence>, ApiError> {
    let count = inputs.len();
    let receiver = scheduler
        .submit(inputs)
        .map_err(|source| ApiError::Scheduler {
            source,
            prompt_param: param,
        })?;
    let outputs = receiver
        .await
        .map_err(|_| ApiError::Scheduler {
            source: SchedulerError::Stopped,
            prompt_param: param,
        })?
        .map_err(|source| ApiError::GenerationFailed(source.to_string()))?;
    if outputs.len() != count {
        return Err(ApiError::Internal(format!(
            "the encoder returned {} outputs for {count} inputs",
            outputs.len()
        )));
    }
    Ok(outputs)
}
