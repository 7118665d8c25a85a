//! The generation API: prefill new sequences, decode one token per sequence, release.

use candle_core::{Device, Tensor};

use crate::decoder::state::kv_ring::KvCache;
use crate::decoder::step::{StepBatch, StepRow};
use crate::decoder::{CausalLm, LogitsMode};
use crate::error::{EngineError, Result};

/// How a [`Generator`] sizes its cache and steps.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Sequences that can be in flight at once (KV-cache slots).
    pub max_sequences: usize,
    /// Longest sequence, prompt and generated tokens together; None for the model's
    /// `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Most tokens of one sequence in one prefill step. Longer prompts are prefilled in chunks
    /// of at most this many tokens (and at most the sliding window), so that the per-step
    /// attention scores stay small.
    pub prefill_chunk: usize,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            max_sequences: 16,
            max_context: None,
            prefill_chunk: 512,
        }
    }
}

/// A causal LM with its rolling KV cache: the engine's generator seam.
pub struct Generator {
    model: Box<dyn CausalLm>,
    cache: KvCache,
    prefill_chunk: usize,
    device: Device,
}

impl Generator {
    /// Allocates the cache for `model` on `device`.
    pub fn new(
        model: Box<dyn CausalLm>,
        config: &GeneratorConfig,
        device: &Device,
        dtype: candle_core::DType,
    ) -> Result<Self> {
        let max_context = config
            .max_context
            .unwrap_or_else(|| model.max_position_embeddings());
        let shape = model.cache_shape();
        let cache = KvCache::new(shape, config.max_sequences, max_context, dtype, device)?;
        let prefill_chunk = config
            .prefill_chunk
            .max(1)
            .min(shape.sliding_window.unwrap_or(usize::MAX));
        Ok(Self {
            model,
            cache,
            prefill_chunk,
            device: device.clone(),
        })
    }

    /// The KV cache, for its sizes and per-slot lengths.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Most tokens of one sequence in one prefill step.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// Size of the model's output vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    /// Takes a free slot for a new sequence.
    pub fn allocate(&mut self) -> Result<usize> {
        self.cache.allocate()
    }

    /// Frees a sequence's slot.
    pub fn release(&mut self, slot: usize) {
        self.cache.release(slot)
    }

    /// One forward step appending each row's tokens to its slot; returns f32 logits
    /// (`[batch, vocab]` for [`LogitsMode::Last`], `[batch, seq, vocab]` for
    /// [`LogitsMode::All`], rows left-padded).
    pub fn step(&mut self, rows: &[StepRow], logits: LogitsMode) -> Result<Tensor> {
        let batch = StepBatch::new(rows, &self.cache, self.model.vocab_size(), &self.device)?;
        let output = self.model.forward(&batch, &self.cache, logits)?;
        for row in rows {
            self.cache.advance(row.slot, row.tokens.len())?;
        }
        Ok(output)
    }

    /// Prefills new prompts together, in chunks of at most `prefill_chunk` tokens per row, and
    /// returns the logits after each prompt's last token.
    pub fn prefill(&mut self, rows: &[StepRow]) -> Result<Vec<Vec<f32>>> {
        // Check everything first, so that a bad row fails the call before any slot changes.
        for row in rows {
            if row.tokens.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "a prompt needs at least one token".into(),
                ));
            }
            let end = self.cache.len(row.slot)? + row.tokens.len();
            if end > self.cache.max_context() {
                return Err(EngineError::ContextOverflow {
                    tokens: end,
                    max_context: self.cache.max_context(),
                });
            }
        }
        let mut last_logits = vec![Vec::new(); rows.len()];
        let mut offset = 0;
        loop {
            let mut chunk_rows = Vec::new();
            let mut chunk_index = Vec::new();
            for (index, row) in rows.iter().enumerate() {
                if offset < row.tokens.len() {
                    let end = (offset + self.prefill_chunk).min(row.tokens.len());
                    chunk_rows.push(StepRow {
                        slot: row.slot,
                        tokens: &row.tokens[offset..end],
                    });
                    chunk_index.push(index);
                }
            }
            if chunk_rows.is_empty() {
                break;
            }
            let logits: Vec<Vec<f32>> = self.step(&chunk_rows, LogitsMode::Last)?.to_vec2()?;
            for (index, row_logits) in chunk_index.into_iter().zip(logits) {
                last_logits[index] = row_logits;
            }
            offset += self.prefill_chunk;
        }
        Ok(last_logits)
    }

    /// Appends one token to each `(slot, token)` sequence and returns the next-token logits.
    pub fn decode(&mut self, rows: &[(usize, u32)]) -> Result<Vec<Vec<f32>>> {
        let tokens: Vec<[u32; 1]> = rows.iter().map(|&(_, token)| [token]).collect();
        let step_rows: Vec<StepRow> = rows
            .iter()
            .zip(&tokens)
            .map(|(&(slot, _), token)| StepRow {
                slot,
                tokens: token,
            })
            .collect();
        Ok(self.step(&step_rows, LogitsMode::Last)?.to_vec2()?)
    }
}
