//! Generation: the causal-LM seam, one step over a left-padded batch, the generator that owns the
//! sequences' state, and that state.

pub mod generator;
pub mod prefix_cache;
pub mod state;
pub mod step;

use candle_core::Tensor;

use crate::decoder::state::StateSpec;
use crate::decoder::step::Step;
use crate::error::{EngineError, Result};
use crate::layers::{QuantizeOptions, QuantizeReport};

/// Which positions of a step the model computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// The last column only (`[batch, vocab]`): every row's newest token, since rows are
    /// left-padded. What generation needs.
    Last,
    /// Every column (`[batch, seq, vocab]`), padding included.
    All,
}

/// A decoder that generates text one step at a time over state it declares.
pub trait CausalLm: Send {
    /// What each layer keeps per sequence between steps.
    fn state_spec(&self) -> StateSpec;
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// The context the model was trained for; the default bound of a sequence's length.
    fn max_position_embeddings(&self) -> usize;
    /// The most tokens of one sequence the model accepts in one cached step, when it has such a
    /// limit (a model that updates a recurrent state token by token, say); longer prompts are
    /// prefilled in chunks of at most this many.
    fn max_step_tokens(&self) -> Option<usize> {
        None
    }
    /// One forward step over `step`'s batch: reads the state through `step`, hands each layer's
    /// new state back to it, and returns f32 logits. The model writes no state itself.
    fn forward(&self, step: &Step, logits: LogitsMode) -> Result<Tensor>;
    /// Quantizes the model's linear weights in place (in-situ quantization at load). Models
    /// that do not implement it refuse.
    fn quantize(&mut self, options: &QuantizeOptions) -> Result<QuantizeReport> {
        let _ = options;
        Err(EngineError::UnsupportedConfig(
            "in-situ quantization is not implemented for this architecture".into(),
        ))
    }
}
