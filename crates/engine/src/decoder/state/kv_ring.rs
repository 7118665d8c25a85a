//! The rolling key/value cache.
//!
//! Per layer one key and one value tensor `[slots, kv_heads, capacity, head_dim]`, with
//! `capacity = min(sliding_window, max_context)`. A sequence owns a slot; the token at absolute
//! position `p` is stored at ring index `p % capacity`. A query at position `p` may see the keys
//! at positions `p - W + 1 ..= p` (W keys, itself included), as transformers 4.37.2's eager
//! Mistral does, so a ring of W entries holds everything any later query can see: the memory a
//! sequence holds is bounded by the window however long it generates.

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// The shape of a model's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Decoder layers.
    pub num_layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// The attention window W, or None for full causal attention.
    pub sliding_window: Option<usize>,
}

/// Keys and values of every layer for a fixed number of sequence slots.
pub struct KvCache {
    layers: Vec<LayerCache>,
    shape: CacheShape,
    capacity: usize,
    max_context: usize,
    /// Positions processed so far, per slot; None for a free slot.
    lengths: Vec<Option<usize>>,
}

/// One layer's keys and values, `[slots, kv_heads, capacity, head_dim]` each.
pub struct LayerCache {
    /// Keys.
    pub keys: Tensor,
    /// Values.
    pub values: Tensor,
}

