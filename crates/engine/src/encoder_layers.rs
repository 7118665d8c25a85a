//! Building blocks shared by the BERT-family encoders (MobileBERT, MegatronBERT): activations by
//! their transformers names, LayerNorm and MobileBERT's NoNorm, the right-padded batch with its
//! attention mask, and bidirectional self-attention.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::encoder::EncoderInput;
use crate::error::{EngineError, Result};
use crate::layers::Linear;

/// An activation function, named as in transformers 4.37.2's `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HiddenAct {
    /// `gelu`, `gelu_python`: the exact GELU, `x * Φ(x)` with the error function.
    Gelu,
    /// `gelu_10`: the exact GELU clipped to `[-10, 10]`.
    GeluClipped10,
    /// `gelu_new`, `gelu_fast`, `gelu_accurate`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `laplace`: `0.5 * (1 + erf((x - μ) / (σ √2)))` with μ = 0.707107, σ = 0.282095.
    Laplace,
    /// `leaky_relu`: torch's default negative slope, 0.01.
    LeakyRelu,
    /// `linear`: the identity.
    Linear,
    /// `mish`: `x * tanh(softplus(x))`.
    Mish,
    /// `relu`.
    Relu,
    /// `relu2`: `relu(x)^2`.
    Relu2,
    /// `relu6`: `min(max(x, 0), 6)`.
    Relu6,
    /// `sigmoid`.
    Sigmoid,
    /// `silu`, `swish`.
    Silu,
    /// `tanh`.
    Tanh,
}

