//! Grouped-query attention over the rolling KV cache, shared by every decoder.

use candle_core::{DType, Storage, Tensor};

use crate::kernels::cpu::attention as cpu_attention;

use crate::decoder::state::kv_ring::LayerCache;
use crate::decoder::step::StepBatch;
use crate::error::Result;

/// Scaled dot-product attention of `num_heads` query heads over `num_kv_heads` key/value heads
/// (query head `i` reads kv head `i / (num_heads / num_kv_heads)`, as transformers' `repeat_kv`).
#[derive(Debug, Clone)]
pub struct GroupedQueryAttention {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl GroupedQueryAttention {
    /// Attention with the usual `1 / sqrt(head_dim)` scale.
    pub fn new(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            num_heads,
            num_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        }
    }

    /// Attends `queries` (`[batch, heads, seq, head_dim]`) to the cached keys of each row's slot
    /// followed by this step's `keys`/`values` (`[batch, kv_heads, seq, head_dim]`), then stores
    /// this step's keys and values in the ring. Returns `[batch, seq, heads * head_dim]`.
    pub fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        batch: &StepBatch,
        cache: &LayerCache,
        capacity: usize,
    ) -> Result<Tensor> {
        let output = if queries.device().is_cpu() && queries.dtype() == DType::F32 {
            self.forward_cpu(queries, keys, values, batch, cache, capacity)?
        } else {
            self.forward_tensors(queries, keys, values, batch, cache)?
        };
        let seq = batch.seq_len;
        for (row, &slot) in batch.slots.iter().enumerate() {
            // Only the last `capacity` new positions can still be seen by later queries.
            let count = batch.new_tokens[row];
            let keep = count.min(capacity);
            let first_column = seq - keep;
            cache.write(
                slot,
                &keys.narrow(0, row, 1)?.narrow(2, first_column, keep)?,
                &values.narrow(0, row, 1)?.narrow(2, first_column, keep)?,
                batch.starts[row] + count - keep,
                capacity,
            )?;
        }
        Ok(output)
    }

    /// Attention with [`cpu_attention`], reading the ring in place.
    fn forward_cpu(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        batch: &StepBatch,
        cache: &LayerCache,
        capacity: usize,
    ) -> Result<Tensor> {
        let (rows, _, seq, head_dim) = queries.dims4()?;
        let (queries, keys, values) = (
            queries.contiguous()?,
            keys.contiguous()?,
            values.contiguous()?,
        );
        let guards = [
            &queries,
            &keys,
            &values,
            &cache.keys,
            &cache.values,
            &batch.mask,
        ]
        .map(|t| t.storage_and_layout());
        let mut slices: Vec<&[f32]> = Vec::with_capacity(guards.len());
        for (storage, layout) in &guards {
            let Storage::Cpu(cpu) = &**storage else {
                return Err(
                    candle_core::Error::Msg("CPU attention needs CPU tensors".into()).into(),
                );
            };
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("CPU attention needs contiguous tensors".into())
            })?;
            slices.push(&cpu.as_slice::<f32>()?[start..end]);
        }
        let shape = cpu_attention::AttentionShape {
            batch: rows,
            seq,
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim,
            ring_len: batch.ring_len,
            capacity,
            scale: self.scale as f32,
        };
        let inputs = cpu_attention::AttentionInputs {
            queries: slices[0],
            keys: slices[1],
            values: slices[2],
            ring_keys: slices[3],
            ring_values: slices[4],
            slots: &batch.slots,
            mask: slices[5],
        };
        let output = cpu_attention::attend(&shape, &inputs);
        drop(slices);
        drop(guards);
        Ok(Tensor::from_vec(
            output,
            (rows, seq, self.num_heads * head_dim),
            queries.device(),
        )?)
    }

    /// Attention as tensor operations, for every device and dtype.
    fn forward_tensors(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        batch: &StepBatch,
        cache: &LayerCache,
    ) -> Result<Tensor> {
        let (rows, _, seq, head_dim) = queries.dims4()?;
        let group = self.num_heads / self.num_kv_heads;
        let all_keys = with_ring(&cache.keys, keys, batch)?;
        let all_values = with_ring(&cache.values, values, batch)?;
        let key_len = all_keys.dim(2)?;

        // Heads that share a kv head are adjacent, so they fold into the query dimension
        // without a copy: [batch, kv_heads, group * seq, head_dim].
        let queries = queries.reshape((rows, self.num_kv_heads, group * seq, head_dim))?;
        let scores = (queries.matmul(&all_keys.t()?)? * self.scale)?;
        // Softmax in f32 whatever the model's dtype, as transformers does.
        let scores = scores
            .to_dtype(DType::F32)?
            .reshape((rows, self.num_kv_heads, group, seq, key_len))?
            .broadcast_add(&batch.mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(all_values.dtype())?;
        let output = probs
            .reshape((rows, self.num_kv_heads, group * seq, key_len))?
            .matmul(&all_values.contiguous()?)?
            .reshape((rows, self.num_heads, seq, head_dim))?
            .transpose(1, 2)?
            .reshape((rows, seq, self.num_heads * self.head_dim))?;
        Ok(output)
    }
}

