//! One forward step over several sequences: their new tokens left-padded into one tensor with
//! per-row positions ([`StepBatch`]), and the [`Step`] a model runs through, which reads the
//! sequences' state and collects what the step would store.

use std::cell::RefCell;

use candle_core::{Device, Tensor};

use crate::attention::{mask, AttentionPattern};
use crate::decoder::state::kv_ring::KvRing;
use crate::decoder::state::recurrent::RecurrentState;
use crate::decoder::state::{LayerWrites, SequenceState};
use crate::error::{EngineError, Result};

/// A sequence's part of a step: its slot and the tokens it appends.
#[derive(Debug, Clone, Copy)]
pub struct StepRow<'a> {
    /// The slot the sequence owns.
    pub slot: usize,
    /// The tokens to append, at least one.
    pub tokens: &'a [u32],
}

/// A left-padded batch ready for a model's forward pass.
///
/// Row `b` holds `new_tokens[b]` real tokens at the end of its `seq_len` columns, at absolute
/// positions `starts[b] ..`. An attention layer's keys are the first
/// [`ring_len`](Self::ring_len) entries of the row's ring (what earlier steps stored) followed by
/// the `seq_len` keys of this step; [`mask`](Self::mask) says which of those each query sees.
#[derive(Debug)]
pub struct StepBatch {
    /// `[batch, seq_len]` token ids, 0 in padding.
    pub input_ids: Tensor,
    /// Row-major `[batch, seq_len]` absolute positions (0 in padding).
    pub positions: Vec<u32>,
    /// The same positions on the device, `[batch * seq_len]` u32.
    position_ids: Tensor,
    /// The slot of each row.
    pub slots: Vec<usize>,
    /// The slots on the device, `[batch]` u32.
    slot_ids: Tensor,
    /// Positions each row had processed before this step.
    pub starts: Vec<usize>,
    /// Real (unpadded) tokens in each row.
    pub new_tokens: Vec<usize>,
    /// Columns of the padded batch.
    pub seq_len: usize,
    device: Device,
    /// Masks and ring destinations, built once per step for each geometry that asks.
    memo: RefCell<Memo>,
}

#[derive(Debug, Default)]
struct Memo {
    masks: Vec<((AttentionPattern, usize), Tensor)>,
    destinations: Vec<((usize, usize), Tensor)>,
}

