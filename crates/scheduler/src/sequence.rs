//! One sequence being generated: its sampler, its stop conditions and its incremental text.

use std::sync::Arc;

use candlewick_engine::detokenizer::IncrementalDecoder;
use candlewick_engine::sampling::{Sampled, Sampler, SamplingParams};

use crate::{Result, SchedulerError};

/// When a sequence stops, besides running out of context.
#[derive(Debug, Clone, Default)]
pub struct StopConditions {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Tokens that end the sequence besides the model's end-of-sequence tokens; they are part of
    /// the output ids but not of its text.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// Why a sequence stopped, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token was generated.
    Stop,
    /// `max_new_tokens` were generated or the context is full.
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A prompt to continue and how.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The prompt's token ids, special tokens included.
    pub prompt: Vec<u32>,
    /// How to choose each token.
    pub sampling: SamplingParams,
    /// When to stop.
    pub stop: StopConditions,
}

/// What one generated token adds to a sequence.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// The token and its log-probabilities.
    pub sampled: Sampled,
    /// New text: possibly empty while a character is incomplete, never half a character.
    pub text: String,
    /// Set on the sequence's last token.
    pub finish: Option<FinishReason>,
}

/// A sequence in flight.
pub struct Sequence {
    /// The KV-cache slot it owns.
    pub slot: usize,
    prompt_len: usize,
    generated: Vec<u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder<Arc<tokenizers::Tokenizer>>,
    stop: StopConditions,
    eos_token_ids: Vec<u32>,
    max_context: usize,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// Starts a sequence for `request` in `slot`. `max_context` bounds prompt plus generation.
    pub fn new(
        slot: usize,
        request: &GenerationRequest,
        tokenizer: &candlewick_engine::Tokenizer,
        vocab_size: usize,
        max_context: usize,
    ) -> Result<Self> {
        if request.prompt.is_empty() {
            return Err(SchedulerError::InvalidRequest("the prompt is empty".into()));
        }
        if request.prompt.len() >= max_context {
            return Err(SchedulerError::InvalidRequest(format!(
                "the prompt has {} tokens, and the maximum context is {max_context} tokens \
                 (prompt and at least one generated token)",
                request.prompt.len()
            )));
        }
        request.sampling.validate(vocab_size)?;
        Ok(Self {
            slot,
            prompt_len: request.prompt.len(),
            generated: Vec::new(),
            sampler: Sampler::new(request.sampling.clone(), &request.prompt)?,
            decoder: IncrementalDecoder::new(tokenizer.shared(), &request.prompt)?,
            stop: request.stop.clone(),
            eos_token_ids: tokenizer.eos_token_ids().to_vec(),
            max_context,
            finish: None,
        })
    }

    /// Samples the next token from `logits`, and says whether the sequence is done.
    pub fn accept(&mut self, logits: &[f32]) -> Result<TokenEvent> {
        let sampled = self.sampler.sample(logits)?;
        let token = sampled.token;
        self.generated.push(token);
        let is_eos = !self.stop.ignore_eos && self.eos_token_ids.contains(&token);
        let finish = if is_eos || self.stop.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if self.generated.len() >= self.stop.max_new_tokens
            || self.prompt_len + self.generated.len() >= self.max_context
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        // Stop tokens end the text: they are reported as tokens but add no characters.
        let mut text = if finish == Some(FinishReason::Stop) {
            String::new()
        } else {
            self.decoder.push(token)?.unwrap_or_default()
        };
        if finish.is_some() {
            text.push_str(&self.decoder.flush()?);
        }
        self.finish = finish;
        Ok(TokenEvent {
            sampled,
            text,
            finish,
        })
    }

    /// The last generated token, to feed to the next decode step.
    pub fn last_token(&self) -> Option<u32> {
        self.generated.last().copied()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Set once the sequence is done.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }
}
