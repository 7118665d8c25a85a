//! Pooling a sequence's hidden states to one vector, on the device, for embeddings.

use candle_core::{DType, Tensor};

use crate::encoder::batch::PaddedBatch;
use crate::error::Result;

/// How a sequence's last hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pooling {
    /// The mean over the sequence's tokens, special tokens included (sentence-transformers'
    /// default).
    #[default]
    Mean,
    /// The first token's hidden state (`[CLS]`).
    Cls,
    /// The model's pooler output (`tanh(dense(CLS))` for BERT-like models).
    Pooler,
}

impl Pooling {
    /// Every pooling, in the order [`Pooling::name`] lists them.
    pub const ALL: [Self; 3] = [Self::Mean, Self::Cls, Self::Pooler];

    /// Parses `mean`, `cls` or `pooler`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|pooling| pooling.name() == name)
    }

    /// The pooling's name in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Cls => "cls",
            Self::Pooler => "pooler",
        }
    }
}

/// `[batch, hidden]` f32: each sequence's mean over its real tokens of `hidden`
/// (`[batch, seq_len, hidden]`), accumulated in f32 whatever the model's dtype.
pub fn mean(hidden: &Tensor, batch: &PaddedBatch) -> Result<Tensor> {
    let hidden = hidden.to_dtype(DType::F32)?;
    let mask = batch.token_mask.to_dtype(DType::F32)?;
    let sums = hidden.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?;
    Ok(sums.broadcast_div(&counts)?)
}

/// `[batch, hidden]`: each sequence's first token of `hidden` (`[batch, seq_len, hidden]`).
pub fn first_token(hidden: &Tensor) -> Result<Tensor> {
    Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::encoder::batch::tests::three_and_one;

    #[test]
    fn mean_counts_real_tokens_only() {
        let batch = three_and_one();
        // Padding holds 100s: a mean over the padded row would see them.
        let hidden = Tensor::new(
            &[
                [[1f32, 2.], [3., 4.], [5., 6.]],
                [[7., 8.], [100., 100.], [100., 100.]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let pooled: Vec<Vec<f32>> = mean(&hidden, &batch).unwrap().to_vec2().unwrap();
        assert_eq!(pooled, [[3., 4.], [7., 8.]]);
        let first: Vec<Vec<f32>> = first_token(&hidden).unwrap().to_vec2().unwrap();
        assert_eq!(first, [[1., 2.], [7., 8.]]);
    }

    #[test]
    fn names_round_trip() {
        for pooling in Pooling::ALL {
            assert_eq!(Pooling::parse(pooling.name()), Some(pooling));
        }
        assert_eq!(Pooling::parse("max"), None);
    }
}