impl StepBatch {
    /// Builds the batch for `rows` against the current `state`.
    pub fn new(
        rows: &[StepRow],
        state: &SequenceState,
        vocab_size: usize,
        device: &Device,
    ) -> Result<Self> {
        if rows.is_empty() {
            return Err(EngineError::InvalidRequest(
                "a step needs at least one sequence".into(),
            ));
        }
        let batch = rows.len();
        let seq_len = rows.iter().map(|row| row.tokens.len()).max().unwrap_or(0);
        let mut starts = Vec::with_capacity(batch);
        for row in rows {
            if row.tokens.is_empty() {
                return Err(EngineError::InvalidRequest(
                    "a sequence step needs at least one token".into(),
                ));
            }
            if let Some(&bad) = row.tokens.iter().find(|&&t| t as usize >= vocab_size) {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {bad} is out of range for a vocabulary of {vocab_size}"
                )));
            }
            let start = state.len(row.slot)?;
            let end = start + row.tokens.len();
            if end > state.max_context() {
                return Err(EngineError::ContextOverflow {
                    tokens: end,
                    max_context: state.max_context(),
                });
            }
            starts.push(start);
        }
        if let Some((i, row)) = rows
            .iter()
            .enumerate()
            .find(|(i, row)| rows[..*i].iter().any(|other| other.slot == row.slot))
        {
            return Err(EngineError::InvalidRequest(format!(
                "slot {} appears twice in one step (row {i})",
                row.slot
            )));
        }

        let mut input_ids = vec![0u32; batch * seq_len];
        let mut positions = vec![0u32; batch * seq_len];
        let mut new_tokens = Vec::with_capacity(batch);
        for (b, row) in rows.iter().enumerate() {
            let count = row.tokens.len();
            let pad = seq_len - count;
            new_tokens.push(count);
            input_ids[b * seq_len + pad..(b + 1) * seq_len].copy_from_slice(row.tokens);
            for (column, position) in positions[b * seq_len + pad..(b + 1) * seq_len]
                .iter_mut()
                .enumerate()
            {
                *position = (starts[b] + column) as u32;
            }
        }
        let slots: Vec<usize> = rows.iter().map(|row| row.slot).collect();
        let slot_ids: Vec<u32> = slots.iter().map(|&slot| slot as u32).collect();
        Ok(Self {
            input_ids: Tensor::from_vec(input_ids, (batch, seq_len), device)?,
            position_ids: Tensor::new(positions.as_slice(), device)?,
            positions,
            slot_ids: Tensor::from_vec(slot_ids, batch, device)?,
            slots,
            starts,
            new_tokens,
            seq_len,
            device: device.clone(),
            memo: RefCell::default(),
        })
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.slots.len()
    }

    /// The positions on the device, `[batch * seq_len]` u32, row-major.
    pub fn position_ids(&self) -> &Tensor {
        &self.position_ids
    }

    /// The rows' slots on the device, `[batch]` u32.
    pub fn slot_ids(&self) -> &Tensor {
        &self.slot_ids
    }

    /// Ring entries an attention layer with a ring of `capacity` reads per row:
    /// `min(capacity, max(starts))`.
    pub fn ring_len(&self, capacity: usize) -> usize {
        self.starts.iter().copied().max().unwrap_or(0).min(capacity)
    }

    /// The additive f32 mask `[batch, 1, 1, seq_len, ring_len + seq_len]` of a layer with
    /// `pattern` over a ring of `capacity` (see [`mask::build`]); broadcasts over kv heads and
    /// the queries of one kv head. Built once per step for each pattern and capacity.
    pub fn mask(&self, pattern: AttentionPattern, capacity: usize) -> Result<Tensor> {
        let key = (pattern, capacity);
        if let Some((_, mask)) = self.memo.borrow().masks.iter().find(|(k, _)| *k == key) {
            return Ok(mask.clone());
        }
        let ring_len = self.ring_len(capacity);
        let rows = mask::RowPositions {
            starts: &self.starts,
            new_tokens: &self.new_tokens,
            seq_len: self.seq_len,
        };
        let values = mask::build(pattern, capacity, ring_len, &rows);
        let shape = (
            self.batch_size(),
            1,
            1,
            self.seq_len,
            ring_len + self.seq_len,
        );
        let mask = Tensor::from_vec(values, shape, &self.device)?;
        self.memo.borrow_mut().masks.push((key, mask.clone()));
        Ok(mask)
    }

    /// For each (row, kv head, column) of this step's keys, flattened row-major `[batch *
    /// kv_heads * seq_len, 1]`, its entry in a ring of `capacity` viewed as `[slots * kv_heads *
    /// capacity]`: `(slot * kv_heads + head) * capacity + position % capacity`, or u32::MAX
    /// (written nowhere) for padding and for positions that a later column of the same row
    /// overwrites. Built once per step for each geometry.
    pub(crate) fn ring_destinations(&self, kv_heads: usize, capacity: usize) -> Result<Tensor> {
        let key = (kv_heads, capacity);
        if let Some((_, ids)) = self
            .memo
            .borrow()
            .destinations
            .iter()
            .find(|(k, _)| *k == key)
        {
            return Ok(ids.clone());
        }
        let seq = self.seq_len;
        let mut ids = vec![u32::MAX; self.batch_size() * kv_heads * seq];
        for (b, ((&slot, &start), &count)) in self
            .slots
            .iter()
            .zip(&self.starts)
            .zip(&self.new_tokens)
            .enumerate()
        {
            // Only the last `capacity` new positions can still be seen by later queries.
            let keep = count.min(capacity);
            for head in 0..kv_heads {
                let base = (slot * kv_heads + head) * capacity;
                for column in seq - keep..seq {
                    let position = start + count - (seq - column);
                    ids[(b * kv_heads + head) * seq + column] = (base + position % capacity) as u32;
                }
            }
        }
        let len = ids.len();
        let ids = Tensor::from_vec(ids, (len, 1), &self.device)?;
        self.memo.borrow_mut().destinations.push((key, ids.clone()));
        Ok(ids)
    }
}

