//! The rolling key/value ring of one attention layer.
//!
//! One key tensor `[slots, kv_heads, capacity, key_width]` and one value tensor `[slots,
//! kv_heads, capacity, value_width]`, with `capacity` = what the layer's
//! [`AttentionPattern`] can ever show a query, bounded by the context: `min(W, max_context)` for
//! a sliding window W (a query at `p` sees `p - W + 1 ..= p`, as transformers 4.37.2's eager
//! Mistral does), `min(C, max_context)` for chunks of C, `max_context` for full attention. The
//! token at absolute position `p` is stored at ring index `p % capacity`, so the memory a
//! sequence holds is bounded by its pattern however long it generates.

use candle_core::{DType, Device, Tensor};

use crate::attention::AttentionPattern;
use crate::decoder::state::{owned_copy, AttentionEntries};
use crate::decoder::step::StepBatch;
use crate::error::Result;

/// The keys and values of one layer for every slot.
pub struct KvRing {
    /// Keys, `[slots, kv_heads, capacity, key_width]`.
    pub keys: Tensor,
    /// Values, `[slots, kv_heads, capacity, value_width]`.
    pub values: Tensor,
    entries: AttentionEntries,
    capacity: usize,
}

impl KvRing {
    /// Allocates the ring of `slots` sequences of at most `max_context` positions.
    pub fn new(
        entries: AttentionEntries,
        slots: usize,
        max_context: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let capacity = entries
            .pattern
            .span()
            .unwrap_or(usize::MAX)
            .min(max_context);
        let dims = |width| (slots, entries.kv_heads, capacity, width);
        Ok(Self {
            keys: Tensor::zeros(dims(entries.key_width), dtype, device)?,
            values: Tensor::zeros(dims(entries.value_width), dtype, device)?,
            entries,
            capacity,
        })
    }

    /// Ring entries per slot.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// What the layer keeps.
    pub fn entries(&self) -> AttentionEntries {
        self.entries
    }

    /// Ring index of the entry that holds `position`.
    pub fn ring_index(&self, position: usize) -> usize {
        position % self.capacity
    }

    /// The absolute position held at ring index `index` by a sequence of `len` positions, or
    /// None when that entry has not been written.
    pub fn position_at(&self, index: usize, len: usize) -> Option<usize> {
        position_at(index, len, self.capacity)
    }

    /// Stores a step's keys and values (`[batch, kv_heads, seq, width]`, left-padded as
    /// `batch`): one scatter per tensor over every row, head and position. Only a row's last
    /// `capacity` new positions are kept; earlier ones could never be seen again.
    pub(crate) fn write(&self, batch: &StepBatch, keys: &Tensor, values: &Tensor) -> Result<()> {
        let kv_heads = self.entries.kv_heads;
        let destinations = batch.ring_destinations(kv_heads, self.capacity)?;
        for (ring, new) in [(&self.keys, keys), (&self.values, values)] {
            let (slots, _, capacity, width) = ring.dims4()?;
            // [slots * kv_heads * capacity, width], the same storage as the ring.
            let flat = ring.reshape((slots * kv_heads * capacity, width))?;
            let rows = batch.batch_size() * kv_heads * batch.seq_len;
            let new = new.contiguous()?.reshape((rows, width))?;
            let ids = destinations.broadcast_as((rows, width))?.contiguous()?;
            flat.scatter_set(&ids, &new, 0)?;
        }
        Ok(())
    }
}

impl KvRing {
    /// Copies of `slot`'s entries for its first `len` positions: `[kv_heads, held, width]` keys
    /// and values, `held = min(len, capacity)`, in ring order.
    pub(crate) fn snapshot(&self, slot: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let held = len.min(self.capacity);
        let copy = |t: &Tensor| owned_copy(&t.get(slot)?.narrow(1, 0, held)?);
        Ok((copy(&self.keys)?, copy(&self.values)?))
    }

    /// Writes the first `count` ring entries of a snapshot (`[kv_heads, held, width]`) into
    /// `slot`'s ring indexes `0..count`: one scatter per tensor.
    pub(crate) fn restore(
        &self,
        slot: usize,
        keys: &Tensor,
        values: &Tensor,
        count: usize,
    ) -> Result<()> {
        let kv_heads = self.entries.kv_heads;
        let rows: Vec<u32> = (0..kv_heads)
            .flat_map(|head| {
                let base = (slot * kv_heads + head) * self.capacity;
                (base..base + count).map(|index| index as u32)
            })
            .collect();
        let rows = Tensor::from_vec(rows, (kv_heads * count, 1), self.keys.device())?;
        for (ring, saved) in [(&self.keys, keys), (&self.values, values)] {
            let (slots, _, capacity, width) = ring.dims4()?;
            let flat = ring.reshape((slots * kv_heads * capacity, width))?;
            let saved = saved
                .narrow(1, 0, count)?
                .contiguous()?
                .reshape((kv_heads * count, width))?;
            let ids = rows.broadcast_as((kv_heads * count, width))?.contiguous()?;
            flat.scatter_set(&ids, &saved, 0)?;
        }
        Ok(())
    }
}

