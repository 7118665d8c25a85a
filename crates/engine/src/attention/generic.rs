//! The device-generic backend: attention as tensor operations, for every device and dtype.
//!
//! The ring is never copied. Rows whose slots follow each other (`s, s + 1, ..`) form a run, and
//! a run's ring entries are one strided view of the ring (`narrow` on the slot and entry
//! dimensions), which the batched matmuls read in place. Scores against the ring and against the
//! step's own keys are computed apart and joined along the key dimension (scores are
//! `group * seq` wide, far smaller than the keys), and the weighted values of both parts are
//! summed. Slots are allocated lowest first, so a batch is usually a single run.

use candle_core::{DType, Tensor};

use crate::attention::{AttentionSpec, ScoreActivation};
use crate::decoder::state::kv_ring::KvRing;
use crate::decoder::step::StepBatch;
use crate::error::Result;

/// Attention with tensor operations. `queries` `[batch, heads, seq, key_width]`, `keys` /
/// `values` `[batch, kv_heads, seq, width]`, `bias` `[batch, heads, seq, key_len]` f32, `mask`
/// `[batch, 1, 1, seq, key_len]` f32 (0 or -inf), with `key_len = ring_len + seq`. Returns
/// `[batch, seq, heads * value_width]`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    spec: &AttentionSpec,
    queries: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    bias: Option<&Tensor>,
    mask: &Tensor,
    ring: &KvRing,
    batch: &StepBatch,
) -> Result<Tensor> {
    let (_, _, seq, _) = queries.dims4()?;
    let (heads, kv_heads) = (spec.heads, spec.kv_heads);
    let group = heads / kv_heads;
    let ring_len = batch.ring_len(ring.capacity());
    let key_len = ring_len + seq;
    let mut outputs = Vec::new();
    for (first_row, rows, first_slot) in slot_runs(&batch.slots) {
        // Heads that share a kv head are adjacent, so they fold into the query dimension without
        // a copy: [rows, kv_heads, group * seq, key_width].
        let q = queries.narrow(0, first_row, rows)?.contiguous()?.reshape((
            rows,
            kv_heads,
            group * seq,
            spec.key_width,
        ))?;
        let new_keys = keys.narrow(0, first_row, rows)?.contiguous()?;
        let new_values = values.narrow(0, first_row, rows)?.contiguous()?;
        // [rows, kv_heads, ring_len, width] views of the run's slots.
        let ring_view = |t: &Tensor| t.narrow(0, first_slot, rows)?.narrow(2, 0, ring_len);
        let mut scores = q.matmul(&new_keys.t()?)?;
        if ring_len > 0 {
            let ring_scores = q.matmul(&ring_view(&ring.keys)?.t()?)?;
            scores = Tensor::cat(&[&ring_scores, &scores], 3)?;
        }
        let mut scores = (scores * spec.scale)?
            .to_dtype(DType::F32)?
            .reshape((rows, kv_heads, group, seq, key_len))?
            .broadcast_add(&mask.narrow(0, first_row, rows)?)?;
        if let Some(bias) = bias {
            let bias = bias
                .narrow(0, first_row, rows)?
                .reshape((rows, kv_heads, group, seq, key_len))?;
            scores = (scores + bias)?;
        }
        let weights = match spec.activation {
            ScoreActivation::Softmax => candle_nn::ops::softmax_last_dim(&scores)?,
        }
        .to_dtype(values.dtype())?
        .reshape((rows, kv_heads, group * seq, key_len))?;
        let mut output = weights
            .narrow(3, ring_len, seq)?
            .contiguous()?
            .matmul(&new_values)?;
        if ring_len > 0 {
            let from_ring = weights
                .narrow(3, 0, ring_len)?
                .contiguous()?
                .matmul(&ring_view(&ring.values)?)?;
            output = (from_ring + output)?;
        }
        outputs.push(
            output
                .reshape((rows, heads, seq, spec.value_width))?
                .transpose(1, 2)?
                .reshape((rows, seq, heads * spec.value_width))?,
        );
    }
    Ok(Tensor::cat(&outputs, 0)?)
}

/// Maximal runs of rows whose slots follow each other: `(first row, rows, first slot)`.
fn slot_runs(slots: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for (row, &slot) in slots.iter().enumerate() {
        match runs.last_mut() {
            Some((_, rows, first_slot)) if *first_slot + *rows == slot => *rows += 1,
            _ => runs.push((row, 1, slot)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_slots_form_one_run() {
        assert_eq!(slot_runs(&[0, 1, 2, 3]), vec![(0, 4, 0)]);
        assert_eq!(
            slot_runs(&[2, 3, 0, 1, 5]),
            vec![(0, 2, 2), (2, 2, 0), (4, 1, 5)]
        );
        assert_eq!(slot_runs(&[4]), vec![(0, 1, 4)]);
    }
}
