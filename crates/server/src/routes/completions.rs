//! `POST /v1/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use candlewick_engine::sampling::Sampled;
use candlewick_engine::Tokenizer;
use candlewick_scheduler::TokenEvent;

use super::JsonBody;
use crate::api::common::{finite_logprob, TopLogprobs, Usage};
use crate::api::completions::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, PromptInput,
};
use crate::error::ApiError;
use crate::generation::{self, blocking, request_id, to_json, token_text, unix_now, ChunkWriter};
use crate::state::Served;

/// Continues one or more prompts, `n` choices each, as JSON or as a stream.
pub async fn create(
    State(served): State<Arc<Served>>,
    JsonBody(request): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    let plan = request.validate()?;
    let state = served.get(&plan.model)?;
    let scheduler = state.generator()?;
    let echo = plan.echo;
    let prompts = plan.prompts;
    let tokenizer = Arc::clone(&state.tokenizer);
    let compiling = Arc::clone(state);
    let structured = plan.structured;
    let (ids, echoes, constraint) = blocking(move || {
        let (ids, echoes) = tokenize(&tokenizer, prompts, echo)?;
        Ok((ids, echoes, compiling.constraint(structured.as_ref())?))
    })
    .await?;
    let submitted =
        generation::submit(scheduler, &ids, &plan.params, constraint.as_ref(), "prompt")?;
    let format = Format {
        id: request_id("cmpl"),
        created: unix_now(),
        model: state.model_name.clone(),
        echoes,
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
        .map(|output| {
            let echo = format.echo(output.index);
            let logprobs = format.logprobs.then(|| {
                let offsets = output.text_offsets.iter().map(|o| o + echo.chars().count());
                format.logprobs_of(output.tokens.iter().zip(offsets))
            });
            CompletionChoice {
                text: format!("{echo}{}", output.text),
                index: output.index,
                logprobs,
                finish_reason: Some(output.finish.as_str()),
            }
        })
        .collect();
    Ok(Json(format.response(choices, Some(Some(usage)))).into_response())
}

/// Token ids of each prompt, and with `echo`, the text to echo for each.
fn tokenize(
    tokenizer: &Tokenizer,
    prompts: Vec<PromptInput>,
    echo: bool,
) -> Result<(Vec<Vec<u32>>, Vec<String>), ApiError> {
    let mut ids = Vec::with_capacity(prompts.len());
    let mut echoes = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        match prompt {
            PromptInput::Text(text) => {
                ids.push(tokenizer.encode(&text, true)?);
                echoes.push(if echo { text } else { String::new() });
            }
            PromptInput::Tokens(tokens) => {
                echoes.push(if echo {
                    tokenizer.decode(&tokens, true)?
                } else {
                    String::new()
                });
                ids.push(tokens);
            }
        }
    }
    Ok((ids, echoes))
}

/// How this request's responses and chunks look.
struct Format {
    id: String,
    created: u64,
    model: String,
    /// Per prompt: the text echoed before each of its choices (empty without echo).
    echoes: Vec<String>,
    n: usize,
    logprobs: bool,
    tokenizer: Arc<Tokenizer>,
    include_usage: bool,
}

impl Format {
    fn echo(&self, choice: usize) -> &str {
        self.echoes
            .get(choice / self.n.max(1))
            .map_or("", String::as_str)
    }

    fn response(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Option<Usage>>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn chunk(&self, choice: CompletionChoice) -> String {
        let usage = self.include_usage.then_some(None);
        to_json(&self.response(vec![choice], usage))
    }

    /// The legacy lists for `tokens`, each with its offset in the returned text. The sampled
    /// token is always among its alternatives, as OpenAI does (so up to logprobs + 1 entries).
    fn logprobs_of<'a>(
        &self,
        tokens: impl Iterator<Item = (&'a Sampled, usize)>,
    ) -> CompletionLogprobs {
        let mut logprobs = CompletionLogprobs::default();
        for (sampled, offset) in tokens {
            let text = token_text(&self.tokenizer, sampled.token);
            let mut top = TopLogprobs::default();
            for &(token, logprob) in &sampled.top_logprobs {
                top.push(token_text(&self.tokenizer, token), logprob);
            }
            top.push(text.clone(), sampled.logprob);
            logprobs.tokens.push(text);
            logprobs
                .token_logprobs
                .push(finite_logprob(sampled.logprob));
            logprobs.top_logprobs.push(top);
            logprobs.text_offset.push(offset);
        }
        logprobs
    }
}

impl ChunkWriter for Format {
    fn opening(&mut self) -> Vec<String> {
        let choices = self.echoes.len() * self.n;
        (0..choices)
            .filter(|&index| !self.echo(index).is_empty())
            .map(|index| {
                self.chunk(CompletionChoice {
                    text: self.echo(index).to_string(),
                    index,
                    logprobs: None,
                    finish_reason: None,
                })
            })
            .collect()
    }

    fn token(&mut self, index: usize, token: &TokenEvent, chars: usize) -> Vec<String> {
        if token.text.is_empty() && !self.logprobs && token.finish.is_none() {
            return Vec::new();
        }
        let offset = self.echo(index).chars().count() + chars;
        let logprobs = self
            .logprobs
            .then(|| self.logprobs_of(std::iter::once((&token.sampled, offset))));
        vec![self.chunk(CompletionChoice {
            text: token.text.clone(),
            index,
            logprobs,
            finish_reason: token.finish.map(|finish| finish.as_str()),
        })]
    }

    fn usage(&self, usage: Usage) -> String {
        to_json(&self.response(Vec::new(), Some(Some(usage))))
    }
}
