//! `POST /tokenize` and `POST /detokenize`, in vLLM's shapes, for clients that count tokens.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::JsonBody;
use crate::api::chat::ChatMessage;
use crate::chat_template::TemplateOptions;
use crate::error::ApiError;
use crate::generation::{blocking, token_text};
use crate::state::{Engine, Served};

/// A text, or a conversation rendered with the chat template as a chat request's prompt is.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub model: String,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    /// With `prompt`: add the tokenizer's special tokens (BOS for Mistral); default true. With
    /// `messages` the template writes them, and this defaults to false.
    pub add_special_tokens: Option<bool>,
    /// Also return each token's text.
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    /// The most tokens a request may hold, prompt and output together.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: String,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// Token ids of a prompt or a rendered conversation.
pub async fn tokenize(
    State(served): State<Arc<Served>>,
    JsonBody(request): JsonBody<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let state = served.get(&request.model)?;
    let worker = Arc::clone(state);
    let tokens = blocking(move || match (request.prompt, request.messages) {
        (Some(prompt), None) => Ok(worker
            .tokenizer
            .encode(&prompt, request.add_special_tokens.unwrap_or(true))?),
        (None, Some(messages)) => {
            let messages = messages
                .into_iter()
                .map(ChatMessage::into_template_message)
                .collect::<Result<Vec<_>, _>>()?;
            // Ending with the assistant's turn opening, as a chat request's prompt does.
            let text = worker
                .chat_template()?
                .render(&messages, &TemplateOptions::default())?;
            Ok(worker
                .tokenizer
                .encode(&text, request.add_special_tokens.unwrap_or(false))?)
        }
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "messages",
            "give either prompt or messages, not both",
        )),
        (None, None) => Err(ApiError::invalid("prompt", "give a prompt or messages")),
    })
    .await?;
    let token_strs = request.return_token_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|&t| token_text(&state.tokenizer, t))
            .collect()
    });
    let max_model_len = match &state.engine {
        Engine::Generator { scheduler, .. } => scheduler.config().max_total_tokens,
        Engine::Encoder { scheduler, .. } => scheduler.info().max_sequence_tokens,
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len,
        tokens,
        token_strs,
    }))
}

/// The text of token ids, special tokens included, as the tokenizer decodes it.
pub async fn detokenize(
    State(served): State<Arc<Served>>,
    JsonBody(request): JsonBody<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let state = served.get(&request.model)?;
    let vocab = state.tokenizer.shared().get_vocab_size(true);
    if let Some(bad) = request.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is out of range for a vocabulary of {vocab}"),
        ));
    }
    let worker = Arc::clone(state);
    let prompt = blocking(move || Ok(worker.tokenizer.decode(&request.tokens, false)?)).await?;
    Ok(Json(DetokenizeResponse { prompt }))
}
