//! OpenAI's embeddings request and response.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::completions::{Prompt, PromptInput};
use crate::error::ApiError;

/// Most inputs one request may embed, as in OpenAI's API.
pub const MAX_INPUTS: usize = 2048;

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    /// The served model's name.
    pub model: String,
    /// A string, a list of strings, a list of token ids or a list of such lists.
    pub input: Prompt,
    /// `float` (default) or `base64` (little-endian f32 bytes).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Truncating embeddings to fewer dimensions is not supported; refused unless it equals
    /// the model's width.
    #[serde(default)]
    pub dimensions: Option<u64>,
    /// An end-user id; accepted and ignored, as it only matters for abuse monitoring.
    #[serde(default)]
    pub user: Option<String>,
}

/// How the vectors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingFormat {
    /// A JSON array of numbers.
    Float,
    /// Base64 of the little-endian f32 bytes.
    Base64,
}

/// A checked embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingPlan {
    pub model: String,
    pub inputs: Vec<PromptInput>,
    pub format: EncodingFormat,
}

impl EmbeddingRequest {
    /// Checks every field against a model whose embeddings have `width` dimensions.
    pub fn validate(self, width: usize) -> Result<EmbeddingPlan, ApiError> {
        let format = match self.encoding_format.as_deref() {
            None | Some("float") => EncodingFormat::Float,
            Some("base64") => EncodingFormat::Base64,
            Some(other) => {
                return Err(ApiError::invalid(
                    "encoding_format",
                    format!("encoding_format must be float or base64, got {other:?}"),
                ))
            }
        };
        if let Some(dimensions) = self.dimensions {
            if dimensions != width as u64 {
                return Err(ApiError::invalid(
                    "dimensions",
                    format!("this model's embeddings have {width} dimensions; got {dimensions}"),
                ));
            }
        }
        let inputs: Vec<PromptInput> = match self.input {
            Prompt::Text(text) => vec![PromptInput::Text(text)],
            Prompt::Texts(texts) => texts.into_iter().map(PromptInput::Text).collect(),
            Prompt::Tokens(ids) => vec![PromptInput::Tokens(ids)],
            Prompt::TokenLists(lists) => lists.into_iter().map(PromptInput::Tokens).collect(),
        };
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input must hold 1 to {MAX_INPUTS} items, got {}",
                    inputs.len()
                ),
            ));
        }
        let empty = inputs.iter().any(|input| match input {
            PromptInput::Text(text) => text.is_empty(),
            PromptInput::Tokens(ids) => ids.is_empty(),
        });
        if empty {
            return Err(ApiError::invalid(
                "input",
                "input must not contain an empty item",
            ));
        }
        Ok(EmbeddingPlan {
            model: self.model,
            inputs,
            format,
        })
    }
}

/// One vector, as floats or base64.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

/// One input's embedding.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Embedding {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

/// Token counts of an embeddings request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// `{"object": "list", "data": [...], "model", "usage"}`.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct EmbeddingResponse {
    pub object: &'static str,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}
