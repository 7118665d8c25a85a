//! `POST /v1/chat/completions`: OpenAI's chat request, response and stream chunks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::common::{
    include_usage, refuse_if_present, GenerationParams, SamplingFields, StopSpec, StreamOptions,
    Usage,
};
use crate::chat_template::TemplateMessage;
use crate::error::ApiError;

/// Most alternatives `top_logprobs` may ask for, as in OpenAI's API.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// The request body. Unknown fields are refused, and so are known ones this server does not
/// implement (tools, functions, structured output), rather than silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopSpec>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub seed: Option<i64>,
    /// An end-user identifier; accepted and not used.
    pub user: Option<String>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
}

/// One message of the conversation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    /// Null is taken as empty text.
    pub content: Option<MessageContent>,
    pub name: Option<String>,
}

/// A message's content: text, or a list of `{"type": "text", "text": ...}` parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a string or a list of {\"type\": \"text\", \"text\": ...} parts"
)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<Map<String, Value>>),
}

/// A checked chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPlan {
    pub model: String,
    pub messages: Vec<TemplateMessage>,
    pub params: GenerationParams,
    pub stream: bool,
    pub include_usage: bool,
}

impl ChatCompletionRequest {
    /// Checks every field, refusing what this server does not implement.
    pub fn validate(self) -> Result<ChatPlan, ApiError> {
        const NO_TOOLS: &str = "tool and function calling are not implemented";
        refuse_if_present("tools", &self.tools, NO_TOOLS)?;
        refuse_if_present("functions", &self.functions, NO_TOOLS)?;
        refuse_if_present("function_call", &self.function_call, NO_TOOLS)?;
        if !matches!(&self.tool_choice, None | Some(Value::Null))
            && self.tool_choice != Some(Value::from("none"))
        {
            refuse_if_present("tool_choice", &self.tool_choice, NO_TOOLS)?;
        }
        let text_format = serde_json::json!({"type": "text"});
        if !matches!(&self.response_format, None | Some(Value::Null))
            && self.response_format.as_ref() != Some(&text_format)
        {
            refuse_if_present(
                "response_format",
                &self.response_format,
                "only {\"type\": \"text\"} is implemented",
            )?;
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs requires logprobs to be true",
                ))
            }
            (true, None) => Some(0),
            (true, Some(k @ 0..=MAX_TOP_LOGPROBS)) => Some(k as usize),
            (true, Some(k)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ))
            }
        };
        let (max_tokens, max_tokens_param) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::invalid(
                    "max_completion_tokens",
                    format!("max_completion_tokens ({a}) and max_tokens ({b}) disagree; give one"),
                ))
            }
            (Some(n), _) => (Some(n), "max_completion_tokens"),
            (None, n) => (n, "max_tokens"),
        };
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let messages = self
            .messages
            .into_iter()
            .map(ChatMessage::into_template_message)
            .collect::<Result<Vec<_>, _>>()?;
        let stream = self.stream.unwrap_or(false);
        let include_usage = include_usage(stream, &self.stream_options)?;
        let params = SamplingFields {
            max_tokens,
            max_tokens_param,
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stop: self.stop,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias,
            seed: self.seed,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            ignore_eos: self.ignore_eos,
            logprobs,
        }
        .validate()?;
        Ok(ChatPlan {
            model: self.model,
            messages,
            params,
            stream,
            include_usage,
        })
    }
}

impl ChatMessage {
    /// The message as the template sees it: text parts joined by newlines.
    fn into_template_message(self) -> Result<TemplateMessage, ApiError> {
        let content = match self.content {
            None => String::new(),
            Some(MessageContent::Text(text)) => text,
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .map(text_of_part)
                .collect::<Result<Vec<_>, _>>()?
                .join("\n"),
        };
        Ok(TemplateMessage {
            role: self.role,
            content,
            name: self.name,
        })
    }
}

fn text_of_part(part: &Map<String, Value>) -> Result<&str, ApiError> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "text" {
        return Err(ApiError::invalid(
            "messages",
            format!("content parts of type {kind:?} are not supported: only \"text\" parts are"),
        ));
    }
    if let Some(extra) = part
        .keys()
        .find(|key| !matches!(key.as_str(), "type" | "text"))
    {
        return Err(ApiError::invalid(
            "messages",
            format!("unknown field `{extra}` in a text content part"),
        ));
    }
    part.get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("messages", "a text content part needs a string `text`"))
}

