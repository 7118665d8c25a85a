//! Blocks shared by the BERT-family encoders (MobileBERT, MegatronBERT): bidirectional
//! self-attention over a padded batch and the dense + norm output block.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::Result;
use crate::layers::{Linear, Norm, NormKind};

/// The query, key and value projections of a self-attention block and the scaled dot-product
/// attention over a padded batch.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    projections: Projections,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
    span: tracing::Span,
}

/// The projections, fused at load as far as their inputs allow.
#[derive(Debug, Clone)]
enum Projections {
    /// Query, key and value read the same input: one matmul.
    QueryKeyValue(Linear),
    /// Query and key read one input and value another (MobileBERT's shared key/query
    /// bottleneck).
    QueryKeyThenValue { query_key: Linear, value: Linear },
}

impl SelfAttention {
    /// Loads `query`, `key` (`query_key_in -> heads * head_dim`) and `value`
    /// (`value_in -> heads * head_dim`), all with biases, from `vb` (transformers' `*.self`).
    /// With `value_shares_input` the three are fused into one projection, and
    /// [`SelfAttention::forward`] must be given the same tensor twice.
    pub fn load(
        vb: VarBuilder,
        query_key_in: usize,
        value_in: usize,
        num_heads: usize,
        head_dim: usize,
        value_shares_input: bool,
    ) -> Result<Self> {
        let all_heads = num_heads * head_dim;
        let query = Linear::load(vb.pp("query"), query_key_in, all_heads, true)?;
        let key = Linear::load(vb.pp("key"), query_key_in, all_heads, true)?;
        let value = Linear::load(vb.pp("value"), value_in, all_heads, true)?;
        let projections = if value_shares_input {
            Projections::QueryKeyValue(Linear::fused(&[query, key, value])?.into_batched_layout()?)
        } else {
            Projections::QueryKeyThenValue {
                query_key: Linear::fused(&[query, key])?.into_batched_layout()?,
                value: value.into_batched_layout()?,
            }
        };
        Ok(Self {
            projections,
            num_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            span: tracing::span!(tracing::Level::TRACE, "self-attention"),
        })
    }

