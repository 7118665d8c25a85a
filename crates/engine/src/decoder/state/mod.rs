//! What a sequence keeps between steps, declared per layer by the model, and the slot pool that
//! holds it for every sequence in flight.
//!
//! A model states in a [`StateSpec`] what each of its layers keeps: attention entries (keys and
//! values in a rolling ring, [`kv_ring`]) and/or a recurrent state of fixed size
//! ([`recurrent`]). The generator owns one [`SequenceState`] over that spec with a fixed number of
//! slots; a sequence owns a slot from allocation to release. A step never writes the state while
//! it runs: layers hand their new entries to the [`Step`](crate::decoder::step::Step), and
//! [`SequenceState::commit`] stores them only once the whole forward pass has succeeded, so a
//! failed step leaves every sequence exactly as it was.

pub mod kv_ring;
pub mod recurrent;

use candle_core::{DType, Device, Tensor};

use crate::attention::AttentionPattern;
use crate::decoder::step::StepBatch;
use crate::error::{EngineError, Result};
use kv_ring::KvRing;
use recurrent::RecurrentState;

/// The attention entries a layer keeps per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionEntries {
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one key (and query) head.
    pub key_width: usize,
    /// Width of one value head.
    pub value_width: usize,
    /// Which earlier positions a query sees; it also bounds how many entries are kept.
    pub pattern: AttentionPattern,
}

/// What one layer keeps per sequence between steps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayerState {
    /// Keys and values of earlier positions, when the layer attends to them.
    pub attention: Option<AttentionEntries>,
    /// The shape of a recurrent state carried from token to token (MEGA's EMA), when the layer
    /// has one. It starts at zero for every new sequence.
    pub recurrent: Option<Vec<usize>>,
}

impl LayerState {
    /// A layer that keeps attention entries only.
    pub fn attention(entries: AttentionEntries) -> Self {
        Self {
            attention: Some(entries),
            recurrent: None,
        }
    }
}

/// What a model's sequences keep, layer by layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSpec {
    /// One entry per layer.
    pub layers: Vec<LayerState>,
}

impl StateSpec {
    /// Every one of `num_layers` layers keeps the same attention entries.
    pub fn uniform_attention(num_layers: usize, entries: AttentionEntries) -> Self {
        Self {
            layers: vec![LayerState::attention(entries); num_layers],
        }
    }
}

/// One layer's stores.
struct LayerSlots {
    ring: Option<KvRing>,
    recurrent: Option<RecurrentState>,
}

/// What a step hands back for one layer, stored by [`SequenceState::commit`].
#[derive(Debug, Default)]
pub struct LayerWrites {
    /// This step's keys and values, `[batch, kv_heads, seq, width]` each, left-padded like the
    /// batch.
    pub entries: Option<(Tensor, Tensor)>,
    /// Each row's recurrent state after this step, `[batch, ..dims]`.
    pub recurrent: Option<Tensor>,
}

/// A copy of one sequence's state after its first [`Snapshot::len`] positions: what the prefix
/// cache keeps.
#[derive(Debug)]
pub struct Snapshot {
    len: usize,
    layers: Vec<LayerSnapshot>,
    bytes: usize,
    truncatable: bool,
}

/// One layer's part of a [`Snapshot`].
#[derive(Debug)]
struct LayerSnapshot {
    /// Keys and values, `[kv_heads, held, width]` each, in ring order.
    entries: Option<(Tensor, Tensor)>,
    /// The recurrent state, `[1, ..dims]`.
    recurrent: Option<Tensor>,
}

impl Snapshot {
    /// Positions the snapshot holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the snapshot holds no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of its tensors.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The longest prefix of the snapshot that a sequence can start from, given that its
    /// tokens agree with the snapshot's for `common` positions: any `common` when every ring
    /// still holds position 0 and no layer is recurrent (the state after `n` positions is then
    /// the first `n` entries); only the whole snapshot otherwise (a wrapped ring has overwritten
    /// its first entries, a recurrent state exists at one position only).
    pub fn usable(&self, common: usize) -> usize {
        if self.truncatable {
            common.min(self.len)
        } else if common >= self.len {
            self.len
        } else {
            0
        }
    }
}

/// A copy of the elements of `view` in storage of its own. (`Tensor::copy` clones the whole
/// storage under a view, and `contiguous` may share it: a snapshot must neither hold the whole
/// ring nor see it change.)
pub(crate) fn owned_copy(view: &Tensor) -> Result<Tensor> {
    let copy = Tensor::zeros(view.shape(), view.dtype(), view.device())?;
    copy.slice_set(&view.contiguous()?, 0, 0)?;
    Ok(copy)
}

