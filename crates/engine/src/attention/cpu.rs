//! The CPU backend: the f32 tensors handed to [`crate::kernels::cpu::attention`] as slices.

use candle_core::{Storage, Tensor};

use crate::attention::AttentionSpec;
use crate::decoder::state::kv_ring::KvRing;
use crate::decoder::step::StepBatch;
use crate::error::Result;
use crate::kernels::cpu::attention as kernel;

/// Attention with the CPU kernel, reading the ring in place; same contract as
/// [`super::generic::attend`].
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    spec: &AttentionSpec,
    queries: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    bias: Option<&Tensor>,
    mask: &Tensor,
    ring: &KvRing,
    batch: &StepBatch,
) -> Result<Tensor> {
    let (rows, _, seq, _) = queries.dims4()?;
    let contiguous = |t: &Tensor| t.contiguous();
    let (queries, keys, values) = (contiguous(queries)?, contiguous(keys)?, contiguous(values)?);
    let bias = bias.map(contiguous).transpose()?;
    let mut tensors = vec![&queries, &keys, &values, &ring.keys, &ring.values, mask];
    tensors.extend(bias.as_ref());
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return Err(candle_core::Error::Msg("CPU attention needs CPU tensors".into()).into());
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("CPU attention needs contiguous tensors".into())
        })?;
        slices.push(&cpu.as_slice::<f32>()?[start..end]);
    }
    let capacity = ring.capacity();
    let shape = kernel::AttentionShape {
        batch: rows,
        seq,
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        key_width: spec.key_width,
        value_width: spec.value_width,
        ring_len: batch.ring_len(capacity),
        capacity,
        scale: spec.scale as f32,
    };
    let inputs = kernel::AttentionInputs {
        queries: slices[0],
        keys: slices[1],
        values: slices[2],
        ring_keys: slices[3],
        ring_values: slices[4],
        slots: &batch.slots,
        mask: slices[5],
        bias: slices.get(6).copied(),
    };
    let output = kernel::attend(&shape, &inputs);
    drop(slices);
    drop(guards);
    Ok(Tensor::from_vec(
        output,
        (rows, seq, spec.heads * spec.value_width),
        queries.device(),
    )?)
}
