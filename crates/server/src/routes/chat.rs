//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use candlewick_engine::sampling::Sampled;
use candlewick_engine::Tokenizer;
use candlewick_scheduler::TokenEvent;

use super::JsonBody;
use crate::api::chat::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatTokenLogprob, ChatTopLogprob,
};
use crate::api::common::{finite_logprob, Usage};
use crate::error::ApiError;
use crate::generation::{self, blocking, request_id, to_json, token_text, unix_now, ChunkWriter};
use crate::state::AppState;

/// Renders the conversation with the model's chat template and generates the assistant's
/// reply, `n` choices, as JSON or as a stream.
pub async fn create(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let plan = request.validate()?;
    state.check_model(&plan.model)?;
    let (messages, options) = (plan.messages, plan.template_options);
    let rendering = Arc::clone(&state);
    let structured = plan.structured.clone();
    let (prompt, constraint) = blocking(move || {
        let text = rendering.chat_template()?.render(&messages, &options)?;
        // The template writes the special tokens (BOS) itself.
        let prompt = rendering.tokenizer.encode(&text, false)?;
        let constraint = structured
            .map(|structured| rendering.constraint(&structured))
            .transpose()?;
        Ok((prompt, constraint))
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
    let format = Format {
        id: request_id("chatcmpl"),
        created: unix_now(),
        model: state.model_name.clone(),
        n: plan.params.n,
        logprobs: plan.params.sampling.logprobs.is_some(),
        tokenizer: Arc::clone(&state.tokenizer),
        include_usage: plan.include_usage,
    };
    if plan.stream {
        return Ok(submitted.into_sse(format, plan.include_usage));
    }
    let (outputs, usage) = submitted.collect().await?;
    let choices = outputs
        .into_iter()
        .map(|output| ChatChoice {
            index: output.index,
            logprobs: format.logprobs.then(|| format.logprobs_of(&output.tokens)),
            message: AssistantMessage {
                role: "assistant",
                content: output.text,
                refusal: None,
            },
            finish_reason: output.finish.as_str(),
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
                    },
                    logprobs: None,
                    finish_reason: None,
                })
            })
            .collect()
    }

    /// Content (with the token's log-probabilities when asked for), then for the last token a
    /// chunk with an empty delta and the finish reason.
    fn token(&mut self, index: usize, token: &TokenEvent, _chars: usize) -> Vec<String> {
        let mut chunks = Vec::new();
        if !token.text.is_empty() || self.logprobs {
            chunks.push(
                self.choice_chunk(ChatChunkChoice {
                    index,
                    delta: ChatDelta {
                        role: None,
                        content: Some(token.text.clone()),
                    },
                    logprobs: self
                        .logprobs
                        .then(|| self.logprobs_of(std::slice::from_ref(&token.sampled))),
                    finish_reason: None,
                }),
            );
        }
        if let Some(finish) = token.finish {
            chunks.push(self.choice_chunk(ChatChunkChoice {
                index,
                delta: ChatDelta::default(),
                logprobs: None,
                finish_reason: Some(finish.as_str()),
            }));
        }
        chunks
    }

    fn usage(&self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(Some(usage)))
    }
}
