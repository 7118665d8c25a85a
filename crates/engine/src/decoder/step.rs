//! One forward step over several sequences: their new tokens left-padded into one tensor, with
//! per-row positions and a per-row mask over the rolling cache.

use candle_core::{Device, Tensor};

use crate::decoder::state::kv_ring::KvCache;
use crate::error::{EngineError, Result};

/// A sequence's part of a step: its slot and the tokens it appends.
#[derive(Debug, Clone, Copy)]
pub struct StepRow<'a> {
    /// The KV-cache slot the sequence owns.
    pub slot: usize,
    /// The tokens to append, at least one.
    pub tokens: &'a [u32],
}

/// A left-padded batch ready for a model's forward pass.
///
/// Row `b` holds `new_tokens[b]` real tokens at the end of its `seq_len` columns, at absolute
/// positions `starts[b] ..`. The keys each query attends to are the first `ring_len` entries of
/// its slot's ring (what earlier steps wrote) followed by the `seq_len` keys of this step; `mask`
/// says which of those each query may see.
#[derive(Debug)]
pub struct StepBatch {
    /// `[batch, seq_len]` token ids, 0 in padding.
    pub input_ids: Tensor,
    /// Row-major `[batch, seq_len]` absolute positions (0 in padding).
    pub positions: Vec<u32>,
    /// The slot of each row.
    pub slots: Vec<usize>,
    /// Positions each row had processed before this step.
    pub starts: Vec<usize>,
    /// Real (unpadded) tokens in each row.
    pub new_tokens: Vec<usize>,
    /// Columns of the padded batch.
    pub seq_len: usize,
    /// Ring entries read per row: `min(capacity, max(starts))`.
    pub ring_len: usize,
    /// Additive f32 mask `[batch, 1, 1, seq_len, ring_len + seq_len]`: 0 where a query may see
    /// a key, -inf elsewhere. Broadcasts over (kv_heads, queries per kv head).
    pub mask: Tensor,
}

impl StepBatch {
    /// Builds the batch for `rows` against the current state of `cache`.
    pub fn new(
        rows: &[StepRow],
        cache: &KvCache,
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
            let start = cache.len(row.slot)?;
            let end = start + row.tokens.len();
            if end > cache.max_context() {
                return Err(EngineError::ContextOverflow {
                    tokens: end,
                    max_context: cache.max_context(),
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

        let capacity = cache.capacity();
        let window = cache.shape().sliding_window.unwrap_or(usize::MAX);
        let ring_len = starts.iter().copied().max().unwrap_or(0).min(capacity);
        let key_len = ring_len + seq_len;

        let mut input_ids = vec![0u32; batch * seq_len];
        let mut positions = vec![0u32; batch * seq_len];
        let mut mask = vec![f32::NEG_INFINITY; batch * seq_len * key_len];
        let mut new_tokens = Vec::with_capacity(batch);
        for (b, row) in rows.iter().enumerate() {
            let count = row.tokens.len();
            let pad = seq_len - count;
            let start = starts[b];
            new_tokens.push(count);
            input_ids[b * seq_len + pad..(b + 1) * seq_len].copy_from_slice(row.tokens);
            for t in 0..seq_len {
                let mask_row =
                    &mut mask[(b * seq_len + t) * key_len..(b * seq_len + t + 1) * key_len];
                if t < pad {
                    // A padding query sees only itself, so that its softmax stays finite; its
                    // output is never used.
                    mask_row[ring_len + t] = 0.0;
                    continue;
                }
                let position = start + t - pad;
                positions[b * seq_len + t] = position as u32;
                // Keys at positions p - W + 1 ..= p are visible (saturating for W = none).
                let visible = |key_position: usize| key_position.saturating_add(window) > position;
                for (index, slot) in mask_row[..ring_len].iter_mut().enumerate() {
                    if cache.position_at(index, start).is_some_and(visible) {
                        *slot = 0.0;
                    }
                }
                for key_col in pad..=t {
                    if visible(start + key_col - pad) {
                        mask_row[ring_len + key_col] = 0.0;
                    }
                }
            }
        }
        Ok(Self {
            input_ids: Tensor::from_vec(input_ids, (batch, seq_len), device)?,
            positions,
            slots: rows.iter().map(|row| row.slot).collect(),
            starts,
            new_tokens,
            seq_len,
            ring_len,
            mask: Tensor::from_vec(mask, (batch, 1, 1, seq_len, key_len), device)?,
        })
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::state::kv_ring::CacheShape;
    use candle_core::DType;

    fn visible(batch: &StepBatch) -> Vec<Vec<Vec<bool>>> {
        let mask: Vec<f32> = batch.mask.flatten_all().unwrap().to_vec1().unwrap();
        let keys = batch.ring_len + batch.seq_len;
        mask.chunks(keys * batch.seq_len)
            .map(|row| {
                row.chunks(keys)
                    .map(|q| q.iter().map(|&m| m == 0.0).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn decode_sees_exactly_the_last_window_of_positions() {
        let shape = CacheShape {
            num_layers: 1,
            kv_heads: 1,
            head_dim: 2,
            sliding_window: Some(3),
        };
        let mut cache = KvCache::new(shape, 1, 64, DType::F32, &Device::Cpu).unwrap();
        let slot = cache.allocate().unwrap();
        cache.advance(slot, 7).unwrap(); // positions 0..=6 processed; ring holds 4, 5, 6
        let batch =
            StepBatch::new(&[StepRow { slot, tokens: &[5] }], &cache, 10, &Device::Cpu).unwrap();
        assert_eq!(batch.positions, vec![7]);
        // Query at 7 sees 5, 6 (ring indexes 2 and 0) and itself; 4 (ring index 1) is too old.
        assert_eq!(visible(&batch)[0][0], vec![true, false, true, true]);
    }

    #[test]
    fn left_padding_is_masked_and_positions_restart_per_row() {
        let shape = CacheShape {
            num_layers: 1,
            kv_heads: 1,
            head_dim: 2,
            sliding_window: None,
        };
        let mut cache = KvCache::new(shape, 2, 64, DType::F32, &Device::Cpu).unwrap();
        let a = cache.allocate().unwrap();
        let b = cache.allocate().unwrap();
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
        let batch = StepBatch::new(&rows, &cache, 10, &Device::Cpu).unwrap();
        assert_eq!(batch.positions, vec![0, 1, 2, 0, 0, 0]);
        let v = visible(&batch);
        assert_eq!(v[0][2], vec![true, true, true]);
        assert_eq!(v[1][2], vec![false, false, true]);
        assert_eq!(
            v[1][0],
            vec![true, false, false],
            "padding sees only itself"
        );
    }

    #[test]
    fn out_of_range_tokens_and_overflow_are_refused() {
        let shape = CacheShape {
            num_layers: 1,
            kv_heads: 1,
            head_dim: 2,
            sliding_window: None,
        };
        let mut cache = KvCache::new(shape, 1, 4, DType::F32, &Device::Cpu).unwrap();
        let slot = cache.allocate().unwrap();
        let too_big = StepBatch::new(
            &[StepRow {
                slot,
                tokens: &[10],
            }],
            &cache,
            10,
            &Device::Cpu,
        );
        assert!(too_big.unwrap_err().to_string().contains("token id 10"));
        let too_long = StepBatch::new(
            &[StepRow {
                slot,
                tokens: &[1; 5],
            }],
            &cache,
            10,
            &Device::Cpu,
        );
        assert!(matches!(
            too_long,
            Err(EngineError::ContextOverflow {
                tokens: 5,
                max_context: 4
            })
        ));
    }
}
