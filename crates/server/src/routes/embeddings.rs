//! `POST /v1/embeddings`: OpenAI's embeddings over an encoder's base model.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use candlewick_engine::encoder::EncoderInput;
use candlewick_scheduler::EncodedSequence;

use super::JsonBody;
use crate::api::completions::PromptInput;
use crate::api::embeddings::{
    Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, EmbeddingVector, EncodingFormat,
};
use crate::error::ApiError;
use crate::generation::blocking;
use crate::routes::encoders::run_encoder;
use crate::state::{AppState, Pooling};

/// Embeds each input, pooled as the server was configured.
pub async fn create(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<EmbeddingRequest>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    state.check_model(&request.model)?;
    let scheduler = state.encoder("feature-extraction")?;
    let plan = request.validate(scheduler.info().hidden_size)?;
    let pooling = state.pooling().unwrap_or_default();
    let tokenizer = state.tokenizer.shared();
    let vocab_size = state.tokenizer.vocab_size();
    let inputs = blocking(move || {
        plan.inputs
            .into_iter()
            .map(|input| {
                let ids = match input {
                    PromptInput::Text(text) => tokenizer
                        .encode(text, true)
                        .map_err(|e| ApiError::invalid("input", e.to_string()))?
                        .get_ids()
                        .to_vec(),
                    PromptInput::Tokens(ids) => ids,
                };
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                    return Err(ApiError::invalid(
                        "input",
                        format!("token id {bad} is out of range for a vocabulary of {vocab_size}"),
                    ));
                }
                let type_ids = vec![0; ids.len()];
                Ok(EncoderInput { ids, type_ids })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let prompt_tokens = inputs.iter().map(|input| input.ids.len()).sum();
    let outputs = run_encoder(scheduler, inputs, "input").await?;
    let data = outputs
        .into_iter()
        .enumerate()
        .map(|(index, output)| {
            let vector = pool(output, pooling)?;
            let embedding = match plan.format {
                EncodingFormat::Float => EmbeddingVector::Float(vector),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                    EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            Ok(Embedding {
                object: "embedding",
                index,
                embedding,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Json(EmbeddingResponse {
        object: "list",
        data,
        model: state.model_name.clone(),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    }))
}

/// One vector from a sequence's hidden states.
pub fn pool(output: EncodedSequence, pooling: Pooling) -> Result<Vec<f32>, ApiError> {
    let EncodedSequence::Hidden { last, pooled } = output else {
        return Err(ApiError::Internal(
            "the encoder returned no hidden states".into(),
        ));
    };
    match pooling {
        Pooling::Mean => {
            let width = last.first().map_or(0, Vec::len);
            let mut sum = vec![0f32; width];
            for row in &last {
                for (s, v) in sum.iter_mut().zip(row) {
                    *s += v;
                }
            }
            let count = last.len().max(1) as f32;
            Ok(sum.into_iter().map(|s| s / count).collect())
        }
        Pooling::Cls => last
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::Internal("an empty sequence has no first token".into())),
        Pooling::Pooler => {
            pooled.ok_or_else(|| ApiError::Internal("this model has no pooler".into()))
        }
    }
}
