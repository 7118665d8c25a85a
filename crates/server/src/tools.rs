//! Tool calls: the `tools` a chat request offers, what `tool_choice` makes of them, and the
//! calls read back from the generated text.
//!
//! With `tool_choice` `required` or a named function, the reply is generated under a grammar
//! (the function's parameters schema, or an array of `{"name", "arguments"}` calls) so that it
//! always parses. With `auto`, the tools go to the chat template and the reply is searched for
//! calls in the template family's format: Mistral's `[TOOL_CALLS] [{"name", "arguments"}, ...]`
//! or Hermes-style `<tool_call>{"name", "arguments"}</tool_call>`.

use candlewick_engine::grammar::Grammar;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::generation::request_id;

/// `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDefinition,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of the arguments object; absent: no arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Calls always follow the schema here, strict or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or `{"type": "function", "function":
/// {"name"}}`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
)]
pub enum ToolChoiceSpec {
    Mode(String),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: NamedFunction,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    pub name: String,
}

/// What the reply may or must be.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// Text or calls, as the model decides; calls are detected in the text.
    Auto,
    /// One or more calls (one when parallel calls are off), generated under a grammar.
    Required,
    /// A call of this function, its arguments generated under its schema.
    Named(String),
}

/// The checked `tools`, `tool_choice` and `parallel_tool_calls` of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    pub tools: Vec<Tool>,
    pub mode: ToolMode,
    pub parallel: bool,
}

/// A tool call as OpenAI writes it: read back from a reply, or given in an assistant message of
/// the history.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    pub id: String,
    /// Always "function".
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

impl ToolCall {
    /// The call as HF chat templates read it from the history: `{"id", "type", "function":
    /// {"name", "arguments"}}` with the arguments as the JSON value they encode (kept as text
    /// when they are not JSON).
    pub fn template_value(self) -> Result<Value, ApiError> {
        if self.kind != "function" {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "tool calls of type {:?} are not supported: only \"function\"",
                    self.kind
                ),
            ));
        }
        let arguments = serde_json::from_str::<Value>(&self.function.arguments)
            .unwrap_or(Value::String(self.function.arguments));
        Ok(json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": arguments},
        }))
    }
}

/// The called function, with its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// Checks the tool fields. `None` when there are no tools, or `tool_choice` is `none`: the
/// request is then an ordinary chat.
pub fn plan(
    tools: Option<Vec<Tool>>,
    choice: Option<ToolChoiceSpec>,
    parallel: Option<bool>,
) -> Result<Option<ToolPlan>, ApiError> {
    let tools = tools.unwrap_or_default();
    for (i, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid(
                "tools",
                format!("tools[{i}].type must be \"function\", got {:?}", tool.kind),
            ));
        }
        let name = &tool.function.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ApiError::invalid(
                "tools",
                format!("tools[{i}].function.name must be 1 to 64 letters, digits, '_' or '-', got {name:?}"),
            ));
        }
        if tools[..i].iter().any(|other| &other.function.name == name) {
            return Err(ApiError::invalid(
                "tools",
                format!("two tools are named {name:?}"),
            ));
        }
        match &tool.function.parameters {
            None | Some(Value::Object(_)) => {}
            Some(_) => {
                return Err(ApiError::invalid(
                    "tools",
                    format!("tools[{i}].function.parameters must be a JSON schema object"),
                ))
            }
        }
    }
    let mode = match choice {
        None if tools.is_empty() => return Ok(None),
        None => ToolMode::Auto,
        Some(ToolChoiceSpec::Mode(mode)) => match mode.as_str() {
            "none" => return Ok(None),
            "auto" if tools.is_empty() => return Ok(None),
            "auto" => ToolMode::Auto,
            "required" => ToolMode::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice must be \"none\", \"auto\", \"required\" or a named function, got {other:?}"),
                ))
            }
        },
        Some(ToolChoiceSpec::Named(named)) => {
            if named.kind != "function" {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice.type must be \"function\", got {:?}", named.kind),
                ));
            }
            ToolMode::Named(named.function.name)
        }
    };
    if tools.is_empty() {
        return Err(ApiError::invalid(
            "tool_choice",
            "tool_choice asks for a tool call, but the request has no tools",
        ));
    }
    if let ToolMode::Named(name) = &mode {
        if !tools.iter().any(|tool| &tool.function.name == name) {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("tool_choice names {name:?}, which is not among the tools"),
            ));
        }
    }
    Ok(Some(ToolPlan {
        tools,
        mode,
        parallel: parallel.unwrap_or(true),
    }))
}

