//! Rotary position embeddings.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Rotary position embeddings in the "rotate half" layout of Llama and Mistral.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
}

/// Cosines and sines for one step, `[batch, seq, head_dim / 2]` each.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Frequencies `1 / theta^(2i / head_dim)`, computed in f32 as transformers does.
    pub fn new(head_dim: usize, rope_theta: f64) -> Self {
        let inv_freq = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0f32 / (rope_theta as f32).powf(i as f32 / head_dim as f32))
            .collect();
        Self { inv_freq }
    }

    /// The tables for `positions` (row-major `[batch, seq]`).
    pub fn tables(
        &self,
        positions: &[u32],
        batch: usize,
        seq: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<RotaryTables> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &position in positions {
            for &freq in &self.inv_freq {
                // The angle is rounded to f32 before cos/sin, as in transformers' cached tables.
                let angle = position as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (batch, seq, half);
        Ok(RotaryTables {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }
}

impl RotaryTables {
    /// Rotates `x` (`[batch, heads, seq, head_dim]`), each row at its own positions. Uses
    /// candle's fused kernel.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::rotary_emb::rope(
            &x.contiguous()?,
            &self.cos,
            &self.sin,
        )?)
    }
}