/// A forward step in progress: the batch, read access to the sequences' state, and the writes
/// each layer hands back, stored by the generator only when the whole step succeeds.
pub struct Step<'a> {
    batch: &'a StepBatch,
    state: &'a SequenceState,
    writes: RefCell<Vec<LayerWrites>>,
}

impl<'a> Step<'a> {
    /// A step of `batch` over `state`.
    pub fn new(batch: &'a StepBatch, state: &'a SequenceState) -> Self {
        let layers = state.spec().layers.len();
        Self {
            batch,
            state,
            writes: RefCell::new((0..layers).map(|_| LayerWrites::default()).collect()),
        }
    }

    /// The batch.
    pub fn batch(&self) -> &'a StepBatch {
        self.batch
    }

    /// Layer `layer`'s ring, as earlier steps left it.
    pub fn ring(&self, layer: usize) -> Result<&'a KvRing> {
        self.state.ring(layer).ok_or_else(|| {
            EngineError::Internal(format!("layer {layer} keeps no attention entries"))
        })
    }

    /// Layer `layer`'s recurrent state, as earlier steps left it.
    pub fn recurrent(&self, layer: usize) -> Result<&'a RecurrentState> {
        self.state
            .recurrent(layer)
            .ok_or_else(|| EngineError::Internal(format!("layer {layer} keeps no recurrent state")))
    }

    /// Hands back layer `layer`'s keys and values of this step (`[batch, kv_heads, seq, width]`).
    pub fn write_entries(&self, layer: usize, keys: Tensor, values: Tensor) -> Result<()> {
        self.layer_writes(layer, |writes| writes.entries = Some((keys, values)))
    }

    /// Hands back layer `layer`'s recurrent state after this step (`[batch, ..dims]`).
    pub fn write_recurrent(&self, layer: usize, state: Tensor) -> Result<()> {
        self.layer_writes(layer, |writes| writes.recurrent = Some(state))
    }

    fn layer_writes(&self, layer: usize, f: impl FnOnce(&mut LayerWrites)) -> Result<()> {
        let mut writes = self.writes.borrow_mut();
        let layers = writes.len();
        let writes = writes.get_mut(layer).ok_or_else(|| {
            EngineError::Internal(format!("layer {layer} of a model with {layers}"))
        })?;
        f(writes);
        Ok(())
    }

    /// The writes the layers handed back.
    pub(crate) fn into_writes(self) -> Vec<LayerWrites> {
        self.writes.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::state::{AttentionEntries, StateSpec};
    use candle_core::DType;

    fn state(max_context: usize) -> SequenceState {
        let entries = AttentionEntries {
            kv_heads: 1,
            key_width: 2,
            value_width: 2,
            pattern: AttentionPattern::Full,
        };
        SequenceState::new(
            StateSpec::uniform_attention(1, entries),
            2,
            max_context,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    }

    #[test]
    fn positions_restart_per_row_and_padding_is_zero() {
        let mut state = state(64);
        let a = state.allocate().unwrap();
        let b = state.allocate().unwrap();
        state.advance(b, 5).unwrap();
        let rows = [
            StepRow {
                slot: a,
                tokens: &[1, 2, 3],
            },
            StepRow {
                slot: b,
                tokens: &[4],
            },
        ];
        let batch = StepBatch::new(&rows, &state, 10, &Device::Cpu).unwrap();
        assert_eq!(batch.positions, vec![0, 1, 2, 0, 0, 5]);
        assert_eq!(batch.ring_len(64), 5);
        assert_eq!(batch.ring_len(3), 3);
    }

    #[test]
    fn out_of_range_tokens_and_overflow_are_refused() {
        let mut state = state(4);
        let slot = state.allocate().unwrap();
        let step =
            |tokens: &[u32]| StepBatch::new(&[StepRow { slot, tokens }], &state, 10, &Device::Cpu);
        assert!(step(&[10]).unwrap_err().to_string().contains("token id 10"));
        assert!(matches!(
            step(&[1; 5]),
            Err(EngineError::ContextOverflow {
                tokens: 5,
                max_context: 4
            })
        ));
    }
}
