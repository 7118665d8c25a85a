//! One sequence being generated: its sampler, its stop conditions and its incremental text.

use std::sync::Arc;

use candlewick_engine::detokenizer::IncrementalDecoder;
use candlewick_engine::grammar::Constraint;
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
    /// Texts that end the sequence; the text returned stops before the first of them, and no
    /// part of one is ever streamed.
    pub stop_strings: Vec<String>,
}

/// Why a sequence stopped, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token was generated, a stop string, or the end of the
    /// output's grammar.
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
    /// The grammar the output must match (a structured output), fresh: each choice gets its own.
    pub constraint: Option<Constraint>,
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

/// Takes from `held` the text that can no longer be part of a stop string (all of it when
/// `finishing`). A stop string found in it ends the sequence, and the text before it is released.
fn release_text(held: &mut String, stops: &[String], finishing: bool) -> Released {
    let first_stop = stops
        .iter()
        .filter(|stop| !stop.is_empty())
        .filter_map(|stop| held.find(stop.as_str()))
        .min();
    if let Some(at) = first_stop {
        held.truncate(at);
        return Released::Stopped(std::mem::take(held));
    }
    if finishing || stops.is_empty() {
        return Released::Text(std::mem::take(held));
    }
    // Keep the longest tail that some stop string starts with.
    let keep = held
        .char_indices()
        .map(|(at, _)| at)
        .find(|&at| stops.iter().any(|stop| stop.starts_with(&held[at..])))
        .unwrap_or(held.len());
    let rest = held.split_off(keep);
    Released::Text(std::mem::replace(held, rest))
}

#[derive(Debug, PartialEq)]
enum Released {
    /// Text that is safe to show.
    Text(String),
    /// A stop string was found; the text before it.
    Stopped(String),
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
    /// Decoded text not yet released because it may be the start of a stop string.
    held: String,
    /// The grammar state of a structured output.
    constraint: Option<Constraint>,
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
            decoder: tokenizer.incremental_decoder(&request.prompt)?,
            stop: request.stop.clone(),
            eos_token_ids: tokenizer.eos_token_ids().to_vec(),
            max_context,
            finish: None,
            held: String::new(),
            constraint: request.constraint.clone(),
        })
    }

    /// Samples the next token from `logits`, and says whether the sequence is done.
    ///
    /// A structured output samples among the tokens its grammar allows, and stops once the
    /// grammar is complete.
    pub fn accept(&mut self, logits: &[f32]) -> Result<TokenEvent> {
        let sampled = match &mut self.constraint {
            Some(constraint) => {
                let mask = constraint.mask()?;
                self.sampler.sample_allowed(logits, Some(mask))?
            }
            None => self.sampler.sample(logits)?,
        };
        let token = sampled.token;
        self.generated.push(token);
        let grammar_done = match &mut self.constraint {
            Some(constraint) => {
                constraint.consume(token)?;
                constraint.is_finished()
            }
            None => false,
        };
        let is_eos = self.eos_token_ids.contains(&token)
            && (!self.stop.ignore_eos || self.constraint.is_some());
        // End-of-sequence and stop tokens end the text: reported as tokens, they add no
        // characters.
        let ends_text = is_eos || self.stop.stop_token_ids.contains(&token);
        let mut finish = if ends_text || grammar_done {
            Some(FinishReason::Stop)
        } else if self.generated.len() >= self.stop.max_new_tokens
            || self.prompt_len + self.generated.len() >= self.max_context
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        if !ends_text {
            let delta = self.decoder.push(token)?.unwrap_or_default();
            self.held.push_str(&delta);
        }
        if finish.is_some() {
            let rest = self.decoder.flush()?;
            self.held.push_str(&rest);
        }
        let text = match release_text(&mut self.held, &self.stop.stop_strings, finish.is_some()) {
            Released::Text(text) => text,
            Released::Stopped(text) => {
                finish = Some(FinishReason::Stop);
                text
            }
        };
        self.finish = finish;
        Ok(TokenEvent {
            sampled,
            text,
            finish,
        })
    }

    /// Computes the grammar's mask for the next token ahead of [`Sequence::accept`], so that it
    /// can overlap the model's step.
    pub fn prepare_mask(&mut self) -> Result<()> {
        if let Some(constraint) = &mut self.constraint {
            constraint.prepare()?;
        }
        Ok(())
    }

    /// Whether the sequence is constrained by a grammar.
    pub fn is_constrained(&self) -> bool {
        self.constraint.is_some()
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

    /// Tokens of the prompt.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `deltas` one by one; returns what was released and whether a stop string ended it.
    fn stream(deltas: &[&str], stops: &[&str]) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut held = String::new();
        let mut released = Vec::new();
        for (i, delta) in deltas.iter().enumerate() {
            held.push_str(delta);
            match release_text(&mut held, &stops, i + 1 == deltas.len()) {
                Released::Text(text) => released.push(text),
                Released::Stopped(text) => {
                    released.push(text);
                    return (released, true);
                }
            }
        }
        (released, false)
    }

    #[test]
    fn a_stop_string_split_across_deltas_is_never_released() {
        let (released, stopped) = stream(&["Hello, Wor", "ld and more"], &["World"]);
        assert!(stopped);
        assert_eq!(released, vec!["Hello, ", ""]);
    }

    #[test]
    fn a_false_start_is_released_once_it_cannot_match() {
        let (released, stopped) = stream(&["ab", "c", "d"], &["cx"]);
        assert!(!stopped);
        assert_eq!(released, vec!["ab", "", "cd"]);
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (released, stopped) = stream(&["one two three"], &["three", "two"]);
        assert!(stopped);
        assert_eq!(released.concat(), "one ");
    }

    #[test]
    fn held_text_respects_character_boundaries_and_is_flushed_at_the_end() {
        let (released, stopped) = stream(&["caf\u{e9}", " \u{1F600}"], &["\u{1F600}!"]);
        assert!(!stopped);
        assert_eq!(released, vec!["caf\u{e9}", " \u{1F600}"]);
        let (released, _) = stream(&["x\u{1F600}", "y"], &["\u{1F600}!"]);
        assert_eq!(released, vec!["x", "\u{1F600}y"]);
    }
}
