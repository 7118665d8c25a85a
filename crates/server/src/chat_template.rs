//! The model's chat template (Jinja, from tokenizer_config.json) rendered with minijinja, set up
//! as transformers' `apply_chat_template` sets up jinja2: `trim_blocks`, `lstrip_blocks`, and a
//! `raise_exception(message)` function through which templates refuse a conversation.

use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};

const TEMPLATE_NAME: &str = "chat_template";

/// Why a conversation could not be turned into a prompt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChatTemplateError {
    /// tokenizer_config.json has no `chat_template`.
    #[error("this model has no chat template (tokenizer_config.json has no chat_template); use /v1/completions")]
    Missing,
    /// The template does not compile.
    #[error("the model's chat template is not valid: {0}")]
    Invalid(String),
    /// The template called `raise_exception(message)`: the conversation is not one it accepts.
    #[error("{0}")]
    Raised(String),
    /// Rendering failed for another reason.
    #[error("the model's chat template failed: {0}")]
    Render(String),
}

/// The message of a `raise_exception` call, carried as the source of minijinja's error so that
/// it can be told apart from the template's own failures.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TemplateException(String);

/// One message, as the template sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateMessage {
    /// "system", "user", "assistant", ...
    pub role: String,
    /// The text (content parts already joined).
    pub content: String,
    /// The optional participant name.
    pub name: Option<String>,
    /// An assistant message's tool calls, `{"id", "type", "function": {"name", "arguments"}}`
    /// with the arguments as a mapping where they are JSON, as HF templates read them.
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool message's call id.
    pub tool_call_id: Option<String>,
}

/// What the template gets beside the messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateOptions {
    /// `reasoning_effort`, for templates that read it.
    pub reasoning_effort: Option<String>,
    /// `verbosity`, for templates that read it.
    pub verbosity: Option<String>,
    /// The request's tools, `[{"type": "function", "function": {...}}]`, as the `tools`
    /// variable; undefined without tools, as transformers leaves it.
    pub tools: Option<Vec<serde_json::Value>>,
}

/// A compiled chat template with the model's special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the texts the template may write.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatTemplateError::Invalid(describe(&e)))?;
        env.set_syntax(syntax);
        // Python string and dict methods (.strip(), .startswith(), .items(), ...) that Hugging
        // Face templates call.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatTemplateError::Invalid(describe(&e)))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The prompt text for `messages`, ending with the assistant's turn
    /// (`add_generation_prompt=true`).
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        options: &TemplateOptions,
    ) -> Result<String, ChatTemplateError> {
        let messages: Vec<Value> = messages.iter().map(message_value).collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Invalid(describe(&e)))?;
        let mut context = minijinja::context! {
            messages => messages,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            add_generation_prompt => true,
            reasoning_effort => options.reasoning_effort.clone(),
            verbosity => options.verbosity.clone(),
        };
        if let Some(tools) = &options.tools {
            context = minijinja::context! {
                tools => Value::from(minijinja::value::Serde(tools)),
                ..context
            };
        }
        template
            .render(context)
            .map_err(|error| match raised_message(&error) {
                Some(message) => ChatTemplateError::Raised(message),
                None => ChatTemplateError::Render(describe(&error)),
            })
    }
}

fn message_value(message: &TemplateMessage) -> Value {
    let mut map = BTreeMap::new();
    map.insert("role", Value::from(message.role.as_str()));
    map.insert("content", Value::from(message.content.as_str()));
    // Absent rather than none, so that `message.name is defined` works as in transformers.
    if let Some(name) = &message.name {
        map.insert("name", Value::from(name.as_str()));
    }
    if let Some(calls) = &message.tool_calls {
        map.insert("tool_calls", Value::from(minijinja::value::Serde(calls)));
    }
    if let Some(id) = &message.tool_call_id {
        map.insert("tool_call_id", Value::from(id.as_str()));
    }
    Value::from(map)
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
            .with_source(TemplateException(message)),
    )
}

