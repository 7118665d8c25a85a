//! Candlewick's scheduler: the state of each sequence (sampling, stop conditions, incremental
//! text) and the loops that drive the engine's generator over batches of them.

pub mod continuous;
pub mod encoder;
pub mod runner;
pub mod sequence;

pub use continuous::{Event, Scheduler, SchedulerConfig, SchedulerStats};
pub use encoder::{EncodeResult, EncoderConfig, EncoderInfo, EncoderScheduler};
pub use runner::{run_batch, GenerationOutput};
pub use sequence::{FinishReason, GenerationRequest, Sequence, StopConditions, TokenEvent};

use candlewick_engine::detokenizer::DetokenizeError;
use candlewick_engine::grammar::GrammarError;
use candlewick_engine::sampling::SamplingError;
use candlewick_engine::EngineError;

/// What can go wrong while scheduling generation.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The engine refused or failed a step.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Sampling parameters are out of range, or the logits cannot be sampled.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// A structured output's grammar is invalid, or failed mid-generation.
    #[error(transparent)]
    Grammar(#[from] GrammarError),
    /// Generated tokens could not be turned into text.
    #[error(transparent)]
    Detokenize(#[from] DetokenizeError),
    /// A request is not valid for this model.
    #[error("{0}")]
    InvalidRequest(String),
    /// The prompt is longer than the configured limit.
    #[error("the prompt has {tokens} tokens, more than the maximum of {max} input tokens")]
    PromptTooLong { tokens: usize, max: usize },
    /// Prompt plus requested tokens exceed the configured limit.
    #[error("the prompt has {prompt} tokens and {max_new_tokens} more were requested: {} in all, more than the maximum of {max} tokens", prompt + max_new_tokens)]
    TotalTooLong {
        prompt: usize,
        max_new_tokens: usize,
        max: usize,
    },
    /// Every waiting place is taken.
    #[error("the server is busy: {max_waiting} requests are already waiting; try again later")]
    QueueFull { max_waiting: usize },
    /// The engine thread is not running (shutting down).
    #[error("the engine is shutting down")]
    Stopped,
    /// The request was still running when its time limit passed.
    #[error("the request did not finish within {} s", limit.as_secs_f64())]
    Timeout { limit: std::time::Duration },
}

impl SchedulerError {
    /// Whether the request is at fault (a 4xx), rather than the server (a 5xx) or its load.
    /// Engine and sampling errors decide for themselves.
    pub fn is_request_fault(&self) -> bool {
        match self {
            Self::Engine(error) => error.is_request_fault(),
            Self::Sampling(error) => error.is_request_fault(),
            Self::Grammar(error) => !matches!(error, GrammarError::Failed(_)),
            Self::InvalidRequest(_) | Self::PromptTooLong { .. } | Self::TotalTooLong { .. } => {
                true
            }
            Self::Detokenize(_) | Self::QueueFull { .. } | Self::Stopped | Self::Timeout { .. } => {
                false
            }
        }
    }
}

/// The scheduler's result type.
pub type Result<T> = std::result::Result<T, SchedulerError>;
