//! `POST /v1/chat/completions`: OpenAI's chat request, response and stream chunks.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::common::{
    include_usage, refuse_if_present, GenerationParams, ResponseFormat, SamplingFields, StopSpec,
    StreamOptions, StructuredFields, StructuredOutput, Usage,
};
use crate::chat_template::{TemplateMessage, TemplateOptions};
use crate::error::ApiError;
use crate::tools::{self, Tool, ToolCall, ToolChoiceSpec, ToolPlan};

/// Most alternatives `top_logprobs` may ask for, as in OpenAI's API.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// The request body: every field of OpenAI's current chat request schema is known. Those that
/// cannot change the output (`store`, `metadata`, `service_tier`, ...) are accepted and ignored;
/// those whose absence would change it and that this server does not implement (audio,
/// predicted outputs, web search, moderation) are refused with a message naming the field.
/// Fields outside OpenAI's schema are refused unless they are one of the documented extensions.
#[derive(Debug, Deserialize, JsonSchema)]
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
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoiceSpec>,
    pub parallel_tool_calls: Option<bool>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<ResponseFormat>,
    /// Passed to the chat template as `reasoning_effort`; templates that do not read it ignore it.
    pub reasoning_effort: Option<String>,
    /// Passed to the chat template as `verbosity`, as `reasoning_effort` is.
    pub verbosity: Option<String>,
    /// Output modalities: only `["text"]`.
    pub modalities: Option<Vec<String>>,
    // Accepted, type-checked and otherwise ignored: they cannot change the output.
    /// An end-user identifier.
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
    /// Whether OpenAI stores the completion; nothing is stored here.
    pub store: Option<bool>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub service_tier: Option<String>,
    /// Prefix caching here needs no hints.
    pub prompt_cache_key: Option<String>,
    pub prompt_cache_options: Option<Map<String, Value>>,
    pub prompt_cache_retention: Option<String>,
    // Refused when present: what they ask for is not done here, and ignoring them would change
    // what the client gets.
    pub audio: Option<Value>,
    pub prediction: Option<Value>,
    pub web_search_options: Option<Value>,
    pub moderation: Option<Value>,
    // Extensions (vLLM's names).
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// One message of the conversation: `developer`, `system`, `user`, `assistant` or `tool`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    /// Null is taken as empty text.
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    /// An assistant message's earlier tool calls.
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A tool message's answer to this call.
    pub tool_call_id: Option<String>,
    /// An assistant message's earlier refusal.
    pub refusal: Option<String>,
    /// An assistant message's earlier audio: refused.
    pub audio: Option<Value>,
    /// An assistant message's deprecated function call: refused.
    pub function_call: Option<Value>,
}

/// A message's content: text, or a list of `{"type": "text", "text": ...}` parts.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
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
    pub template_options: TemplateOptions,
    pub params: GenerationParams,
    /// The grammar the reply must match.
    pub structured: Option<StructuredOutput>,
    /// The tools the reply may or must call.
    pub tools: Option<ToolPlan>,
    pub stream: bool,
    pub include_usage: bool,
}

impl ChatCompletionRequest {
    /// Checks every field, refusing what this server does not implement.
    pub fn validate(self) -> Result<ChatPlan, ApiError> {
        const NO_FUNCTIONS: &str =
            "the deprecated functions API is not supported: use tools and tool_choice";
        refuse_if_present(
            "audio",
            &self.audio,
            "audio output is not available: this model writes text",
        )?;
        refuse_if_present(
            "prediction",
            &self.prediction,
            "predicted outputs are not implemented",
        )?;
        refuse_if_present(
            "web_search_options",
            &self.web_search_options,
            "this server has no web search",
        )?;
        refuse_if_present(
            "moderation",
            &self.moderation,
            "this server runs no moderation",
        )?;
        if let Some(other) = self
            .modalities
            .iter()
            .flatten()
            .find(|modality| modality.as_str() != "text")
        {
            return Err(ApiError::invalid(
                "modalities",
                format!("only the \"text\" modality is available, got {other:?}"),
            ));
        }
        refuse_if_present("functions", &self.functions, NO_FUNCTIONS)?;
        refuse_if_present("function_call", &self.function_call, NO_FUNCTIONS)?;
        let tools = tools::plan(self.tools, self.tool_choice, self.parallel_tool_calls)?;
        let structured = StructuredFields {
            response_format: self.response_format,
            guided_json: self.guided_json,
            guided_regex: self.guided_regex,
            guided_choice: self.guided_choice,
            guided_grammar: self.guided_grammar,
        }
        .validate()?;
        // A required or named call is generated under its own grammar.
        let structured = match tools.as_ref().and_then(ToolPlan::grammar) {
            None => structured,
            Some(_) if structured.is_some() => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "a required or named tool call and a structured response_format both constrain the reply; give one",
                ))
            }
            Some(grammar) => Some(StructuredOutput {
                grammar,
                param: "tools",
            }),
        };
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
        let template_options = TemplateOptions {
            reasoning_effort: self.reasoning_effort,
            verbosity: self.verbosity,
            tools: tools.as_ref().map(ToolPlan::template_tools),
        };
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
            template_options,
            params,
            structured,
            tools,
            stream,
            include_usage,
        })
    }
}