impl ToolPlan {
    /// The tools as HF chat templates read them (the `tools` variable).
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|tool| serde_json::to_value(tool).unwrap_or(Value::Null))
            .collect()
    }

    fn parameters(&self, name: &str) -> Value {
        self.tools
            .iter()
            .find(|tool| tool.function.name == name)
            .and_then(|tool| tool.function.parameters.clone())
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}))
    }

    /// The grammar the reply is generated under: `None` with `auto`.
    pub fn grammar(&self) -> Option<Grammar> {
        match &self.mode {
            ToolMode::Auto => None,
            ToolMode::Named(name) => Some(Grammar::JsonSchema(self.parameters(name))),
            ToolMode::Required => {
                let calls: Vec<Value> = self
                    .tools
                    .iter()
                    .map(|tool| {
                        json!({
                            "type": "object",
                            "properties": {
                                "name": {"const": tool.function.name},
                                "arguments": self.parameters(&tool.function.name),
                            },
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                let mut schema = json!({
                    "type": "array",
                    "items": {"anyOf": calls},
                    "minItems": 1,
                });
                if !self.parallel {
                    schema["maxItems"] = json!(1);
                }
                Some(Grammar::JsonSchema(schema))
            }
        }
    }

    /// The calls in a finished reply, or `None` when it is text (or, cut short, does not parse).
    pub fn calls(&self, text: &str, format: CallFormat) -> Option<Vec<ToolCall>> {
        let calls = match &self.mode {
            ToolMode::Named(name) => {
                let arguments: Value = serde_json::from_str(text).ok()?;
                vec![(name.clone(), arguments)]
            }
            ToolMode::Required => named_calls(&serde_json::from_str(text).ok()?)?,
            ToolMode::Auto => format.detect(text)?,
        };
        let calls: Vec<ToolCall> = calls
            .into_iter()
            .filter(|(name, _)| self.tools.iter().any(|tool| &tool.function.name == name))
            .map(|(name, arguments)| ToolCall {
                id: call_id(),
                kind: "function".into(),
                function: FunctionCall {
                    name,
                    arguments: arguments.to_string(),
                },
            })
            .collect();
        (!calls.is_empty()).then_some(calls)
    }
}

/// A new call id, `call_` and 24 hex digits.
fn call_id() -> String {
    request_id("call").replacen('-', "_", 1)
}

/// `[{"name", "arguments"}, ...]` (or one such object) as (name, arguments) pairs; arguments
/// given as JSON text are parsed.
fn named_calls(value: &Value) -> Option<Vec<(String, Value)>> {
    let items = match value {
        Value::Array(items) => items.as_slice(),
        Value::Object(_) => std::slice::from_ref(value),
        _ => return None,
    };
    items
        .iter()
        .map(|item| {
            let name = item.get("name")?.as_str()?.to_string();
            let arguments = match item.get("arguments").or_else(|| item.get("parameters")) {
                None => Value::Object(Map::new()),
                Some(Value::String(text)) => serde_json::from_str(text).ok()?,
                Some(arguments) => arguments.clone(),
            };
            arguments.is_object().then_some((name, arguments))
        })
        .collect()
}

/// How a template family writes calls in its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFormat {
    /// `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.
    Mistral,
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call.
    Hermes,
}

impl CallFormat {
    /// The format a chat template writes: Hermes-style when it mentions `<tool_call>`, else
    /// Mistral's.
    pub fn of_template(source: Option<&str>) -> Self {
        match source {
            Some(source) if source.contains("<tool_call>") => Self::Hermes,
            _ => Self::Mistral,
        }
    }

    /// Whether `text`, the start of a reply, is or may become a call (a stream holds such text
    /// back until the reply is complete).
    pub fn may_start_call(self, text: &str) -> bool {
        let text = text.trim_start();
        let marker = match self {
            Self::Mistral => "[TOOL_CALLS]",
            Self::Hermes => "<tool_call>",
        };
        let prefix = |candidate: &str| candidate.starts_with(text) || text.starts_with(candidate);
        // A Mistral reply may also be the bare array when the marker is a special token that
        // decoding drops.
        prefix(marker) || (self == Self::Mistral && prefix("[{\""))
    }

    /// The calls `text` consists of, or `None` when it is text.
    fn detect(self, text: &str) -> Option<Vec<(String, Value)>> {
        let text = text.trim();
        match self {
            Self::Mistral => {
                let body = text.strip_prefix("[TOOL_CALLS]").unwrap_or(text).trim();
                named_calls(&serde_json::from_str(body).ok()?)
            }
            Self::Hermes => {
                let mut calls = Vec::new();
                let mut rest = text;
                while let Some(start) = rest.find("<tool_call>") {
                    if !rest[..start].trim().is_empty() {
                        return None;
                    }
                    let after = &rest[start + "<tool_call>".len()..];
                    let end = after.find("</tool_call>")?;
                    calls.extend(named_calls(
                        &serde_json::from_str(after[..end].trim()).ok()?,
                    )?);
                    rest = &after[end + "</tool_call>".len()..];
                }
                (rest.trim().is_empty() && !calls.is_empty()).then_some(calls)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        serde_json::from_value(json!({"type": "function", "function": {
            "name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}))
        .unwrap()
    }

    fn time() -> Tool {
        serde_json::from_value(json!({"type": "function", "function": {"name": "get_time"}}))
            .unwrap()
    }

    fn mode(value: Value) -> Option<ToolChoiceSpec> {
        Some(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn tool_choice_modes() {
        let tools = || Some(vec![weather(), time()]);
        assert_eq!(plan(None, None, None).unwrap(), None);
        assert_eq!(plan(tools(), mode(json!("none")), None).unwrap(), None);
        assert_eq!(
            plan(tools(), None, None).unwrap().unwrap().mode,
            ToolMode::Auto
        );
        let required = plan(tools(), mode(json!("required")), Some(false))
            .unwrap()
            .unwrap();
        assert_eq!(
            (required.mode.clone(), required.parallel),
            (ToolMode::Required, false)
        );
        let named = plan(
            tools(),
            mode(json!({"type": "function", "function": {"name": "get_time"}})),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(named.mode, ToolMode::Named("get_time".into()));
        for (tools, choice, param) in [
            (tools(), mode(json!("sometimes")), "tool_choice"),
            (None, mode(json!("required")), "tool_choice"),
            (
                tools(),
                mode(json!({"type": "function", "function": {"name": "nope"}})),
                "tool_choice",
            ),
            (Some(vec![weather(), weather()]), None, "tools"),
        ] {
            assert_eq!(plan(tools, choice, None).unwrap_err().param(), Some(param));
        }
    }

    #[test]
    fn grammars_constrain_to_the_named_function_or_an_array_of_calls() {
        let tools = Some(vec![weather(), time()]);
        let named = plan(
            tools.clone(),
            mode(json!({"type": "function", "function": {"name": "get_weather"}})),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            named.grammar(),
            Some(Grammar::JsonSchema(weather().function.parameters.unwrap()))
        );
        let required = plan(tools, mode(json!("required")), Some(false))
            .unwrap()
            .unwrap();
        let Some(Grammar::JsonSchema(schema)) = required.grammar() else {
            panic!()
        };
        assert_eq!(schema["maxItems"], 1);
        assert_eq!(
            schema["items"]["anyOf"][1]["properties"]["name"]["const"],
            "get_time"
        );
        assert_eq!(
            schema["items"]["anyOf"][1]["properties"]["arguments"]["type"],
            "object"
        );
    }

    #[test]
    fn calls_are_read_back_in_each_format() {
        let tools = Some(vec![weather(), time()]);
        let auto = plan(tools.clone(), None, None).unwrap().unwrap();
        let mistral = r#"[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]"#;
        let calls = auto.calls(mistral, CallFormat::Mistral).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
        assert!(calls[0].id.starts_with("call_") && calls[0].id.len() == 29);
        assert_ne!(calls[0].id, calls[1].id);
        // The marker may be a special token that decoding drops.
        let bare = r#"[{"name": "get_time", "arguments": "{}"}]"#;
        assert_eq!(
            auto.calls(bare, CallFormat::Mistral).unwrap()[0]
                .function
                .name,
            "get_time"
        );
        let hermes = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
        assert_eq!(auto.calls(hermes, CallFormat::Hermes).unwrap().len(), 2);
        for text in [
            "It is sunny.",
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"ci",
            "[{\"name\": \"unknown_tool\", \"arguments\": {}}]",
            "Sure: <tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
        ] {
            let format = if text.contains("<tool_call>") {
                CallFormat::Hermes
            } else {
                CallFormat::Mistral
            };
            assert_eq!(auto.calls(text, format), None, "{text}");
        }
        let required = plan(tools.clone(), mode(json!("required")), None)
            .unwrap()
            .unwrap();
        let calls = required
            .calls(
                r#"[{"name": "get_time", "arguments": {}}]"#,
                CallFormat::Mistral,
            )
            .unwrap();
        assert_eq!(calls[0].function.arguments, "{}");
        let named = plan(
            tools,
            mode(json!({"type": "function", "function": {"name": "get_weather"}})),
            None,
        )
        .unwrap()
        .unwrap();
        let calls = named
            .calls(r#"{"city": "Oslo"}"#, CallFormat::Hermes)
            .unwrap();
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(named.calls(r#"{"city": "Os"#, CallFormat::Hermes), None);
    }

    #[test]
    fn streams_hold_back_what_may_become_a_call() {
        for text in ["", " [", "[TOOL_", "[TOOL_CALLS] [{", "[{\"na"] {
            assert!(CallFormat::Mistral.may_start_call(text), "{text:?}");
        }
        for text in ["Hello", "[1, 2]", "<tool_call>"] {
            assert!(!CallFormat::Mistral.may_start_call(text), "{text:?}");
        }
        assert!(CallFormat::Hermes.may_start_call("<tool"));
        assert!(!CallFormat::Hermes.may_start_call("Hi <tool_call>"));
    }
}
