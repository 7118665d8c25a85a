//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use candlewick_engine::sampling::Sampled;
use candlewick_engine::Tokenizer;
use candlewick_scheduler::{FinishReason, TokenEvent};

use super::JsonBody;
use crate::api::chat::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatTokenLogprob, ChatTopLogprob,
    ToolCallDelta,
};
use crate::api::common::{finite_logprob, Usage};
use crate::error::ApiError;
use crate::generation::{self, blocking, request_id, to_json, token_text, unix_now, ChunkWriter};
use crate::state::Served;
use crate::tools::{CallFormat, ToolMode, ToolPlan};

/// Renders the conversation with the model's chat template and generates the assistant's
/// reply, `n` choices, as JSON or as a stream.
pub async fn create(
    State(served): State<Arc<Served>>,
    JsonBody(request): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let plan = request.validate()?;
    let state = served.get(&plan.model)?;
    let (messages, options) = (plan.messages, plan.template_options);
    let rendering = Arc::clone(state);
    let structured = plan.structured;
    let (prompt, constraint) = blocking(move || {
        let text = rendering.chat_template()?.render(&messages, &options)?;
        // The template writes the special tokens (BOS) itself.
        let prompt = rendering.tokenizer.encode(&text, false)?;
        Ok((prompt, rendering.constraint(structured.as_ref())?))
    })
    .await?;
    let prompts = [prompt];
    let submitted = generation::submit(
        state.generator()?,
        &prompts,
        &plan.params,
        constraint.as_ref(),
        "messages",
    )?;
    let tools = plan.tools.map(|tools| {
        (
            tools,
            CallFormat::of_template(state.tokenizer.chat_template()),
        )
    });
    let n = plan.params.n;
    let format = Format {
        id: request_id("chatcmpl"),
        created: unix_now(),
        model: state.model_name.clone(),
        n,
        logprobs: plan.params.sampling.logprobs.is_some(),
        tokenizer: Arc::clone(&state.tokenizer),
        include_usage: plan.include_usage,
        tools,
        held: vec![Held::default(); n],
    };
    if plan.stream {
        return Ok(submitted.into_sse(format, plan.include_usage));
    }
    let (outputs, usage) = submitted.collect().await?;
    let choices = outputs
        .into_iter()
        .map(|output| {
            let calls = format
                .tools
                .as_ref()
                .and_then(|(tools, call_format)| tools.calls(&output.text, *call_format));
            ChatChoice {
                index: output.index,
                logprobs: format.logprobs.then(|| format.logprobs_of(&output.tokens)),
                finish_reason: if calls.is_some() {
                    "tool_calls"
                } else {
                    output.finish.as_str()
                },
                message: AssistantMessage {
                    role: "assistant",
                    content: if calls.is_some() {
                        None
                    } else {
                        Some(output.text)
                    },
                    refusal: None,
                    tool_calls: calls,
                },
            }
        })
        .collect();
    Ok(Json(ChatCompletionResponse {
        id: format.id,
        object: "chat.completion",
        created: format.created,
        model: format.model,
        choices,
        usage,
    })
    .into_response())
}

/// How this request's responses and chunks look.
struct Format {
    id: String,
    created: u64,
    model: String,
    n: usize,
    logprobs: bool,
    tokenizer: Arc<Tokenizer>,
    include_usage: bool,
    /// The request's tools and the format the template writes calls in.
    tools: Option<(ToolPlan, CallFormat)>,
    /// Per choice: what a stream holds back while it may still be a tool call.
    held: Vec<Held>,
}

/// A choice's start, held back while it may be a tool call.
#[derive(Debug, Clone, Default)]
struct Held {
    text: String,
    tokens: Vec<Sampled>,
    /// Once the reply is known to be text, it streams as usual.
    released: bool,
}

impl Format {
    fn logprob(&self, token: u32, logprob: f32) -> ChatTopLogprob {
        let text = token_text(&self.tokenizer, token);
        ChatTopLogprob {
            bytes: text.as_bytes().to_vec(),
            token: text,
            logprob: finite_logprob(logprob),
        }
    }