impl ChatMessage {
    /// The message as the template sees it: text parts joined by newlines, `developer` as the
    /// template's `system`, history tool calls with their arguments parsed (HF templates read
    /// `tool_call.function.arguments` as a mapping).
    pub fn into_template_message(self) -> Result<TemplateMessage, ApiError> {
        let role = match self.role.as_str() {
            "developer" => "system".to_string(),
            "system" | "user" | "assistant" | "tool" => self.role,
            "function" => {
                return Err(ApiError::invalid(
                    "messages",
                    "`function` messages are deprecated and not supported: send `tool` messages with a tool_call_id",
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("unknown role {other:?}: expected developer, system, user, assistant or tool"),
                ))
            }
        };
        let assistant = role == "assistant";
        let only_for = |field: &str, allowed: &str| {
            ApiError::invalid(
                "messages",
                format!("`{field}` is only allowed in {allowed} messages, not in a {role} message"),
            )
        };
        refuse_if_present(
            "messages",
            &self.audio,
            "earlier audio responses cannot be given to a text model",
        )?;
        refuse_if_present(
            "messages",
            &self.function_call,
            "`function_call` in messages is deprecated: use `tool_calls`",
        )?;
        if self.tool_calls.is_some() && !assistant {
            return Err(only_for("tool_calls", "assistant"));
        }
        if self.refusal.is_some() && !assistant {
            return Err(only_for("refusal", "assistant"));
        }
        match (&self.tool_call_id, role.as_str()) {
            (None, "tool") => {
                return Err(ApiError::invalid(
                    "messages",
                    "a tool message needs the `tool_call_id` it answers",
                ))
            }
            (Some(_), role) if role != "tool" => return Err(only_for("tool_call_id", "tool")),
            _ => {}
        }
        let mut content = match self.content {
            None => String::new(),
            Some(MessageContent::Text(text)) => text,
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .map(|part| text_of_part(part, assistant))
                .collect::<Result<Vec<_>, _>>()?
                .join("\n"),
        };
        if content.is_empty() {
            if let Some(refusal) = self.refusal {
                content = refusal;
            }
        }
        let tool_calls = self
            .tool_calls
            .map(|calls| {
                calls
                    .into_iter()
                    .map(ToolCall::template_value)
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(TemplateMessage {
            role,
            content,
            name: self.name,
            tool_calls,
            tool_call_id: self.tool_call_id,
        })
    }
}

/// The text of one content part: `text`, or `refusal` in an assistant message. Image, audio and
/// file parts are refused: the models served here read text only.
fn text_of_part(part: &Map<String, Value>, assistant: bool) -> Result<&str, ApiError> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
    let field = match kind {
        "text" => "text",
        "refusal" if assistant => "refusal",
        "image_url" | "input_audio" | "file" => {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "content parts of type {kind:?} are not supported: this model reads text only"
                ),
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "content parts of type {kind:?} are not supported: only \"text\" parts are"
                ),
            ))
        }
    };
    if let Some(extra) = part
        .keys()
        .find(|key| key.as_str() != "type" && key.as_str() != field)
    {
        return Err(ApiError::invalid(
            "messages",
            format!("unknown field `{extra}` in a {kind} content part"),
        ));
    }
    part.get(field).and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            "messages",
            format!("a {kind} content part needs a string `{field}`"),
        )
    })
}

