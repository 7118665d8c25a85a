//! `POST /v1/completions`: OpenAI's legacy completions request and response.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::common::{
    include_usage, refuse_if_present, GenerationParams, ResponseFormat, SamplingFields, StopSpec,
    StreamOptions, StructuredFields, StructuredOutput, TopLogprobs, Usage,
};
use crate::error::ApiError;

/// Most alternatives `logprobs` may ask for, as in OpenAI's API.
pub const MAX_COMPLETION_LOGPROBS: i64 = 5;
/// `max_tokens` when the request does not say, as in OpenAI's API.
pub const DEFAULT_MAX_TOKENS: i64 = 16;

/// The request body. Unknown fields are refused, and so are known ones this server does not
/// implement, rather than silently ignored.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub suffix: Option<Value>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub stop: Option<StopSpec>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub best_of: Option<i64>,
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub seed: Option<i64>,
    /// An end-user identifier; accepted and not used.
    pub user: Option<String>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    /// Extensions for structured outputs: chat's `response_format`, and vLLM's names.
    pub response_format: Option<ResponseFormat>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// `prompt`: text or token ids, one prompt or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids or a list of lists of token ids"
)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// One prompt before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Encoded with the tokenizer's special tokens (BOS for Mistral).
    Text(String),
    /// Used as given.
    Tokens(Vec<u32>),
}

/// A checked completions request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionPlan {
    pub model: String,
    pub prompts: Vec<PromptInput>,
    pub params: GenerationParams,
    /// The grammar each choice must match.
    pub structured: Option<StructuredOutput>,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
}

impl CompletionRequest {
    /// Checks every field, refusing what this server does not implement.
    pub fn validate(self) -> Result<CompletionPlan, ApiError> {
        refuse_if_present("suffix", &self.suffix, "insertion is not implemented")?;
        let n = self.n.unwrap_or(1);
        if let Some(best_of) = self.best_of {
            if best_of != n {
                return Err(ApiError::invalid(
                    "best_of",
                    format!("best_of is not supported unless it equals n ({n}), got {best_of}"),
                ));
            }
        }
        let logprobs = match self.logprobs {
            None => None,
            Some(k @ 0..=MAX_COMPLETION_LOGPROBS) => Some(k as usize),
            Some(k) => {
                return Err(ApiError::invalid(
                    "logprobs",
                    format!("logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}, got {k}"),
                ))
            }
        };
        let echo = self.echo.unwrap_or(false);
        if echo && logprobs.is_some() {
            return Err(ApiError::invalid(
                "echo",
                "echo together with logprobs is not supported: log-probabilities of prompt tokens are not computed",
            ));
        }
        let stream = self.stream.unwrap_or(false);
        let include_usage = include_usage(stream, &self.stream_options)?;
        let prompts: Vec<PromptInput> = match self.prompt {
            Prompt::Text(text) => vec![PromptInput::Text(text)],
            Prompt::Texts(texts) => texts.into_iter().map(PromptInput::Text).collect(),
            Prompt::Tokens(ids) => vec![PromptInput::Tokens(ids)],
            Prompt::TokenLists(lists) => lists.into_iter().map(PromptInput::Tokens).collect(),
        };
        if prompts.is_empty() {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must not be an empty list",
            ));
        }
        if prompts
            .iter()
            .any(|p| matches!(p, PromptInput::Tokens(ids) if ids.is_empty()))
        {
            return Err(ApiError::invalid(
                "prompt",
                "a token-id prompt must not be empty",
            ));
        }
        let params = SamplingFields {
            max_tokens: Some(self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
            max_tokens_param: "max_tokens",
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
        let structured = StructuredFields {
            response_format: self.response_format,
            guided_json: self.guided_json,
            guided_regex: self.guided_regex,
            guided_choice: self.guided_choice,
            guided_grammar: self.guided_grammar,
        }
        .validate()?;
        Ok(CompletionPlan {
            model: self.model,
            prompts,
            params,
            structured,
            stream,
            include_usage,
            echo,
        })
    }
}