    /// Heads of the attention.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// Size of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Queries, keys and values of `query_key_input` and `value_input` (`[batch, seq, dim]`),
    /// each `[batch, heads, seq, head_dim]` and contiguous.
    pub fn project(
        &self,
        query_key_input: &Tensor,
        value_input: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (batch, seq, _) = query_key_input.dims3()?;
        let all_heads = self.num_heads * self.head_dim;
        let (query_key, value) = match &self.projections {
            Projections::QueryKeyValue(qkv) => {
                let qkv = qkv.forward(query_key_input)?;
                let value = qkv.narrow(D::Minus1, 2 * all_heads, all_heads)?;
                (qkv, value)
            }
            Projections::QueryKeyThenValue { query_key, value } => (
                query_key.forward(query_key_input)?,
                value.forward(value_input)?,
            ),
        };
        // [batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]
        let heads = |x: Tensor| -> Result<Tensor> {
            Ok(x.reshape((batch, seq, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        Ok((
            heads(query_key.narrow(D::Minus1, 0, all_heads)?)?,
            heads(query_key.narrow(D::Minus1, all_heads, all_heads)?)?,
            heads(value)?,
        ))
    }

    /// Attention of `query_key_input`'s queries over its keys and `value_input`'s values,
    /// masked by `mask` (see [`crate::encoder::batch::PaddedBatch::attention_mask`]). Returns the context
    /// `[batch, seq, heads * head_dim]`.
    pub fn forward(
        &self,
        query_key_input: &Tensor,
        value_input: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (queries, keys, values) = self.project(query_key_input, value_input)?;
        self.attend(&queries, &keys, &values, mask)
    }

    /// Scaled dot-product attention of `[batch, heads, seq, head_dim]` tensors under an
    /// additive f32 `mask` (see [`scaled_attention`]).
    pub fn attend(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        scaled_attention(queries, keys, values, mask, self.scale)
    }
}

/// Attention of `[batch, heads, seq, head_dim]` queries over keys and values under an additive f32
/// `mask` (`[batch, 1, 1 or seq, seq]`), the scores scaled by `scale`; the softmax runs in f32
/// whatever the model's dtype. Returns the context `[batch, seq, heads * head_dim]`.
pub fn scaled_attention(
    queries: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (batch, heads, seq, _) = queries.dims4()?;
    let value_width = values.dim(D::Minus1)?;
    let scores = (queries.matmul(&keys.t()?)? * scale)?
        .to_dtype(DType::F32)?
        .broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(values.dtype())?;
    Ok(probs
        .matmul(values)?
        .transpose(1, 2)?
        .reshape((batch, seq, heads * value_width))?)
}

/// A dense layer with bias (`in_dim -> out_dim`) in the batched layout every encoder layer uses
/// (see [`Linear::into_batched_layout`]).
pub fn dense(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    Linear::load(vb, in_dim, out_dim, true)?.into_batched_layout()
}

/// `norm(dense(x) + residual)`, the output block BERT-family layers repeat, or `norm(dense(x))`
/// without a residual (MobileBERT's bottleneck).
#[derive(Debug, Clone)]
pub struct DenseNorm {
    dense: Linear,
    norm: Norm,
}

impl DenseNorm {
    /// Loads `dense` (`in_dim -> out_dim`, with bias) and the norm under `norm_name`.
    pub fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        norm_name: &str,
        kind: NormKind,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            dense: dense(vb.pp("dense"), in_dim, out_dim)?,
            norm: Norm::load(vb.pp(norm_name), kind, out_dim, eps)?,
        })
    }

    /// `norm(dense(x) + residual)`, or `norm(dense(x))`.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let y = self.dense.forward(x)?;
        let y = match residual {
            Some(residual) => (y + residual)?,
            None => y,
        };
        Ok(self.norm.forward(&y)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::batch::tests::{input, LIMITS};
    use crate::encoder::batch::{InputLimits, PaddedBatch};
    use candle_core::{DType, Device};

    #[test]
    fn padding_does_not_change_attention_of_real_tokens() {
        let device = Device::Cpu;
        let (hidden, heads) = (8, 2);
        let vb = VarBuilder::from_tensors(
            ["query", "key", "value"]
                .into_iter()
                .flat_map(|name| {
                    [
                        (
                            format!("{name}.weight"),
                            Tensor::randn(0f32, 1., (hidden, hidden), &device).unwrap(),
                        ),
                        (
                            format!("{name}.bias"),
                            Tensor::randn(0f32, 1., hidden, &device).unwrap(),
                        ),
                    ]
                })
                .collect(),
            DType::F32,
            &device,
        );
        let attention = SelfAttention::load(vb, hidden, hidden, heads, 4, true).unwrap();
        let limits = InputLimits {
            max_positions: 8,
            ..LIMITS
        };
        let x = Tensor::randn(0f32, 1., (2, 5, hidden), &device).unwrap();
        let batch = PaddedBatch::new(
            &[input(&[1; 5]), input(&[1; 2])],
            &limits,
            DType::F32,
            &device,
        )
        .unwrap();
        let both = attention.forward(&x, &x, &batch.attention_mask).unwrap();
        let short = x.narrow(0, 1, 1).unwrap().narrow(1, 0, 2).unwrap();
        let alone_batch =
            PaddedBatch::new(&[input(&[1; 2])], &limits, DType::F32, &device).unwrap();
        let alone = attention
            .forward(&short, &short, &alone_batch.attention_mask)
            .unwrap();
        let in_batch: Vec<Vec<f32>> = both
            .get(1)
            .unwrap()
            .narrow(0, 0, 2)
            .unwrap()
            .to_vec2()
            .unwrap();
        let alone: Vec<Vec<f32>> = alone.get(0).unwrap().to_vec2().unwrap();
        for (a, b) in in_batch.iter().flatten().zip(alone.iter().flatten()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