    fn logprobs_of(&self, tokens: &[Sampled]) -> ChatLogprobs {
        ChatLogprobs {
            content: tokens
                .iter()
                .map(|sampled| {
                    let chosen = self.logprob(sampled.token, sampled.logprob);
                    ChatTokenLogprob {
                        token: chosen.token,
                        logprob: chosen.logprob,
                        bytes: chosen.bytes,
                        top_logprobs: sampled
                            .top_logprobs
                            .iter()
                            .map(|&(token, logprob)| self.logprob(token, logprob))
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Option<Usage>>) -> String {
        to_json(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn choice_chunk(&self, choice: ChatChunkChoice) -> String {
        self.chunk(vec![choice], self.include_usage.then_some(None))
    }
}

impl ChunkWriter for Format {
    /// Each choice starts with the assistant's role and empty content.
    fn opening(&mut self) -> Vec<String> {
        (0..self.n)
            .map(|index| {
                self.choice_chunk(ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                        tool_calls: None,
                    },
                    logprobs: None,
                    finish_reason: None,
                })
            })
            .collect()
    }

    /// Content (with the token's log-probabilities when asked for), then for the last token a
    /// chunk with an empty delta and the finish reason. With tools, a reply that is (or may
    /// still become) a tool call is held back, and sent whole when it ends: as the calls, or as
    /// content when it turns out to be text.
    fn token(&mut self, index: usize, token: &TokenEvent, _chars: usize) -> Vec<String> {
        if let Some(chunks) = self.tool_chunks(index, token) {
            return chunks;
        }
        self.content_chunks(
            index,
            token.text.clone(),
            std::slice::from_ref(&token.sampled),
            token.finish,
        )
    }

    fn usage(&self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(Some(usage)))
    }
}

impl Format {
    /// The chunks of a token while the reply may be a tool call; `None` once it streams as text.
    fn tool_chunks(&mut self, index: usize, token: &TokenEvent) -> Option<Vec<String>> {
        let (tools, call_format) = self.tools.as_ref()?;
        let held = self.held.get_mut(index)?;
        if held.released {
            return None;
        }
        held.text.push_str(&token.text);
        held.tokens.push(token.sampled.clone());
        let undecided = match tools.mode {
            ToolMode::Auto => call_format.may_start_call(&held.text),
            ToolMode::Required | ToolMode::Named(_) => true,
        };
        if token.finish.is_none() && undecided {
            return Some(Vec::new());
        }
        let calls = token
            .finish
            .and_then(|_| tools.calls(&held.text, *call_format));
        let held = std::mem::take(held);
        self.held[index].released = true;
        let Some(calls) = calls else {
            return Some(self.content_chunks(index, held.text, &held.tokens, token.finish));
        };
        let tool_calls = calls
            .into_iter()
            .enumerate()
            .map(|(index, call)| ToolCallDelta { index, call })
            .collect();
        Some(vec![
            self.choice_chunk(ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: None,
                    content: None,
                    tool_calls: Some(tool_calls),
                },
                logprobs: self.logprobs.then(|| self.logprobs_of(&held.tokens)),
                finish_reason: None,
            }),
            self.choice_chunk(ChatChunkChoice {
                index,
                delta: ChatDelta::default(),
                logprobs: None,
                finish_reason: Some("tool_calls"),
            }),
        ])
    }

    fn content_chunks(
        &self,
        index: usize,
        text: String,
        tokens: &[Sampled],
        finish: Option<FinishReason>,
    ) -> Vec<String> {
        let mut chunks = Vec::new();
        if !text.is_empty() || self.logprobs {
            chunks.push(self.choice_chunk(ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role: None,
                    content: Some(text),
                    tool_calls: None,
                },
                logprobs: self.logprobs.then(|| self.logprobs_of(tokens)),
                finish_reason: None,
            }));
        }
        if let Some(finish) = finish {
            chunks.push(self.choice_chunk(ChatChunkChoice {
                index,
                delta: ChatDelta::default(),
                logprobs: None,
                finish_reason: Some(finish.as_str()),
            }));
        }
        chunks
    }
}