/// The response, and with one choice each, a streamed chunk.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// Always "text_completion", streamed or not, as OpenAI sends it.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Absent from chunks unless usage is streamed; then null in all but the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice, or in a chunk, one choice's delta.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct CompletionChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy log-probability lists, one entry per generated token.
#[derive(Debug, Clone, Default, Serialize, JsonSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<TopLogprobs>,
    /// Character offset of each token's text in the returned text (echoed prompt included).
    pub text_offset: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<CompletionPlan, ApiError> {
        serde_json::from_str::<CompletionRequest>(json)
            .map_err(|e| ApiError::MalformedRequest(e.to_string()))?
            .validate()
    }

    fn refused(json: &str) -> (String, Option<&'static str>) {
        let error = parse(json).unwrap_err();
        (error.to_string(), error.param())
    }

    #[test]
    fn minimal_request_gets_openais_defaults() {
        let plan = parse(r#"{"model": "m", "prompt": "hi"}"#).unwrap();
        assert_eq!(plan.prompts, [PromptInput::Text("hi".into())]);
        assert_eq!(plan.params.max_tokens, Some(16));
        assert_eq!(plan.params.n, 1);
        assert_eq!(plan.params.sampling.temperature, 1.0);
        assert!(!plan.stream && !plan.echo && !plan.include_usage);
    }

    #[test]
    fn every_prompt_shape_is_accepted() {
        let prompts = |json: &str| parse(json).unwrap().prompts;
        assert_eq!(
            prompts(r#"{"model": "m", "prompt": ["a", "b"]}"#),
            [PromptInput::Text("a".into()), PromptInput::Text("b".into())]
        );
        assert_eq!(
            prompts(r#"{"model": "m", "prompt": [1, 382]}"#),
            [PromptInput::Tokens(vec![1, 382])]
        );
        assert_eq!(
            prompts(r#"{"model": "m", "prompt": [[1], [1, 2]]}"#),
            [
                PromptInput::Tokens(vec![1]),
                PromptInput::Tokens(vec![1, 2])
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let (message, _) = refused(r#"{"model": "m", "prompt": "hi", "temprature": 1}"#);
        assert!(message.contains("unknown field `temprature`"), "{message}");
    }

    #[test]
    fn malformed_prompts_are_refused() {
        let (message, _) = refused(r#"{"model": "m", "prompt": {"text": "hi"}}"#);
        assert!(message.contains("a string, a list of strings"), "{message}");
        assert_eq!(refused(r#"{"model": "m", "prompt": []}"#).1, Some("prompt"));
        assert_eq!(
            refused(r#"{"model": "m", "prompt": [[]]}"#).1,
            Some("prompt")
        );
    }

    #[test]
    fn unsupported_fields_are_refused_not_ignored() {
        assert_eq!(
            refused(r#"{"model": "m", "prompt": "hi", "suffix": "x"}"#).1,
            Some("suffix")
        );
        assert_eq!(
            refused(r#"{"model": "m", "prompt": "hi", "best_of": 3}"#).1,
            Some("best_of")
        );
        let (message, param) =
            refused(r#"{"model": "m", "prompt": "hi", "echo": true, "logprobs": 1}"#);
        assert_eq!(param, Some("echo"));
        assert!(message.contains("prompt tokens"), "{message}");
        // Null and the values that change nothing are fine.
        assert!(
            parse(r#"{"model": "m", "prompt": "hi", "suffix": null, "best_of": 2, "n": 2}"#)
                .is_ok()
        );
    }

    #[test]
    fn logprobs_are_bounded_to_five() {
        assert_eq!(
            refused(r#"{"model": "m", "prompt": "hi", "logprobs": 6}"#).1,
            Some("logprobs")
        );
        let plan = parse(r#"{"model": "m", "prompt": "hi", "logprobs": 5}"#).unwrap();
        assert_eq!(plan.params.sampling.logprobs, Some(5));
        let plan = parse(r#"{"model": "m", "prompt": "hi", "logprobs": 0}"#).unwrap();
        assert_eq!(plan.params.sampling.logprobs, Some(0));
    }

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        let plan = parse(r#"{"model": "m", "prompt": "hi", "stop": "\n"}"#).unwrap();
        assert_eq!(plan.params.stop_strings, ["\n"]);
        let plan = parse(r#"{"model": "m", "prompt": "hi", "stop": ["a", "b"]}"#).unwrap();
        assert_eq!(plan.params.stop_strings, ["a", "b"]);
    }

    #[test]
    fn extensions_and_user_are_accepted() {
        let plan = parse(
            r#"{"model": "m", "prompt": "hi", "user": "u1", "top_k": 5, "min_p": 0.1,
                "repetition_penalty": 1.1, "ignore_eos": true, "seed": 7, "logit_bias": {"3": -100}}"#,
        )
        .unwrap();
        assert_eq!(plan.params.sampling.top_k, Some(5));
        assert_eq!(plan.params.sampling.min_p, 0.1);
        assert_eq!(plan.params.sampling.seed, Some(7));
        assert!(plan.params.ignore_eos);
    }
}
