//! Attention over the rolling cache on CPU in f32, without gathering the ring.
//!
//! The device-generic formulation (see [`crate::attention`]) runs batched matmuls of `batch x
//! kv_heads` tiny products and a masked softmax over every key, masked or not. For decode steps
//! on CPU that work is dominated by per-product overhead. Here each (row, kv head) pair is one task that reads its keys and values
//! where they are, skips the keys its mask hides, and writes its output straight into the
//! `[batch, seq, heads * value_width]` layout the output projection reads.

use rayon::prelude::*;

/// Shapes and strides of one attention call.
pub struct AttentionShape {
    /// Rows of the batch.
    pub batch: usize,
    /// Query columns per row (left-padded).
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a query and key head.
    pub key_width: usize,
    /// Width of a value head.
    pub value_width: usize,
    /// Ring entries read per row before the step's own keys.
    pub ring_len: usize,
    /// Ring entries per slot.
    pub capacity: usize,
    /// Scale of the scores.
    pub scale: f32,
}

/// Borrowed inputs of one attention call, all row-major and contiguous.
pub struct AttentionInputs<'a> {
    /// `[batch, heads, seq, key_width]`.
    pub queries: &'a [f32],
    /// `[batch, kv_heads, seq, key_width]`.
    pub keys: &'a [f32],
    /// `[batch, kv_heads, seq, value_width]`.
    pub values: &'a [f32],
    /// `[slots, kv_heads, capacity, key_width]`.
    pub ring_keys: &'a [f32],
    /// `[slots, kv_heads, capacity, value_width]`.
    pub ring_values: &'a [f32],
    /// The slot of each row.
    pub slots: &'a [usize],
    /// `[batch, seq, ring_len + seq]`, 0 where visible and -inf elsewhere.
    pub mask: &'a [f32],
    /// `[batch, heads, seq, ring_len + seq]`, added to the scaled scores, when the layer has
    /// one.
    pub bias: Option<&'a [f32]>,
}

/// Returns `[batch, seq, heads * value_width]`.
pub fn attend<'a>(shape: &AttentionShape, inputs: &AttentionInputs<'a>) -> Vec<f32> {
    let AttentionShape {
        batch,
        seq,
        heads,
        kv_heads,
        key_width,
        value_width,
        ring_len,
        capacity,
        scale,
    } = *shape;
    let group = heads / kv_heads;
    let key_len = ring_len + seq;
    // One task per (row, kv head); each returns its [seq, group, value_width] block.
    let blocks: Vec<Vec<f32>> = (0..batch * kv_heads)
        .into_par_iter()
        .map(|task| {
            let (row, kv_head) = (task / kv_heads, task % kv_heads);
            let ring_entry = (inputs.slots[row] * kv_heads + kv_head) * capacity;
            let new_entry = (row * kv_heads + kv_head) * seq;
            // Entry `l` of the keys (or values) this row sees: ring entries, then the step's own.
            let entry = |ring: &'a [f32], new: &'a [f32], width: usize, l: usize| -> &'a [f32] {
                let (source, start) = if l < ring_len {
                    (ring, (ring_entry + l) * width)
                } else {
                    (new, (new_entry + l - ring_len) * width)
                };
                &source[start..start + width]
            };
            let key = |l| entry(inputs.ring_keys, inputs.keys, key_width, l);
            let value = |l| entry(inputs.ring_values, inputs.values, value_width, l);
            let mut block = vec![0f32; seq * group * value_width];
            let mut visible: Vec<usize> = Vec::with_capacity(key_len);
            let mut weights: Vec<f32> = Vec::with_capacity(key_len);
            for t in 0..seq {
                let mask = &inputs.mask[(row * seq + t) * key_len..(row * seq + t + 1) * key_len];
                visible.clear();
                visible.extend((0..key_len).filter(|&l| mask[l] == 0.0));
                for r in 0..group {
                    let head = kv_head * group + r;
                    let q_base = ((row * heads + head) * seq + t) * key_width;
                    let query = &inputs.queries[q_base..q_base + key_width];
                    weights.clear();
                    weights.extend(visible.iter().map(|&l| dot(query, key(l)) * scale));
                    if let Some(bias) = inputs.bias {
                        let bias = &bias[((row * heads + head) * seq + t) * key_len..][..key_len];
                        for (weight, &l) in weights.iter_mut().zip(&visible) {
                            *weight += bias[l];
                        }
                    }
                    let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut total = 0f32;
                    for weight in weights.iter_mut() {
                        *weight = (*weight - max).exp();
                        total += *weight;
                    }
                    let out = &mut block[(t * group + r) * value_width..][..value_width];
                    for (&l, &weight) in visible.iter().zip(&weights) {
                        let p = weight / total;
                        for (o, v) in out.iter_mut().zip(value(l)) {
                            *o += p * v;
                        }
                    }
                }
            }
            block
        })
        .collect();
    // Interleave the blocks into [batch, seq, heads, value_width].
    let mut output = vec![0f32; batch * seq * heads * value_width];
    for (task, block) in blocks.iter().enumerate() {
        let (row, kv_head) = (task / kv_heads, task % kv_heads);
        for t in 0..seq {
            let src = &block[t * group * value_width..(t + 1) * group * value_width];
            let dst = ((row * seq + t) * heads + kv_head * group) * value_width;
            output[dst..dst + group * value_width].copy_from_slice(src);
        }
    }
    output
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [0f32; LANES];
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a_block, b_block) in a_blocks.zip(b_blocks) {
        for ((lane, x), y) in lanes.iter_mut().zip(a_block).zip(b_block) {
            *lane += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}