/// The absolute position held at ring index `index` by a sequence of `len` positions in a ring of
/// `capacity` entries, or None when that entry has not been written.
pub fn position_at(index: usize, len: usize, capacity: usize) -> Option<usize> {
    if index >= len.min(capacity) {
        None
    } else if len <= capacity {
        Some(index)
    } else {
        // The newest position below `len` that maps to `index`.
        Some(len - 1 - (len - 1 - index) % capacity)
    }
}

impl AttentionPattern {
    /// The most earlier-or-equal positions one query can see, None when unbounded.
    pub fn span(self) -> Option<usize> {
        match self {
            Self::Full => None,
            Self::SlidingWindow(window) => Some(window),
            Self::Chunked(chunk) => Some(chunk),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::state::{SequenceState, StateSpec};
    use crate::decoder::step::StepRow;

    fn entries(pattern: AttentionPattern) -> AttentionEntries {
        AttentionEntries {
            kv_heads: 1,
            key_width: 2,
            value_width: 3,
            pattern,
        }
    }

    fn ring(pattern: AttentionPattern, max_context: usize) -> KvRing {
        KvRing::new(entries(pattern), 2, max_context, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn capacity_is_the_pattern_span_bounded_by_the_context() {
        assert_eq!(ring(AttentionPattern::SlidingWindow(4), 100).capacity(), 4);
        assert_eq!(
            ring(AttentionPattern::SlidingWindow(4096), 100).capacity(),
            100
        );
        assert_eq!(ring(AttentionPattern::Chunked(8), 100).capacity(), 8);
        assert_eq!(ring(AttentionPattern::Full, 100).capacity(), 100);
    }

    #[test]
    fn position_at_inverts_ring_index() {
        let ring = ring(AttentionPattern::SlidingWindow(4), 100);
        for len in 0..20 {
            let mut held = vec![];
            for index in 0..4 {
                if let Some(position) = ring.position_at(index, len) {
                    assert_eq!(ring.ring_index(position), index);
                    assert!(position < len);
                    held.push(position);
                }
            }
            held.sort();
            let expected: Vec<usize> = (len.saturating_sub(4)..len).collect();
            assert_eq!(held, expected, "len {len}");
        }
    }

    #[test]
    fn a_step_write_wraps_around_the_ring_and_touches_only_its_slots() {
        let spec = StateSpec::uniform_attention(1, entries(AttentionPattern::SlidingWindow(4)));
        let mut state = SequenceState::new(spec, 3, 100, DType::F32, &Device::Cpu).unwrap();
        for _ in 0..3 {
            state.allocate().unwrap();
        }
        state.advance(1, 3).unwrap();
        // Slot 1 appends 5 tokens at positions 3..=7: only the last 4 (4..=7) are kept, at ring
        // indexes 0, 1, 2, 3. Slot 2 appends 1 token at position 0, left-padded in the batch.
        let rows = [
            StepRow {
                slot: 1,
                tokens: &[1; 5],
            },
            StepRow {
                slot: 2,
                tokens: &[1],
            },
        ];
        let batch = StepBatch::new(&rows, &state, 10, &Device::Cpu).unwrap();
        let keys = Tensor::arange(0f32, 20., &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 5, 2))
            .unwrap();
        let values = Tensor::arange(0f32, 30., &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 5, 3))
            .unwrap();
        let ring = state.ring(0).unwrap();
        ring.write(&batch, &keys, &values).unwrap();
        let slot_keys = |slot: usize| -> Vec<Vec<f32>> {
            ring.keys
                .get(slot)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        // Columns 1..=4 of row 0 (positions 4..=7) at ring indexes 0..=3.
        assert_eq!(
            slot_keys(1),
            vec![vec![2., 3.], vec![4., 5.], vec![6., 7.], vec![8., 9.]]
        );
        // Row 1's one real token (its last column) at ring index 0; the padding wrote nothing.
        assert_eq!(slot_keys(2)[0], vec![18., 19.]);
        assert!(slot_keys(2)[1..].iter().flatten().all(|&v| v == 0.));
        assert!(slot_keys(0).iter().flatten().all(|&v| v == 0.));
        let slot_values: Vec<Vec<f32>> = ring
            .values
            .get(2)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(slot_values[0], vec![27., 28., 29.]);
    }
}
