//! `POST /v1/embeddings`: OpenAI's embeddings over an encoder's base model.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use base64::Engine as _;
use candlewick_engine::{EncoderInput, EncoderOutput, Requested};

use super::JsonBody;
use crate::api::completions::PromptInput;
use crate::api::embeddings::{
    Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, EmbeddingVector, EncodingFormat,
};
use crate::error::ApiError;
use crate::generation::blocking;
use crate::routes::encoders::run_encoder;
use crate::state::Served;

/// Embeds each input, pooled as the server was configured.
pub async fn create(
    State(served): State<Arc<Served>>,
    JsonBody(request): JsonBody<EmbeddingRequest>,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    let state = served.get(&request.model)?;
    let scheduler = state.encoder("feature-extraction")?;
    let plan = request.validate(scheduler.info().hidden_size)?;
    let pooling = state.pooling().unwrap_or_default();
    let tokenizer = state.tokenizer.shared();
    // Token ids are checked against the model's own vocabulary by the encoder scheduler, with
    // every other limit of the model, before the request joins a batch.
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
                Ok(EncoderInput::single(ids).requesting(Requested::Pooled(pooling)))
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
            let EncoderOutput::Pooled(vector) = output else {
                return Err(ApiError::Internal(format!(
                    "the encoder returned {output:?} for a pooled request"
                )));
            };
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