/// The message of a `raise_exception` call somewhere in `error`'s chain of sources.
fn raised_message(error: &minijinja::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(exception) = current.downcast_ref::<TemplateException>() {
            return Some(exception.0.clone());
        }
        source = current.source();
    }
    None
}

/// minijinja's message with the template line, without its multi-line debug rendering.
fn describe(error: &minijinja::Error) -> String {
    match error.line() {
        Some(line) => format!("{} (line {line})", error.detail().unwrap_or("error")),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The template of tests/fixtures/mistral/w8-gqa2/tokenizer_config.json (Mistral-Instruct).
    fn mistral_template() -> ChatTemplate {
        let config = include_str!("../../../tests/fixtures/mistral/w8-gqa2/tokenizer_config.json");
        let config: serde_json::Value = serde_json::from_str(config).unwrap();
        let source = config["chat_template"].as_str().unwrap();
        ChatTemplate::new(source, Some("<s>"), Some("</s>")).unwrap()
    }

    fn message(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            content: content.into(),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    #[test]
    fn mistral_template_renders_user_assistant_alternation() {
        let rendered = mistral_template()
            .render(
                &[
                    message("user", "hi"),
                    message("assistant", "answer"),
                    message("user", "more"),
                ],
                &TemplateOptions::default(),
            )
            .unwrap();
        assert_eq!(
            rendered,
            "<s>[INST] hi [/INST]answer</s>[INST] more [/INST]"
        );
    }

    #[test]
    fn system_message_raises_the_templates_exception() {
        let error = mistral_template()
            .render(
                &[message("system", "be brief"), message("user", "hi")],
                &TemplateOptions::default(),
            )
            .unwrap_err();
        match error {
            ChatTemplateError::Raised(message) => assert_eq!(
                message,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("expected the template's exception, got {other:?}"),
        }
    }

    #[test]
    fn python_string_methods_and_trim_blocks_work_as_in_transformers() {
        let template = ChatTemplate::new(
            "{% for m in messages %}\n    {% if m.name is defined %}{{ m.content.strip() }}{% endif %}\n{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let rendered = template
            .render(
                &[TemplateMessage {
                    role: "user".into(),
                    content: "  padded  ".into(),
                    name: Some("ann".into()),
                    tool_calls: None,
                    tool_call_id: None,
                }],
                &TemplateOptions::default(),
            )
            .unwrap();
        assert_eq!(rendered, "padded");
    }

    #[test]
    fn tools_are_the_templates_tools_variable_and_undefined_without_them() {
        let template = ChatTemplate::new(
            "{% if tools is defined %}{% for t in tools %}[{{ t.function.name }}:{{ t.function.parameters.properties.city.type }}]{% endfor %}{% else %}none{% endif %}\
             {% for m in messages %}{% for c in m.tool_calls %}<{{ c.function.name }}({{ c.function.arguments.city }})>{% endfor %}{{ m.tool_call_id }}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let call = serde_json::json!({"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}});
        let messages = [
            TemplateMessage {
                role: "assistant".into(),
                content: String::new(),
                name: None,
                tool_calls: Some(vec![call]),
                tool_call_id: None,
            },
            TemplateMessage {
                role: "tool".into(),
                content: "sunny".into(),
                name: None,
                tool_calls: None,
                tool_call_id: Some("call_1".into()),
            },
        ];
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let options = TemplateOptions {
            tools: Some(tools.as_array().unwrap().clone()),
            ..TemplateOptions::default()
        };
        assert_eq!(
            template.render(&messages, &options).unwrap(),
            "[get_weather:string]<get_weather(Paris)>call_1"
        );
        assert_eq!(
            template
                .render(&messages, &TemplateOptions::default())
                .unwrap(),
            "none<get_weather(Paris)>call_1"
        );
    }

    #[test]
    fn template_that_does_not_compile_is_reported_as_invalid() {
        let error = ChatTemplate::new("{% for %}", None, None).err().unwrap();
        assert!(matches!(error, ChatTemplateError::Invalid(_)), "{error:?}");
    }
}