/// The state of every sequence slot: the slot pool a generator owns.
pub struct SequenceState {
    layers: Vec<LayerSlots>,
    spec: StateSpec,
    max_context: usize,
    /// Positions processed so far, per slot; None for a free slot.
    lengths: Vec<Option<usize>>,
}

impl SequenceState {
    /// Bytes the state of every slot holds: KV rings and recurrent states.
    pub fn bytes(&self) -> usize {
        let size = |tensor: &Tensor| tensor.elem_count() * tensor.dtype().size_in_bytes();
        self.layers
            .iter()
            .map(|layer| {
                layer
                    .ring
                    .as_ref()
                    .map_or(0, |ring| size(&ring.keys) + size(&ring.values))
                    + layer
                        .recurrent
                        .as_ref()
                        .map_or(0, |state| size(state.all()))
            })
            .sum()
    }

    /// Allocates the state of `slots` sequences of at most `max_context` positions each.
    pub fn new(
        spec: StateSpec,
        slots: usize,
        max_context: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if slots == 0 || max_context == 0 {
            return Err(EngineError::InvalidRequest(
                "the sequence state needs at least one slot and one position".into(),
            ));
        }
        let layers = spec
            .layers
            .iter()
            .map(|layer| {
                Ok(LayerSlots {
                    ring: layer
                        .attention
                        .map(|entries| KvRing::new(entries, slots, max_context, dtype, device))
                        .transpose()?,
                    recurrent: layer
                        .recurrent
                        .as_ref()
                        .map(|dims| RecurrentState::new(dims, slots, dtype, device))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            spec,
            max_context,
            lengths: vec![None; slots],
        })
    }

    /// What each layer keeps.
    pub fn spec(&self) -> &StateSpec {
        &self.spec
    }

    /// The longest sequence, in positions, the state accepts.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Number of slots, used or free.
    pub fn slots(&self) -> usize {
        self.lengths.len()
    }

    /// Number of free slots.
    pub fn free_slots(&self) -> usize {
        self.lengths.iter().filter(|len| len.is_none()).count()
    }

    /// Takes the lowest free slot for a new sequence and zeroes its recurrent state. Ring
    /// entries are not cleared: a new owner starts at length 0 and never reads entries it has
    /// not written. Taking the lowest slot keeps the slots in use close together, so that the
    /// device-generic attention reads most batches as one run of slots.
    pub fn allocate(&mut self) -> Result<usize> {
        let slot =
            self.lengths
                .iter()
                .position(Option::is_none)
                .ok_or(EngineError::NoFreeSlot {
                    slots: self.lengths.len(),
                })?;
        for layer in &self.layers {
            if let Some(recurrent) = &layer.recurrent {
                recurrent.reset(slot)?;
            }
        }
        self.lengths[slot] = Some(0);
        Ok(slot)
    }

    /// Frees a slot.
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

    /// Positions whose keys layer `layer` holds for the sequence in `slot`: at most its ring's
    /// capacity, however long the sequence.
    pub fn held_positions(&self, layer: usize, slot: usize) -> Result<usize> {
        let capacity = self.ring(layer).map_or(0, KvRing::capacity);
        Ok(self.len(slot)?.min(capacity))
    }

    /// The attention ring of layer `layer`, when it keeps one.
    pub fn ring(&self, layer: usize) -> Option<&KvRing> {
        self.layers.get(layer)?.ring.as_ref()
    }

    /// The recurrent state of layer `layer`, when it keeps one.
    pub fn recurrent(&self, layer: usize) -> Option<&RecurrentState> {
        self.layers.get(layer)?.recurrent.as_ref()
    }

    /// Stores a successful step's writes and advances each row's length. Every layer that keeps
    /// something must have handed its writes to the step.
    pub(crate) fn commit(&mut self, batch: &StepBatch, writes: Vec<LayerWrites>) -> Result<()> {
        if writes.len() != self.layers.len() {
            return Err(EngineError::Internal(format!(
                "a step wrote {} layers of a model with {}",
                writes.len(),
                self.layers.len()
            )));
        }
        // Check that nothing is missing before anything is stored.
        for (index, (layer, write)) in self.layers.iter().zip(&writes).enumerate() {
            if layer.ring.is_some() != write.entries.is_some()
                || layer.recurrent.is_some() != write.recurrent.is_some()
            {
                return Err(EngineError::Internal(format!(
                    "layer {index} did not hand back exactly the state it keeps"
                )));
            }
        }
        for (layer, write) in self.layers.iter().zip(writes) {
            if let (Some(ring), Some((keys, values))) = (&layer.ring, &write.entries) {
                ring.write(batch, keys, values)?;
            }
            if let (Some(recurrent), Some(new)) = (&layer.recurrent, &write.recurrent) {
                recurrent.write(batch, new)?;
            }
        }
        for (&slot, &count) in batch.slots.iter().zip(&batch.new_tokens) {
            let len = self.len(slot)?;
            self.lengths[slot] = Some(len + count);
        }
        Ok(())
    }

    /// A copy of the state of the sequence in `slot` at its current length.
    pub fn snapshot(&self, slot: usize) -> Result<Snapshot> {
        let len = self.len(slot)?;
        let mut bytes = 0;
        let mut truncatable = true;
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let entries = match &layer.ring {
                Some(ring) => {
                    truncatable &= len <= ring.capacity();
                    let (keys, values) = ring.snapshot(slot, len)?;
                    bytes +=
                        (keys.elem_count() + values.elem_count()) * keys.dtype().size_in_bytes();
                    Some((keys, values))
                }
                None => None,
            };
            let recurrent = match &layer.recurrent {
                Some(state) => {
                    truncatable = false;
                    let saved = state.snapshot(slot)?;
                    bytes += saved.elem_count() * saved.dtype().size_in_bytes();
                    Some(saved)
                }
                None => None,
            };
            layers.push(LayerSnapshot { entries, recurrent });
        }
        Ok(Snapshot {
            len,
            layers,
            bytes,
            truncatable,
        })
    }

    /// Starts the freshly allocated sequence in `slot` from the first `len` positions of
    /// `snapshot` (at most [`Snapshot::usable`] of them).
    pub fn restore(&mut self, slot: usize, snapshot: &Snapshot, len: usize) -> Result<()> {
        if self.len(slot)? != 0 {
            return Err(EngineError::Internal(format!(
                "slot {slot} is restored from a snapshot after it started"
            )));
        }
        if len == 0 || len > snapshot.len || (len < snapshot.len && !snapshot.truncatable) {
            return Err(EngineError::Internal(format!(
                "{len} positions restored from a snapshot of {}",
                snapshot.len
            )));
        }
        if snapshot.layers.len() != self.layers.len() {
            return Err(EngineError::Internal(
                "a snapshot of another model's state".into(),
            ));
        }
        for (layer, saved) in self.layers.iter().zip(&snapshot.layers) {
            if let (Some(ring), Some((keys, values))) = (&layer.ring, &saved.entries) {
                ring.restore(slot, keys, values, len.min(ring.capacity()))?;
            }
            if let (Some(state), Some(saved)) = (&layer.recurrent, &saved.recurrent) {
                state.restore(slot, saved)?;
            }
        }
        self.lengths[slot] = Some(len);
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn advance(&mut self, slot: usize, count: usize) -> Result<()> {
        let len = self.len(slot)?;
        self.lengths[slot] = Some(len + count);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_copy_owns_its_elements_and_does_not_see_the_ring_change() {
        let ring = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        // A contiguous view at an offset, and a strided one.
        let views = [ring.get(1).unwrap(), ring.narrow(1, 0, 2).unwrap()];
        let copies: Vec<Tensor> = views.iter().map(|v| owned_copy(v).unwrap()).collect();
        let expected: Vec<Vec<f32>> = views
            .iter()
            .map(|v| v.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        ring.slice_set(&ring.zeros_like().unwrap(), 0, 0).unwrap();
        for (copy, expected) in copies.iter().zip(expected) {
            // Its storage holds its elements only, not the ring under the view.
            let (storage, _) = copy.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                panic!("a CPU tensor");
            };
            assert_eq!(cpu.as_slice::<f32>().unwrap().len(), expected.len());
            assert_eq!(
                copy.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected
            );
        }
    }

    #[test]
    fn slots_are_reused_after_release() {
        let entries = AttentionEntries {
            kv_heads: 1,
            key_width: 2,
            value_width: 2,
            pattern: AttentionPattern::SlidingWindow(4),
        };
        let spec = StateSpec::uniform_attention(1, entries);
        let mut state = SequenceState::new(spec, 2, 100, DType::F32, &Device::Cpu).unwrap();
        // Two slots of a 4-position window: keys and values of width 2, one head, f32.
        assert_eq!(state.bytes(), 2 * (2 * 4 * 2 * 4));
        assert_eq!(state.allocate().unwrap(), 0);
        assert_eq!(state.allocate().unwrap(), 1);
        assert!(matches!(
            state.allocate(),
            Err(EngineError::NoFreeSlot { slots: 2 })
        ));
        state.advance(0, 7).unwrap();
        assert_eq!(state.len(0).unwrap(), 7);
        state.release(0);
        assert_eq!(state.free_slots(), 1);
        assert_eq!(state.allocate().unwrap(), 0);
        assert_eq!(state.len(0).unwrap(), 0);
    }
}
