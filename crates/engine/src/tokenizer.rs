//! The model's tokenizer (tokenizer.json) with what tokenizer_config.json, config.json and
//! generation_config.json say about special tokens and chat templates.

use std::sync::Arc;

use serde_json::Value;

use crate::detokenizer::{clean_up_tokenization, DetokenizeError, IncrementalDecoder};
use crate::error::{EngineError, Result};

/// A tokenizer and the special tokens generation needs.
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<u32>,
    chat_template: Option<String>,
    clean_up_tokenization_spaces: bool,
}

impl Tokenizer {
    /// Reads tokenizer.json, and the special tokens from tokenizer_config.json,
    /// generation_config.json and config.json (in that order of precedence for end-of-sequence
    /// ids, as transformers' `generate` does: generation_config first, then config).
    pub fn from_model_files(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&str>,
        generation_config: Option<&str>,
        config: &str,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| {
            EngineError::BadFile {
                path: "tokenizer.json".into(),
                reason: e.to_string(),
            }
        })?;
        let parse = |name: &str, text: Option<&str>| -> Result<Value> {
            match text {
                None => Ok(Value::Null),
                Some(text) => serde_json::from_str(text).map_err(|e| EngineError::BadFile {
                    path: name.into(),
                    reason: e.to_string(),
                }),
            }
        };
        let tokenizer_config = parse("tokenizer_config.json", tokenizer_config)?;
        let generation_config = parse("generation_config.json", generation_config)?;
        let config = parse("config.json", Some(config))?;

        let bos_token = special_token(&tokenizer_config, "bos_token");
        let eos_token = special_token(&tokenizer_config, "eos_token");
        let mut eos_token_ids = token_ids(&generation_config, "eos_token_id");
        if eos_token_ids.is_empty() {
            eos_token_ids = token_ids(&config, "eos_token_id");
        }
        if eos_token_ids.is_empty() {
            if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
                eos_token_ids.push(id);
            }
        }
        Ok(Self {
            chat_template: chat_template(&tokenizer_config),
            clean_up_tokenization_spaces: cleans_up_tokenization_spaces(&tokenizer_config),
            inner: Arc::new(inner),
            bos_token,
            eos_token,
            eos_token_ids,
        })
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds (BOS for
    /// Mistral) when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids` as transformers' `decode` gives it: the tokenizer's decoder, then
    /// [`clean_up_tokenization`] when the tokenizer cleans up spaces.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// A decoder of the tokens generated after `prompt`, cleaning up spaces as
    /// [`Tokenizer::decode`] does.
    pub fn incremental_decoder(
        &self,
        prompt: &[u32],
    ) -> std::result::Result<IncrementalDecoder<Arc<tokenizers::Tokenizer>>, DetokenizeError> {
        Ok(IncrementalDecoder::new(self.shared(), prompt)?
            .cleaning_up_spaces(self.clean_up_tokenization_spaces))
    }

    /// Whether decoded text is cleaned up (`clean_up_tokenization_spaces`).
    pub fn cleans_up_spaces(&self) -> bool {
        self.clean_up_tokenization_spaces
    }

    /// The underlying tokenizers-crate tokenizer, shared (incremental decoders hold it).
    pub fn shared(&self) -> Arc<tokenizers::Tokenizer> {
        Arc::clone(&self.inner)
    }

    /// Ids that end a sequence.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The beginning-of-sequence token's text, for chat templates.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The end-of-sequence token's text, for chat templates.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The default chat template (Jinja), when the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// A special token given either as a string or as an AddedToken object `{"content": ...}`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(token) => Some(token.clone()),
        Value::Object(token) => token.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Whether transformers 4.37.2 cleans up the decoded text of the tokenizer that
/// `tokenizer_config` (tokenizer_config.json, `Null` when there is none) describes:
/// `clean_up_tokenization_spaces` when it says, else the default of its `tokenizer_class`, which is
/// `true` except for the classes whose constructors default it to `false`.
pub fn cleans_up_tokenization_spaces(tokenizer_config: &Value) -> bool {
    const CLASSES_WITHOUT_CLEANUP: [&str; 4] = ["Llama", "CodeLlama", "Bloom", "Qwen2"];
    if let Some(clean_up) = tokenizer_config
        .get("clean_up_tokenization_spaces")
        .and_then(Value::as_bool)
    {
        return clean_up;
    }
    let class = tokenizer_config
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let base = class
        .strip_suffix("Fast")
        .unwrap_or(class)
        .strip_suffix("Tokenizer")
        .unwrap_or_default();
    !CLASSES_WITHOUT_CLEANUP.contains(&base)
}

/// An id or a list of ids.
fn token_ids(config: &Value, key: &str) -> Vec<u32> {
    match config.get(key) {
        Some(Value::Number(id)) => id.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
        Some(Value::Array(ids)) => ids
            .iter()
            .filter_map(|id| id.as_u64())
            .map(|id| id as u32)
            .collect(),
        _ => vec![],
    }
}

/// `chat_template` as a string, or the one named "default" of a list of named templates.
fn chat_template(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(template) => Some(template.clone()),
        Value::Array(templates) => templates
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_and_eos_ids_follow_transformers_precedence() {
        let tokenizer_config = r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]}"#;
        let config: Value = serde_json::from_str(tokenizer_config).unwrap();
        assert_eq!(special_token(&config, "bos_token").as_deref(), Some("<s>"));
        assert_eq!(special_token(&config, "eos_token").as_deref(), Some("</s>"));
        assert_eq!(chat_template(&config).as_deref(), Some("y"));
        let generation: Value = serde_json::from_str(r#"{"eos_token_id": [2, 32000]}"#).unwrap();
        assert_eq!(token_ids(&generation, "eos_token_id"), vec![2, 32000]);
    }

    #[test]
    fn cleanup_follows_the_config_then_the_tokenizer_class() {
        let cleans =
            |json: &str| cleans_up_tokenization_spaces(&serde_json::from_str(json).unwrap());
        assert!(cleans("null"));
        assert!(cleans(r#"{"tokenizer_class": "BertTokenizer"}"#));
        assert!(cleans(r#"{"tokenizer_class": "GPT2TokenizerFast"}"#));
        assert!(!cleans(r#"{"tokenizer_class": "LlamaTokenizer"}"#));
        assert!(!cleans(r#"{"tokenizer_class": "CodeLlamaTokenizerFast"}"#));
        assert!(cleans(
            r#"{"tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": true}"#
        ));
        assert!(!cleans(
            r#"{"tokenizer_class": "BertTokenizer", "clean_up_tokenization_spaces": false}"#
        ));
    }
}