impl HiddenAct {
    /// The activations transformers knows, by name.
    pub const NAMES: &'static [&'static str] = &[
        "gelu",
        "gelu_10",
        "gelu_fast",
        "gelu_new",
        "gelu_python",
        "gelu_pytorch_tanh",
        "gelu_accurate",
        "laplace",
        "leaky_relu",
        "linear",
        "mish",
        "quick_gelu",
        "relu",
        "relu2",
        "relu6",
        "sigmoid",
        "silu",
        "swish",
        "tanh",
    ];

    /// Parses a `hidden_act` value; unknown names are refused.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" | "gelu_python" => Self::Gelu,
            "gelu_10" => Self::GeluClipped10,
            "gelu_new" | "gelu_fast" | "gelu_accurate" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "laplace" => Self::Laplace,
            "leaky_relu" => Self::LeakyRelu,
            "linear" => Self::Linear,
            "mish" => Self::Mish,
            "relu" => Self::Relu,
            "relu2" => Self::Relu2,
            "relu6" => Self::Relu6,
            "sigmoid" => Self::Sigmoid,
            "silu" | "swish" => Self::Silu,
            "tanh" => Self::Tanh,
            other => {
                return Err(EngineError::UnsupportedConfig(format!(
                    "hidden_act {other:?} is not implemented; known: {}",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }
}

impl Module for HiddenAct {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluClipped10 => x.gelu_erf()?.clamp(-10f32, 10f32),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Laplace => {
                // transformers' rounded constants (μ is close to, not exactly, 1/√2).
                #[allow(clippy::approx_constant)]
                let (mu, sigma) = (0.707107, 0.282095);
                ((x - mu)? / (sigma * std::f64::consts::SQRT_2))?
                    .erf()?
                    .affine(0.5, 0.5)
            }
            Self::LeakyRelu => x.maximum(&(x * 0.01)?),
            Self::Linear => Ok(x.clone()),
            Self::Mish => {
                // softplus(x) = max(x, 0) + log(1 + exp(-|x|)), which never overflows.
                let softplus = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                x * softplus.tanh()?
            }
            Self::Relu => x.relu(),
            Self::Relu2 => x.relu()?.sqr(),
            Self::Relu6 => x.clamp(0f32, 6f32),
            Self::Sigmoid => candle_nn::ops::sigmoid(x),
            Self::Silu => x.silu(),
            Self::Tanh => x.tanh(),
        }
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

/// What a model accepts as input, to refuse a bad batch before any tensor work.
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Segment ids must be below this.
    pub type_vocab_size: usize,
    /// Sequences may be at most this long.
    pub max_positions: usize,
    /// Whether a token sees only itself and earlier tokens (config.json's `is_decoder`), as
    /// transformers' extended attention mask makes it.
    pub causal: bool,
}

/// A batch of sequences padded on the right to the longest, as tensors on the model's device.
#[derive(Debug)]
pub struct PaddedBatch {
    /// `[batch, seq_len]` token ids, 0 in padding.
    pub input_ids: Tensor,
    /// `[batch, seq_len]` segment ids, 0 in padding.
    pub token_type_ids: Tensor,
    /// Additive f32 mask over the keys, `[batch, 1, 1, seq_len]` (`[batch, 1, seq_len,
    /// seq_len]` when causal): 0 where a query may see a key and f32::MIN elsewhere, as
    /// transformers' `(1 - mask) * finfo.min`. Broadcasts over heads.
    pub attention_mask: Tensor,
    /// `[batch, seq_len, 1]` in the model's dtype: 1 at real tokens, 0 in padding.
    pub token_mask: Tensor,
    /// `[real tokens]` u32 indexes of the real tokens in the flattened `[batch * seq_len]`.
    pub real_tokens: Tensor,
    /// Each sequence's length.
    pub lengths: Vec<usize>,
    /// Columns of the padded batch.
    pub seq_len: usize,
}

impl PaddedBatch {
    /// Pads `inputs` after checking them against `limits`.
    pub fn new(
        inputs: &[EncoderInput],
        limits: &InputLimits,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        for input in inputs {
            validate(input, limits)?;
        }
        let batch = inputs.len();
        let lengths: Vec<usize> = inputs.iter().map(|input| input.ids.len()).collect();
        let seq_len = lengths.iter().copied().max().unwrap_or(0);
        let mut input_ids = vec![0u32; batch * seq_len];
        let mut type_ids = vec![0u32; batch * seq_len];
        let mut token_mask = vec![0f32; batch * seq_len];
        let mut real_tokens = Vec::with_capacity(lengths.iter().sum());
        for (row, input) in inputs.iter().enumerate() {
            let start = row * seq_len;
            let len = input.ids.len();
            input_ids[start..start + len].copy_from_slice(&input.ids);
            type_ids[start..start + len].copy_from_slice(&input.type_ids);
            token_mask[start..start + len].fill(1.0);
            real_tokens.extend((start..start + len).map(|i| i as u32));
        }
        let hidden = |visible: bool| if visible { 0.0 } else { f32::MIN };
        let attention_mask = if limits.causal {
            let mut mask = Vec::with_capacity(batch * seq_len * seq_len);
            for &len in &lengths {
                for query in 0..seq_len {
                    mask.extend((0..seq_len).map(|key| hidden(key < len && key <= query)));
                }
            }
            Tensor::from_vec(mask, (batch, 1, seq_len, seq_len), device)?
        } else {
            let mask = token_mask.iter().map(|&m| hidden(m == 1.0)).collect();
            Tensor::from_vec(mask, (batch, 1, 1, seq_len), device)?
        };
        let real_count = real_tokens.len();
        Ok(Self {
            input_ids: Tensor::from_vec(input_ids, (batch, seq_len), device)?,
            token_type_ids: Tensor::from_vec(type_ids, (batch, seq_len), device)?,
            attention_mask,
            token_mask: Tensor::from_vec(token_mask, (batch, seq_len, 1), device)?
                .to_dtype(dtype)?,
            real_tokens: Tensor::from_vec(real_tokens, real_count, device)?,
            lengths,
            seq_len,
        })
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// The real tokens' rows of `x` (`[batch, seq_len, dim]`), all sequences one after the
    /// other: `[real tokens, dim]`.
    pub fn real_rows(&self, x: &Tensor) -> Result<Tensor> {
        let dim = x.dim(D::Minus1)?;
        let flat = x.reshape((self.batch_size() * self.seq_len, dim))?;
        Ok(flat.index_select(&self.real_tokens, 0)?)
    }

    /// Splits per-token rows (as [`PaddedBatch::real_rows`] orders them) into one list per
    /// sequence.
    pub fn split_by_sequence<T>(&self, rows: Vec<T>) -> Vec<Vec<T>> {
        let mut rows = rows.into_iter();
        self.lengths
            .iter()
            .map(|&len| rows.by_ref().take(len).collect())
            .collect()
    }
}

fn validate(input: &EncoderInput, limits: &InputLimits) -> Result<()> {
    let len = input.ids.len();
    if len == 0 {
        return Err(EngineError::InvalidRequest(
            "an encoder input needs at least one token".into(),
        ));
    }
    if len > limits.max_positions {
        return Err(EngineError::ContextOverflow {
            tokens: len,
            max_context: limits.max_positions,
        });
    }
    if input.type_ids.len() != len {
        return Err(EngineError::InvalidRequest(format!(
            "{} segment ids for {len} tokens",
            input.type_ids.len()
        )));
    }
    if let Some(&bad) = input
        .ids
        .iter()
        .find(|&&id| id as usize >= limits.vocab_size)
    {
        return Err(EngineError::InvalidRequest(format!(
            "token id {bad} is out of range for a vocabulary of {}",
            limits.vocab_size
        )));
    }
    if let Some(&bad) = input
        .type_ids
        .iter()
        .find(|&&id| id as usize >= limits.type_vocab_size)
    {
        return Err(EngineError::InvalidRequest(format!(
            "segment id {bad} is out of range for {} segment types",
            limits.type_vocab_size
        )));
    }
    Ok(())
}

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
    /// masked by `mask` (see [`PaddedBatch::attention_mask`]). Returns the context
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
    /// additive f32 `mask`; the softmax runs in f32 whatever the model's dtype.
    pub fn attend(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (batch, _, seq, _) = queries.dims4()?;
        let scores = (queries.matmul(&keys.t()?)? * self.scale)?
            .to_dtype(DType::F32)?
            .broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(values.dtype())?;
        Ok(probs.matmul(values)?.transpose(1, 2)?.reshape((
            batch,
            seq,
            self.num_heads * self.head_dim,
        ))?)
    }
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

    #[test]
    fn activations_match_transformers() {
        // Values from transformers 4.37.2's ACT2FN in float32.
        let x = [
            -25.0f32, -12.0, -3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.5, 7.0, 12.0, 25.0,
        ];
        let cases: &[(&str, [f32; 12])] = &[
            (
                "gelu",
                [
                    0.0,
                    0.0,
                    -0.004050225,
                    -0.1586553,
                    -0.1542688,
                    0.0,
                    0.1853734,
                    0.8413447,
                    2.484476,
                    7.0,
                    12.0,
                    25.0,
                ],
            ),
            (
                "gelu_10",
                [
                    0.0,
                    0.0,
                    -0.004050225,
                    -0.1586553,
                    -0.1542688,
                    0.0,
                    0.1853734,
                    0.8413447,
                    2.484476,
                    7.0,
                    10.0,
                    10.0,
                ],
            ),
            (
                "gelu_new",
                [
                    0.0,
                    0.0,
                    -0.003637433,
                    -0.158808,
                    -0.154286,
                    0.0,
                    0.1853709,
                    0.841192,
                    2.484916,
                    7.0,
                    12.0,
                    25.0,
                ],
            ),
            (
                "laplace",
                [
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                    9.387732e-06,
                    0.006094456,
                    0.07448831,
                    0.8504297,
                    1.0,
                    1.0,
                    1.0,
                    1.0,
                ],
            ),
            (
                "leaky_relu",
                [
                    -0.25, -0.12, -0.03, -0.01, -0.005, 0.0, 0.3, 1.0, 2.5, 7.0, 12.0, 25.0,
                ],
            ),
            (
                "mish",
                [
                    -3.471986e-10,
                    -7.373032e-05,
                    -0.1456475,
                    -0.3034014,
                    -0.2207438,
                    0.0,
                    0.2080014,
                    0.8650984,
                    2.471392,
                    6.999989,
                    12.0,
                    25.0,
                ],
            ),
            (
                "quick_gelu",
                [
                    -8.292971e-18,
                    -1.618642e-08,
                    -0.01807131,
                    -0.1542042,
                    -0.1496116,
                    0.0,
                    0.1874841,
                    0.8457958,
                    2.465014,
                    6.999953,
                    12.0,
                    25.0,
                ],
            ),
            (
                "relu2",
                [
                    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.09, 1.0, 6.25, 49.0, 144.0, 625.0,
                ],
            ),
            (
                "relu6",
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0, 2.5, 6.0, 6.0, 6.0],
            ),
            (
                "sigmoid",
                [
                    1.388794e-11,
                    6.144174e-06,
                    0.04742587,
                    0.2689414,
                    0.3775407,
                    0.5,
                    0.5744425,
                    0.7310586,
                    0.9241418,
                    0.999089,
                    0.9999938,
                    1.0,
                ],
            ),
            (
                "swish",
                [
                    -3.471986e-10,
                    -7.373009e-05,
                    -0.1422776,
                    -0.2689414,
                    -0.1887703,
                    0.0,
                    0.1723328,
                    0.7310586,
                    2.310354,
                    6.993623,
                    11.99993,
                    25.0,
                ],
            ),
            (
                "tanh",
                [
                    -1.0, -1.0, -0.9950548, -0.7615942, -0.4621172, 0.0, 0.2913126, 0.7615942,
                    0.9866143, 0.9999983, 1.0, 1.0,
                ],
            ),
        ];
        let input = Tensor::new(&x, &Device::Cpu).unwrap();
        for (name, expected) in cases {
            let actual: Vec<f32> = HiddenAct::parse(name)
                .unwrap()
                .forward(&input)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "{name}({}): ours {a}, transformers {e}",
                    x[i]
                );
            }
        }
        for name in HiddenAct::NAMES {
            assert!(HiddenAct::parse(name).is_ok(), "{name}");
        }
        let error = HiddenAct::parse("gelu_fancy").unwrap_err().to_string();
        assert!(
            error.contains("gelu_fancy") && error.contains("quick_gelu"),
            "{error}"
        );
    }

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

    fn input(ids: &[u32]) -> EncoderInput {
        EncoderInput {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
        }
    }

    const LIMITS: InputLimits = InputLimits {
        vocab_size: 10,
        type_vocab_size: 2,
        max_positions: 4,
        causal: false,
    };

    #[test]
    fn padding_is_masked_and_real_tokens_are_indexed() {
        let batch = PaddedBatch::new(
            &[input(&[1, 2, 3]), input(&[4])],
            &LIMITS,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let mask: Vec<f32> = batch
            .attention_mask
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(mask, [0., 0., 0., 0., f32::MIN, f32::MIN]);
        let real: Vec<u32> = batch.real_tokens.to_vec1().unwrap();
        assert_eq!(real, [0, 1, 2, 3]);
        assert_eq!(batch.split_by_sequence(real), [vec![0, 1, 2], vec![3]]);

        let causal = InputLimits {
            causal: true,
            ..LIMITS
        };
        let batch = PaddedBatch::new(
            &[input(&[1, 2]), input(&[4])],
            &causal,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let mask: Vec<Vec<f32>> = batch
            .attention_mask
            .get(1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(mask, [[0., f32::MIN], [0., f32::MIN]]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let refuse = |inputs: &[EncoderInput]| {
            PaddedBatch::new(inputs, &LIMITS, DType::F32, &Device::Cpu)
                .unwrap_err()
                .to_string()
        };
        assert!(refuse(&[input(&[])]).contains("at least one token"));
        assert!(refuse(&[input(&[1; 5])]).contains("maximum context of 4"));
        assert!(refuse(&[input(&[10])]).contains("token id 10"));
        let mut bad_types = input(&[1, 2]);
        bad_types.type_ids = vec![0, 2];
        assert!(refuse(&[bad_types.clone()]).contains("segment id 2"));
        bad_types.type_ids = vec![0];
        assert!(refuse(&[bad_types]).contains("1 segment ids for 2 tokens"));
    }

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
