//! Normalisations: RMSNorm, LayerNorm and MobileBERT's NoNorm.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::error::{EngineError, Result};

/// Root-mean-square normalisation: `x / sqrt(mean(x^2) + eps) * weight`, computed in f32 as
/// transformers does. Uses candle's fused kernel.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `weight` of size `dim`.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// Which normalisation a model's blocks use (MobileBERT's `normalization_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `layer_norm`: torch's LayerNorm.
    LayerNorm,
    /// `no_norm`: MobileBERT's NoNorm, an element-wise affine map `x * weight + bias`.
    NoNorm,
}

impl NormKind {
    /// Parses `layer_norm` or `no_norm`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "layer_norm" => Ok(Self::LayerNorm),
            "no_norm" => Ok(Self::NoNorm),
            other => Err(EngineError::UnsupportedConfig(format!(
                "normalization_type {other:?} is not implemented; known: layer_norm, no_norm"
            ))),
        }
    }
}

/// A LayerNorm or a NoNorm over the last dimension, with its weight and bias.
#[derive(Debug, Clone)]
pub struct Norm {
    kind: NormKind,
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    /// Loads `weight` and `bias` of size `size`. `eps` matters for LayerNorm only.
    pub fn load(vb: VarBuilder, kind: NormKind, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            kind,
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    /// A torch LayerNorm (`weight`, `bias`).
    pub fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Self::load(vb, NormKind::LayerNorm, size, eps)
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.kind {
            // candle's fused kernel, which accumulates in f32 whatever the dtype.
            NormKind::LayerNorm => {
                candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
            }
            NormKind::NoNorm => x.broadcast_mul(&self.weight)?.broadcast_add(&self.bias),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn no_norm_is_an_affine_map_and_layer_norm_normalises() {
        let vb = VarBuilder::from_tensors(
            [
                (
                    "weight".to_string(),
                    Tensor::new(&[2f32, 3.], &Device::Cpu).unwrap(),
                ),
                (
                    "bias".to_string(),
                    Tensor::new(&[1f32, -1.], &Device::Cpu).unwrap(),
                ),
            ]
            .into(),
            DType::F32,
            &Device::Cpu,
        );
        let x = Tensor::new(&[[1f32, 5.]], &Device::Cpu).unwrap();
        let no_norm = Norm::load(vb.clone(), NormKind::NoNorm, 2, 1e-12).unwrap();
        assert_eq!(
            no_norm.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            [[3., 14.]]
        );
        let layer_norm = Norm::layer_norm(vb, 2, 0.0).unwrap();
        let y = layer_norm.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!(
            (y[0][0] - -1.0).abs() < 1e-5 && (y[0][1] - 2.0).abs() < 1e-5,
            "{y:?}"
        );
        assert!(NormKind::parse("batch_norm").is_err());
    }
}
