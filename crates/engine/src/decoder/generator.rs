//! The generation API: prefill new sequences, decode one token per sequence, release.

use candle_core::{DType, Device, Tensor};

use crate::decoder::state::SequenceState;
use crate::decoder::step::{Step, StepBatch, StepRow};
use crate::decoder::{CausalLm, LogitsMode};
use crate::error::{EngineError, Result};

/// How a [`Generator`] sizes its state and steps.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Sequences that can be in flight at once (state slots).
    pub max_sequences: usize,
    /// Longest sequence, prompt and generated tokens together; None for the model's
    /// `max_position_embeddings`.
    pub max_context: Option<usize>,
    /// Most tokens of one sequence in one prefill step. Longer prompts are prefilled in chunks
    /// of at most this many tokens (and at most what the model's attention pattern spans and
    /// what it accepts per cached step), so that the per-step attention scores stay small.
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

/// A causal LM with the state of its sequences: the engine's generator seam.
pub struct Generator {
    model: Box<dyn CausalLm>,
    state: SequenceState,
    prefill_chunk: usize,
    device: Device,
}

impl Generator {
    /// Allocates the state of `config.max_sequences` sequences for `model` on `device`.
    pub fn new(
        model: Box<dyn CausalLm>,
        config: &GeneratorConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let max_context = config
            .max_context
            .unwrap_or_else(|| model.max_position_embeddings());
        let spec = model.state_spec();
        let narrowest_span = spec
            .layers
            .iter()
            .filter_map(|layer| layer.attention?.pattern.span())
            .min();
        let prefill_chunk = [
            Some(config.prefill_chunk.max(1)),
            narrowest_span,
            model.max_step_tokens(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(1)
        .max(1);
        let state = SequenceState::new(spec, config.max_sequences, max_context, dtype, device)?;
        Ok(Self {
            model,
            state,
            prefill_chunk,
            device: device.clone(),
        })
    }

    /// The sequences' state, for its sizes and per-slot lengths.
    pub fn state(&self) -> &SequenceState {
        &self.state
    }

    /// Number of free slots.
    pub fn free_slots(&self) -> usize {
        self.state.free_slots()
    }

    /// The longest sequence, prompt and generated tokens together, in positions.
    pub fn max_context(&self) -> usize {
        self.state.max_context()
    }

    /// Most tokens of one sequence in one prefill step.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// How many of a prompt's `remaining` tokens the next prefill step takes when the step has
    /// room for `budget` more tokens: the one rule for chunking prompts, which [`Self::prefill`]
    /// and the scheduler's steps both follow.
    pub fn next_chunk(&self, remaining: usize, budget: usize) -> usize {
        remaining.min(self.prefill_chunk).min(budget)
    }

    /// Size of the model's output vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    /// Takes a free slot for a new sequence, its recurrent state zeroed.
    pub fn allocate(&mut self) -> Result<usize> {
        self.state.allocate()
    }

    /// Frees a sequence's slot.
    pub fn release(&mut self, slot: usize) {
        self.state.release(slot)
    }

    /// One forward step appending each row's tokens to its slot; returns f32 logits
    /// (`[batch, vocab]` for [`LogitsMode::Last`], `[batch, seq, vocab]` for
    /// [`LogitsMode::All`], rows left-padded) in the order of `rows`. The step's state is stored
    /// only when the forward pass succeeds: after an error every sequence is as it was.
    pub fn step(&mut self, rows: &[StepRow], logits: LogitsMode) -> Result<Tensor> {
        // The model sees the rows in slot order, so that the device-generic attention reads
        // consecutive slots as one view of the ring.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].slot);
        let sorted: Vec<StepRow> = order.iter().map(|&i| rows[i]).collect();
        let batch = StepBatch::new(&sorted, &self.state, self.model.vocab_size(), &self.device)?;
        let step = Step::new(&batch, &self.state);
        let output = self.model.forward(&step, logits)?;
        let writes = step.into_writes();
        self.state.commit(&batch, writes)?;
        if order.iter().enumerate().all(|(i, &j)| i == j) {
            return Ok(output);
        }
        let mut back = vec![0u32; rows.len()];
        for (sorted_index, &row) in order.iter().enumerate() {
            back[row] = sorted_index as u32;
        }
        let back = Tensor::from_vec(back, rows.len(), output.device())?;
        Ok(output.index_select(&back, 0)?)
    }

    /// Prefills new prompts together, in chunks of [`Self::next_chunk`] tokens per row, and
    /// returns the logits after each prompt's last token.
    pub fn prefill(&mut self, rows: &[StepRow]) -> Result<Vec<Vec<f32>>> {
        // Check everything first, so that a bad row fails the call before any slot changes.
        for row in rows {
            if row.tokens.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "a prompt needs at least one token".into(),
                ));
            }
            let end = self.state.len(row.slot)? + row.tokens.len();
            if end > self.state.max_context() {
                return Err(EngineError::ContextOverflow {
                    tokens: end,
                    max_context: self.state.max_context(),
                });
            }
        }
        let mut last_logits = vec![Vec::new(); rows.len()];
        let mut offsets = vec![0; rows.len()];
        loop {
            let mut chunk_rows = Vec::new();
            let mut chunk_index = Vec::new();
            for (index, row) in rows.iter().enumerate() {
                let take = self.next_chunk(row.tokens.len() - offsets[index], usize::MAX);
                if take > 0 {
                    chunk_rows.push(StepRow {
                        slot: row.slot,
                        tokens: &row.tokens[offsets[index]..offsets[index] + take],
                    });
                    chunk_index.push(index);
                    offsets[index] += take;
                }
            }
            if chunk_rows.is_empty() {
                break;
            }
            let logits: Vec<Vec<f32>> = self.step(&chunk_rows, LogitsMode::Last)?.to_vec2()?;
            for (index, row_logits) in chunk_index.into_iter().zip(logits) {
                last_logits[index] = row_logits;
            }
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