/// The response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    /// Always "chat.completion".
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// One choice of the response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

/// The generated message.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always "assistant".
    pub role: &'static str,
    pub content: String,
}

/// One streamed chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always "chat.completion.chunk".
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Absent unless usage is streamed; then null in all but the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice's delta in a chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to a choice's message; empty (`{}`) in the chunk with the finish reason.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Log-probabilities of a choice's tokens.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// One generated token with its most probable alternatives.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// One alternative.
#[derive(Debug, Clone, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ChatPlan, ApiError> {
        serde_json::from_str::<ChatCompletionRequest>(json)
            .map_err(|e| ApiError::MalformedRequest(e.to_string()))?
            .validate()
    }

    fn refused_param(json: &str) -> Option<&'static str> {
        parse(json).unwrap_err().param()
    }

    const HI: &str = r#""messages": [{"role": "user", "content": "hi"}]"#;

    #[test]
    fn text_parts_are_joined_and_names_kept() {
        let plan = parse(
            r#"{"model": "m", "messages": [{"role": "user", "name": "ann",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null}]}"#,
        )
        .unwrap();
        assert_eq!(plan.messages[0].content, "a\nb");
        assert_eq!(plan.messages[0].name.as_deref(), Some("ann"));
        assert_eq!(plan.messages[1].content, "");
        assert_eq!(plan.params.max_tokens, None);
    }

    #[test]
    fn tools_functions_and_structured_output_are_refused() {
        for field in [
            r#""tools": [{"type": "function", "function": {"name": "f"}}]"#,
            r#""tool_choice": "auto""#,
            r#""functions": [{"name": "f"}]"#,
            r#""function_call": "auto""#,
            r#""response_format": {"type": "json_object"}"#,
        ] {
            let json = format!(r#"{{"model": "m", {HI}, {field}}}"#);
            let param = refused_param(&json).unwrap();
            assert!(field.contains(param), "{field} refused as {param}");
        }
        let json = format!(r#"{{"model": "m", {HI}, "response_format": {{"type": "text"}}}}"#);
        assert!(parse(&json).is_ok());
    }

    #[test]
    fn non_text_content_parts_are_refused() {
        let json = r#"{"model": "m", "messages": [{"role": "user", "content":
            [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}"#;
        let error = parse(json).unwrap_err();
        assert_eq!(error.param(), Some("messages"));
        assert!(error.to_string().contains("image_url"), "{error}");
    }

    #[test]
    fn logprobs_and_top_logprobs_are_checked_together() {
        let with = |extra: &str| format!(r#"{{"model": "m", {HI}, {extra}}}"#);
        assert_eq!(
            refused_param(&with(r#""top_logprobs": 2"#)),
            Some("top_logprobs")
        );
        assert_eq!(
            refused_param(&with(r#""logprobs": true, "top_logprobs": 21"#)),
            Some("top_logprobs")
        );
        let plan = parse(&with(r#""logprobs": true, "top_logprobs": 20"#)).unwrap();
        assert_eq!(plan.params.sampling.logprobs, Some(20));
        let plan = parse(&with(r#""logprobs": true"#)).unwrap();
        assert_eq!(plan.params.sampling.logprobs, Some(0));
    }

    #[test]
    fn max_completion_tokens_is_an_alias_of_max_tokens() {
        let with = |extra: &str| format!(r#"{{"model": "m", {HI}, {extra}}}"#);
        let plan = parse(&with(r#""max_completion_tokens": 5"#)).unwrap();
        assert_eq!(plan.params.max_tokens, Some(5));
        assert_eq!(
            refused_param(&with(r#""max_completion_tokens": 0"#)),
            Some("max_completion_tokens")
        );
        assert!(parse(&with(r#""max_completion_tokens": 5, "max_tokens": 6"#)).is_err());
    }

    #[test]
    fn empty_conversations_and_unknown_message_fields_are_refused() {
        assert_eq!(
            refused_param(r#"{"model": "m", "messages": []}"#),
            Some("messages")
        );
        let error = parse(
            r#"{"model": "m", "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("tool_call_id"), "{error}");
    }
}