impl KvCache {
    /// Allocates the cache for `slots` sequences of at most `max_context` positions each.
    pub fn new(
        shape: CacheShape,
        slots: usize,
        max_context: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if slots == 0 || max_context == 0 {
            return Err(EngineError::InvalidRequest(
                "the KV cache needs at least one slot and one position".into(),
            ));
        }
        let capacity = match shape.sliding_window {
            Some(window) => window.min(max_context),
            None => max_context,
        };
        let dims = (slots, shape.kv_heads, capacity, shape.head_dim);
        let layers = (0..shape.num_layers)
            .map(|_| {
                Ok(LayerCache {
                    keys: Tensor::zeros(dims, dtype, device)?,
                    values: Tensor::zeros(dims, dtype, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            shape,
            capacity,
            max_context,
            lengths: vec![None; slots],
        })
    }

    /// Ring entries per slot and layer: `min(sliding_window, max_context)`.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The longest sequence, in positions, the cache accepts.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// The cache's shape.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// Number of slots, used or free.
    pub fn slots(&self) -> usize {
        self.lengths.len()
    }

    /// Number of free slots.
    pub fn free_slots(&self) -> usize {
        self.lengths.iter().filter(|len| len.is_none()).count()
    }

    /// Takes the lowest free slot for a new sequence.
    pub fn allocate(&mut self) -> Result<usize> {
        let slot =
            self.lengths
                .iter()
                .position(Option::is_none)
                .ok_or(EngineError::NoFreeSlot {
                    slots: self.lengths.len(),
                })?;
        self.lengths[slot] = Some(0);
        Ok(slot)
    }

    /// Frees a slot. Its entries are not cleared: the next owner starts at length 0 and never
    /// reads ring entries it has not written.
    pub fn release(&mut self, slot: usize) {
        if let Some(len) = self.lengths.get_mut(slot) {
            *len = None;
        }
    }

    /// Positions processed by the sequence in `slot`.
    pub fn len(&self, slot: usize) -> Result<usize> {
        self.lengths
            .get(slot)
            .copied()
            .flatten()
            .ok_or_else(|| EngineError::InvalidRequest(format!("slot {slot} is not allocated")))
    }

    /// Positions whose keys the sequence in `slot` holds: `min(len, capacity)` per layer.
    pub fn held_positions(&self, slot: usize) -> Result<usize> {
        Ok(self.len(slot)?.min(self.capacity))
    }

    /// The ring of one layer.
    pub fn layer(&self, index: usize) -> &LayerCache {
        &self.layers[index]
    }

    /// Records that `count` more positions of `slot` were written.
    pub(crate) fn advance(&mut self, slot: usize, count: usize) -> Result<()> {
        let len = self.len(slot)?;
        self.lengths[slot] = Some(len + count);
        Ok(())
    }

    /// Ring index of the entry that holds `position`.
    pub fn ring_index(&self, position: usize) -> usize {
        position % self.capacity
    }

    /// The absolute position held at ring index `index` by a sequence of `len` positions, or
    /// None when that entry has not been written.
    pub fn position_at(&self, index: usize, len: usize) -> Option<usize> {
        if index >= len.min(self.capacity) {
            None
        } else if len <= self.capacity {
            Some(index)
        } else {
            // The newest position below `len` that maps to `index`.
            Some(len - 1 - (len - 1 - index) % self.capacity)
        }
    }
}

impl LayerCache {
    /// Stores `keys`/`values` (`[1, kv_heads, n, head_dim]`, consecutive positions starting at
    /// `first_position`, `n <= capacity`) in `slot`'s ring, wrapping at the capacity.
    pub(crate) fn write(
        &self,
        slot: usize,
        keys: &Tensor,
        values: &Tensor,
        first_position: usize,
        capacity: usize,
    ) -> Result<()> {
        let count = keys.dim(2)?;
        debug_assert!(count <= capacity);
        let mut written = 0;
        while written < count {
            let ring_index = (first_position + written) % capacity;
            let run = (count - written).min(capacity - ring_index);
            for (cache, new) in [(&self.keys, keys), (&self.values, values)] {
                let src = new.narrow(2, written, run)?.contiguous()?;
                cache.narrow(0, slot, 1)?.slice_set(&src, 2, ring_index)?;
            }
            written += run;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(window: Option<usize>, max_context: usize) -> KvCache {
        let shape = CacheShape {
            num_layers: 1,
            kv_heads: 1,
            head_dim: 2,
            sliding_window: window,
        };
        KvCache::new(shape, 2, max_context, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn capacity_is_the_window_bounded_by_the_context() {
        assert_eq!(cache(Some(4), 100).capacity(), 4);
        assert_eq!(cache(Some(4096), 100).capacity(), 100);
        assert_eq!(cache(None, 100).capacity(), 100);
    }

    #[test]
    fn position_at_inverts_ring_index() {
        let cache = cache(Some(4), 100);
        for len in 0..20 {
            let mut held = vec![];
            for index in 0..4 {
                if let Some(position) = cache.position_at(index, len) {
                    assert_eq!(cache.ring_index(position), index);
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
    fn write_wraps_around_the_ring() {
        let cache = cache(Some(4), 100);
        let layer = cache.layer(0);
        // Positions 3..=6 land at ring indexes 3, 0, 1, 2.
        let keys = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 2))
            .unwrap();
        layer.write(1, &keys, &keys, 3, 4).unwrap();
        let ring: Vec<Vec<f32>> = layer
            .keys
            .get(1)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(
            ring,
            vec![vec![2., 3.], vec![4., 5.], vec![6., 7.], vec![0., 1.]]
        );
        // Slot 0 is untouched.
        let other: Vec<Vec<f32>> = layer
            .keys
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(other.iter().flatten().all(|&v| v == 0.));
    }

    #[test]
    fn slots_are_reused_after_release() {
        let mut cache = cache(Some(4), 100);
        assert_eq!(cache.allocate().unwrap(), 0);
        assert_eq!(cache.allocate().unwrap(), 1);
        assert!(matches!(
            cache.allocate(),
            Err(EngineError::NoFreeSlot { slots: 2 })
        ));
        cache.advance(0, 7).unwrap();
        assert_eq!(cache.held_positions(0).unwrap(), 4);
        cache.release(0);
        assert_eq!(cache.allocate().unwrap(), 0);
        assert_eq!(cache.len(0).unwrap(), 0);
    }
}