/// `[batch, kv_heads, ring_len + seq, head_dim]`: each row's first `ring_len` ring entries
/// followed by this step's `new` entries.
fn with_ring(ring: &Tensor, new: &Tensor, batch: &StepBatch) -> Result<Tensor> {
    if batch.ring_len == 0 {
        return Ok(new.clone());
    }
    let rows = batch
        .slots
        .iter()
        .map(|&slot| ring.narrow(0, slot, 1)?.narrow(2, 0, batch.ring_len))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let ring = Tensor::cat(&rows, 0)?;
    Ok(Tensor::cat(&[&ring, new], 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::state::kv_ring::{CacheShape, KvCache};
    use crate::decoder::step::StepRow;
    use candle_core::Device;

    /// Runs the same steps through both implementations on twin caches; they must agree at every
    /// real position, through ring wrap-arounds, padding and grouped heads.
    #[test]
    fn cpu_kernel_and_tensor_path_agree() {
        let device = Device::Cpu;
        let (heads, kv_heads, head_dim) = (4, 2, 8);
        let shape = CacheShape {
            num_layers: 1,
            kv_heads,
            head_dim,
            sliding_window: Some(5),
        };
        let attention = GroupedQueryAttention::new(heads, kv_heads, head_dim);
        let mut caches = [
            KvCache::new(shape, 3, 64, DType::F32, &device).unwrap(),
            KvCache::new(shape, 3, 64, DType::F32, &device).unwrap(),
        ];
        for cache in &mut caches {
            for _ in 0..3 {
                cache.allocate().unwrap();
            }
        }
        // Steps of (slot, new tokens): prefills of different lengths, then decode-like steps.
        let steps: [&[(usize, usize)]; 4] = [
            &[(0, 7), (2, 3)],
            &[(0, 1), (2, 4), (1, 2)],
            &[(1, 6)],
            &[(0, 1), (1, 1), (2, 1)],
        ];
        for step in steps {
            let tokens: Vec<Vec<u32>> = step.iter().map(|&(_, n)| vec![1; n]).collect();
            let rows: Vec<StepRow> = step
                .iter()
                .zip(&tokens)
                .map(|(&(slot, _), t)| StepRow { slot, tokens: t })
                .collect();
            let batch = StepBatch::new(&rows, &caches[0], 10, &device).unwrap();
            let seq = batch.seq_len;
            let q = Tensor::randn(0f32, 1., (rows.len(), heads, seq, head_dim), &device).unwrap();
            let k =
                Tensor::randn(0f32, 1., (rows.len(), kv_heads, seq, head_dim), &device).unwrap();
            let v =
                Tensor::randn(0f32, 1., (rows.len(), kv_heads, seq, head_dim), &device).unwrap();
            let cpu = attention
                .forward_cpu(&q, &k, &v, &batch, caches[0].layer(0), 5)
                .unwrap();
            let tensors = attention
                .forward_tensors(&q, &k, &v, &batch, caches[1].layer(0))
                .unwrap();
            let cpu: Vec<Vec<Vec<f32>>> = cpu.to_vec3().unwrap();
            let tensors: Vec<Vec<Vec<f32>>> = tensors.to_vec3().unwrap();
            for (row, &(_, count)) in step.iter().enumerate() {
                for t in seq - count..seq {
                    for (a, b) in cpu[row][t].iter().zip(&tensors[row][t]) {
                        assert!((a - b).abs() < 1e-5, "row {row} column {t}: {a} vs {b}");
                    }
                }
            }
            // Both caches take the step's keys the same way.
            for cache in caches.iter_mut() {
                for (row, &(slot, count)) in step.iter().enumerate() {
                    let keep = count.min(5);
                    cache
                        .layer(0)
                        .write(
                            slot,
                            &k.narrow(0, row, 1)
                                .unwrap()
                                .narrow(2, seq - keep, keep)
                                .unwrap(),
                            &v.narrow(0, row, 1)
                                .unwrap()
                                .narrow(2, seq - keep, keep)
                                .unwrap(),
                            batch.starts[row] + count - keep,
                            5,
                        )
                        .unwrap();
                    cache.advance(slot, count).unwrap();
                }
            }
        }
    }
}
