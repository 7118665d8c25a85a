//! Rotary position embeddings.

use candle_core::{DType, Device, Tensor};

use crate::decoder::step::StepBatch;
use crate::error::Result;

/// Rotary position embeddings in the "rotate half" layout of Llama and Mistral, with the cosines
/// and sines of every position below `max_positions` computed once at load, on the device.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    /// `[max_positions, head_dim / 2]` each, in the model's dtype.
    cos: Tensor,
    sin: Tensor,
}

/// Cosines and sines for one step, `[batch, seq, head_dim / 2]` each.
#[derive(Debug, Clone)]
pub struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Frequencies `1 / theta^(2i / head_dim)`, computed in f32 as transformers does, and the
    /// tables of positions `0..max_positions`.
    pub fn new(
        head_dim: usize,
        rope_theta: f64,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0f32 / (rope_theta as f32).powf(i as f32 / head_dim as f32))
            .collect();
        let positions: Vec<u32> = (0..max_positions as u32).collect();
        let (cos, sin) = angles(
            &inv_freq,
            &positions,
            (max_positions, inv_freq.len()),
            dtype,
            device,
        )?;
        Ok(Self { inv_freq, cos, sin })
    }

    /// The tables for the batch's positions: rows of the load-time tables picked on the device.
    /// Positions past the tables (a context configured beyond `max_position_embeddings`) are
    /// computed for the step instead, with the same values.
    pub fn tables(&self, batch: &StepBatch) -> Result<RotaryTables> {
        let (rows, seq) = (batch.batch_size(), batch.seq_len);
        let half = self.inv_freq.len();
        let shape = (rows, seq, half);
        let within = batch
            .positions
            .iter()
            .all(|&p| (p as usize) < self.cos.dim(0).unwrap_or(0));
        if !within {
            let (cos, sin) = angles(
                &self.inv_freq,
                &batch.positions,
                shape,
                self.cos.dtype(),
                self.cos.device(),
            )?;
            return Ok(RotaryTables { cos, sin });
        }
        let pick = |table: &Tensor| -> Result<Tensor> {
            Ok(table
                .index_select(batch.position_ids(), 0)?
                .reshape(shape)?)
        };
        Ok(RotaryTables {
            cos: pick(&self.cos)?,
            sin: pick(&self.sin)?,
        })
    }
}

/// Cosines and sines of `positions` times each frequency, shaped `shape`. The angle is rounded to
/// f32 before cos/sin, as in transformers' cached tables.
fn angles(
    inv_freq: &[f32],
    positions: &[u32],
    shape: impl Into<candle_core::Shape>,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let mut cos = Vec::with_capacity(positions.len() * inv_freq.len());
    let mut sin = Vec::with_capacity(positions.len() * inv_freq.len());
    for &position in positions {
        for &freq in inv_freq {
            let angle = position as f32 * freq;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let shape = shape.into();
    Ok((
        Tensor::from_vec(cos, shape.clone(), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
    ))
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
