//! Grouped-query attention over the rolling KV cache, shared by every decoder.

use candle_core::{DType, Tensor};

use crate::batch::StepBatch;
use crate::error::Result;
use crate::kv_cache::LayerCache;

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