/// The response.
#[derive(Debug, Clone, Serialize, JsonSchema)]
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
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

/// The generated message.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct AssistantMessage {
    /// Always "assistant".
    pub role: &'static str,
    /// The text; null when the reply is tool calls.
    pub content: Option<String>,
    /// Always null: the models served here do not refuse by a separate channel.
    pub refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// One streamed chunk.
#[derive(Debug, Clone, Serialize, JsonSchema)]
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
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to a choice's message; empty (`{}`) in the chunk with the finish reason.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A streamed tool call: here each call comes whole, in one delta.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(flatten)]
    pub call: ToolCall,
}

/// Log-probabilities of a choice's tokens.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// One generated token with its most probable alternatives.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// One alternative.
#[derive(Debug, Clone, Serialize, JsonSchema)]
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
    fn deprecated_functions_and_a_tool_grammar_beside_response_format_are_refused() {
        let tool = r#""tools": [{"type": "function", "function": {"name": "f"}}]"#;
        for (field, param) in [
            (r#""functions": [{"name": "f"}]"#.to_string(), "functions"),
            (r#""function_call": "auto""#.to_string(), "function_call"),
            (r#""tool_choice": "auto""#.to_string(), "tool_choice"),
            (
                format!(
                    r#"{tool}, "tool_choice": "required", "response_format": {{"type": "json_object"}}"#
                ),
                "tool_choice",
            ),
        ] {
            let json = format!(r#"{{"model": "m", {HI}, {field}}}"#);
            if param == "tool_choice" && !field.contains("required") {
                // `auto` without tools is an ordinary chat, as in OpenAI's API.
                assert!(parse(&json).unwrap().tools.is_none());
                continue;
            }
            assert_eq!(refused_param(&json), Some(param), "{field}");
        }
        let json = format!(r#"{{"model": "m", {HI}, {tool}, "tool_choice": "required"}}"#);
        let plan = parse(&json).unwrap();
        assert_eq!(plan.structured.unwrap().param, "tools");
        assert_eq!(plan.template_options.tools.unwrap().len(), 1);
    }

    #[test]
    fn structured_output_fields_become_one_grammar() {
        use candlewick_engine::grammar::Grammar;
        let grammar = |field: &str| {
            let json = format!(r#"{{"model": "m", {HI}, {field}}}"#);
            parse(&json)
                .unwrap()
                .structured
                .map(|s| (s.grammar, s.param))
        };
        assert_eq!(grammar(r#""response_format": {"type": "text"}"#), None);
        assert_eq!(
            grammar(r#""response_format": {"type": "json_object"}"#),
            Some((Grammar::JsonObject, "response_format"))
        );
        let schema =
            serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            grammar(&format!(
                r#""response_format": {{"type": "json_schema", "json_schema":
                    {{"name": "thing", "strict": true, "schema": {schema}}}}}"#
            )),
            Some((Grammar::JsonSchema(schema.clone()), "response_format"))
        );
        assert_eq!(
            grammar(&format!(
                r#""guided_json": {}"#,
                Value::String(schema.to_string())
            )),
            Some((Grammar::JsonSchema(schema), "guided_json"))
        );
        assert_eq!(
            grammar(r#""guided_regex": "[ab]+""#),
            Some((Grammar::Regex("[ab]+".into()), "guided_regex"))
        );
        assert_eq!(
            grammar(r#""guided_choice": ["x", "y"]"#),
            Some((
                Grammar::Choice(vec!["x".into(), "y".into()]),
                "guided_choice"
            ))
        );
        assert_eq!(
            grammar(r#""guided_grammar": "start: \"a\"""#),
            Some((Grammar::Lark("start: \"a\"".into()), "guided_grammar"))
        );
        for (field, param) in [
            (
                r#""response_format": {"type": "json_object"}, "guided_regex": "a""#,
                "guided_regex",
            ),
            (r#""guided_choice": []"#, "guided_choice"),
            (r#""guided_json": "{not json""#, "guided_json"),
            (
                r#""response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}"#,
                "response_format",
            ),
        ] {
            let json = format!(r#"{{"model": "m", {HI}, {field}}}"#);
            assert_eq!(refused_param(&json), Some(param), "{field}");
        }
        // Unknown types and keys are malformed requests.
        for field in [
            r#""response_format": {"type": "xml"}"#,
            r#""response_format": {"type": "json_schema", "json_schema": {"name": "a", "extra": 1}}"#,
        ] {
            let json = format!(r#"{{"model": "m", {HI}, {field}}}"#);
            assert!(
                matches!(parse(&json), Err(ApiError::MalformedRequest(_))),
                "{field}"
            );
        }
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
        let error =
            parse(r#"{"model": "m", "messages": [{"role": "user", "content": "x", "weight": 1}]}"#)
                .unwrap_err();
        assert!(error.to_string().contains("weight"), "{error}");
        let error = parse(r#"{"model": "m", "messages": [{"role": "critic", "content": "x"}]}"#)
            .unwrap_err();
        assert!(error.to_string().contains("critic"), "{error}");
    }

    #[test]
    fn fields_that_cannot_change_the_output_are_accepted() {
        let plan = parse(&format!(
            r#"{{"model": "m", {HI}, "store": false, "metadata": {{"k": "v"}},
                "service_tier": "auto", "user": "u", "safety_identifier": "s",
                "prompt_cache_key": "p", "prompt_cache_retention": "24h",
                "prompt_cache_options": {{"ttl": "30m"}}, "parallel_tool_calls": true,
                "reasoning_effort": "low", "verbosity": "high", "modalities": ["text"],
                "stream": true, "stream_options": {{"include_usage": true, "include_obfuscation": false}}}}"#
        ))
        .unwrap();
        assert!(plan.include_usage);
        assert_eq!(
            plan.template_options.reasoning_effort.as_deref(),
            Some("low")
        );
        assert_eq!(plan.template_options.verbosity.as_deref(), Some("high"));
        // Their types are still checked.
        assert!(parse(&format!(r#"{{"model": "m", {HI}, "store": "yes"}}"#)).is_err());
        assert!(parse(&format!(
            r#"{{"model": "m", {HI}, "metadata": {{"k": 1}}}}"#
        ))
        .is_err());
        // Fields outside OpenAI's schema are still refused.
        assert!(parse(&format!(r#"{{"model": "m", {HI}, "best_effort": true}}"#)).is_err());
    }

    #[test]
    fn fields_whose_absence_would_change_the_output_are_refused_by_name() {
        for (field, param) in [
            (r#""audio": {"voice": "alloy", "format": "mp3"}"#, "audio"),
            (r#""modalities": ["text", "audio"]"#, "modalities"),
            (
                r#""prediction": {"type": "content", "content": "x"}"#,
                "prediction",
            ),
            (r#""web_search_options": {}"#, "web_search_options"),
            (
                r#""moderation": {"model": "omni-moderation-latest"}"#,
                "moderation",
            ),
        ] {
            let json = format!(r#"{{"model": "m", {HI}, {field}}}"#);
            assert_eq!(refused_param(&json), Some(param), "{field}");
        }
        for part in [
            r#"{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}"#,
            r#"{"type": "file", "file": {"file_id": "f"}}"#,
        ] {
            let json = format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": [{part}]}}]}}"#
            );
            let error = parse(&json).unwrap_err();
            assert!(error.to_string().contains("text only"), "{error}");
        }
    }

    #[test]
    fn developer_tool_and_assistant_tool_call_messages_reach_the_template() {
        let plan = parse(
            r#"{"model": "m", "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                    "type": "function", "function": {"name": "get", "arguments": "{\"city\": \"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "7 C"}]},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]}"#,
        )
        .unwrap();
        let roles: Vec<_> = plan.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "assistant"]);
        let call = &plan.messages[2].tool_calls.as_ref().unwrap()[0];
        assert_eq!(call["function"]["arguments"]["city"], "Oslo");
        assert_eq!(call["id"], "call_1");
        assert_eq!(plan.messages[3].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(plan.messages[3].content, "7 C");
        assert_eq!(plan.messages[4].content, "no");
        // A tool message needs its call id, and only tool messages carry one.
        for bad in [
            r#"{"role": "tool", "content": "x"}"#,
            r#"{"role": "user", "content": "x", "tool_call_id": "1"}"#,
            r#"{"role": "user", "content": "x", "tool_calls": []}"#,
        ] {
            let json = format!(r#"{{"model": "m", "messages": [{bad}]}}"#);
            assert_eq!(refused_param(&json), Some("messages"), "{bad}");
        }
    }
}
