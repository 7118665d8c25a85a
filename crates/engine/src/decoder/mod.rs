//! Generation: the causal-LM seam, one step over a left-padded batch, the generator that owns the
//! sequences' state, and that state.

pub mod generator;
pub mod state;
pub mod step;

use candle_core::Tensor;

use crate::decoder::state::kv_ring::{CacheShape, KvCache};
use crate::decoder::step::StepBatch;
use crate::error::Result;

/// Which positions of a step the model computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// The last column only (`[batch, vocab]`): every row's newest token, since rows are
    /// left-padded. What generation needs.
    Last,
    /// Every column (`[batch, seq, vocab]`), padding included.
    All,
}

/// A decoder that generates text over the rolling KV cache.
pub trait CausalLm: Send {
    /// The cache the model needs.
    fn cache_shape(&self) -> CacheShape;
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// The context the model was trained for; the default bound of a sequence's length.
    fn max_position_embeddings(&self) -> usize;
    /// One forward step: appends the batch's tokens to their slots' caches and returns f32
    /// logits.
    fn forward(&self, batch: &StepBatch, cache: &KvCache, logits: LogitsMode) -> Result<Tensor>;
}
