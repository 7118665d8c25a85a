//! Candlewick's scheduler: the state of each sequence (sampling, stop conditions, incremental
//! text) and the loops that drive the engine's generator over batches of them.

pub mod runner;
pub mod sequence;

pub use runner::{run_batch, GenerationOutput};
pub use sequence::{FinishReason, GenerationRequest, Sequence, StopConditions, TokenEvent};

use candlewick_engine::detokenizer::DetokenizeError;
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
    /// Generated tokens could not be turned into text.
    #[error(transparent)]
    Detokenize(#[from] DetokenizeError),
    /// A request is not valid for this model.
    #[error("{0}")]
    InvalidRequest(String),
}

/// The scheduler's result type.
pub type Result<T> = std::result::Result<T, SchedulerError>;
