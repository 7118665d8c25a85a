//! Mistral (transformers 4.37.2 `modeling_mistral`): RMSNorm, rotary embeddings, grouped-query
//! attention with an optional sliding window, and a SiLU-gated MLP.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Activation, Embedding, VarBuilder};
use serde::Deserialize;

use crate::attention::{Attention, AttentionPattern, AttentionSpec};
use crate::decoder::state::{SequenceState, StateSpec};
use crate::decoder::step::{Step, StepBatch, StepRow};
use crate::decoder::{CausalLm, LogitsMode};
use crate::encoder::labels::Labels;
use crate::encoder::{
    EncoderContract, EncoderInput, EncoderModel, EncoderOutput, EncoderTask, InputLimits,
};
use crate::error::{EngineError, Result};
use crate::layers::SparseMoe;
use crate::layers::{
    GatedMlp, Linear, Quantize, QuantizeOptions, QuantizeReport, RmsNorm, RotaryEmbedding,
    RotaryTables, WeightQuantization,
};
use crate::models::{refuse_if_set, scored_token};

fn default_kv_heads() -> usize {
    8
}
fn default_hidden_act() -> Activation {
    Activation::Silu
}
fn default_max_position_embeddings() -> usize {
    4096 * 32
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_sliding_window() -> Option<usize> {
    Some(4096)
}

/// config.json of a Mistral model, with transformers 4.37.2's defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct MistralConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_kv_heads")]
    pub num_key_value_heads: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// The attention window W; `null` means full causal attention.
    #[serde(default = "default_sliding_window")]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Later configs name the head size; 4.37.2 always uses hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Not implemented: refused when set.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

impl MistralConfig {
    pub(crate) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The layers' attention: grouped-query softmax attention over the sliding window, or
    /// causal attention over everything without one.
    pub fn attention(&self) -> AttentionSpec {
        let pattern = match self.sliding_window {
            Some(window) => AttentionPattern::SlidingWindow(window),
            None => AttentionPattern::Full,
        };
        AttentionSpec::softmax(
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim(),
            pattern,
        )
    }

    /// Refuses what the implementation would otherwise get silently wrong.
    pub fn validate(&self) -> Result<()> {
        refuse_if_set("rope_scaling", &self.rope_scaling)?;
        let unsupported = |what: String| Err(EngineError::UnsupportedConfig(what));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return unsupported(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if let Some(head_dim) = self.head_dim {
            if head_dim != self.head_dim() {
                return unsupported(format!(
                    "head_dim {head_dim} differs from hidden_size / num_attention_heads = {}",
                    self.head_dim()
                ));
            }
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return unsupported(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return unsupported(format!(
                "rotary embeddings need an even head size, got {}",
                self.head_dim()
            ));
        }
        if self.sliding_window == Some(0) {
            return unsupported("sliding_window = 0".into());
        }
        Ok(())
    }
}

/// `MistralAttention`: q/k/v projections (fused at load), rotary embeddings, attention over the
/// rolling cache, output projection.
#[derive(Debug, Clone)]
pub struct MistralAttention {
    qkv_proj: Linear,
    o_proj: Linear,
    attention: Attention,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl MistralAttention {
    pub fn load(vb: VarBuilder, config: &MistralConfig) -> Result<Self> {
        let head_dim = config.head_dim();
        let (hidden, heads, kv_heads) = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
        );
        let q_proj = Linear::load(vb.pp("q_proj"), hidden, heads * head_dim, false)?;
        let k_proj = Linear::load(vb.pp("k_proj"), hidden, kv_heads * head_dim, false)?;
        let v_proj = Linear::load(vb.pp("v_proj"), hidden, kv_heads * head_dim, false)?;
        // Packed panels on CPU, as the MLP's (see GatedMlp::load_named).
        Ok(Self {
            qkv_proj: Linear::fused(&[q_proj, k_proj, v_proj])?.into_batched_layout()?,
            o_proj: Linear::load(vb.pp("o_proj"), heads * head_dim, hidden, false)?
                .into_batched_layout()?,
            attention: Attention::new(config.attention()),
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            span: tracing::span!(tracing::Level::TRACE, "attention"),
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryTables,
        step: &Step,
        layer: usize,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (rows, seq, _) = x.dims3()?;
        let qkv = self.qkv_proj.forward(x)?;
        let q_size = self.num_heads * self.head_dim;
        let kv_size = self.num_kv_heads * self.head_dim;
        // [batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]
        let split = |offset: usize, size: usize, heads: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, offset, size)?
                .reshape((rows, seq, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let queries = rotary.apply(&split(0, q_size, self.num_heads)?)?;
        let keys = rotary.apply(&split(q_size, kv_size, self.num_kv_heads)?)?;
        let values = split(q_size + kv_size, kv_size, self.num_kv_heads)?;
        let output = self
            .attention
            .forward(&queries, &keys, &values, None, step, layer)?;
        Ok(self.o_proj.forward(&output)?)
    }
}

impl Quantize for MistralAttention {
    fn quantize(&mut self, format: WeightQuantization, report: &mut QuantizeReport) -> Result<()> {
        self.qkv_proj.quantize(format, report)?;
        self.o_proj.quantize(format, report)
    }
}

/// The feed-forward block of a decoder layer: Mistral's dense MLP or Mixtral's sparse mixture of
/// experts.
#[derive(Debug, Clone)]
pub enum FeedForward {
    Dense(GatedMlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => Ok(mlp.forward(x)?),
            Self::Sparse(moe) => moe.forward(x),
        }
    }
}

impl Quantize for FeedForward {
    fn quantize(&mut self, format: WeightQuantization, report: &mut QuantizeReport) -> Result<()> {
        match self {
            Self::Dense(mlp) => mlp.quantize(format, report),
            Self::Sparse(moe) => moe.quantize(format, report),
        }
    }
}

/// Mixture-of-experts settings of a Mixtral layer.
#[derive(Debug, Clone, Copy)]
pub struct ExpertsConfig {
    pub num_experts: usize,
    pub top_k: usize,
}

/// `MistralDecoderLayer` (and `MixtralDecoderLayer`): pre-norm attention and feed-forward, each
/// with a residual connection.
#[derive(Debug, Clone)]
pub struct MistralLayer {
    input_layernorm: RmsNorm,
    self_attn: MistralAttention,
    post_attention_layernorm: RmsNorm,
    feed_forward: FeedForward,
}

impl MistralLayer {
    pub fn load(
        vb: VarBuilder,
        config: &MistralConfig,
        experts: Option<ExpertsConfig>,
    ) -> Result<Self> {
        let feed_forward = match experts {
            None => FeedForward::Dense(GatedMlp::load(
                vb.pp("mlp"),
                config.hidden_size,
                config.intermediate_size,
                config.hidden_act,
            )?),
            Some(experts) => FeedForward::Sparse(SparseMoe::load(
                vb.pp("block_sparse_moe"),
                config.hidden_size,
                config.intermediate_size,
                experts.num_experts,
                experts.top_k,
                config.hidden_act,
            )?),
        };
        Ok(Self {
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                config.hidden_size,
                config.rms_norm_eps,
            )?,
            self_attn: MistralAttention::load(vb.pp("self_attn"), config)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                config.hidden_size,
                config.rms_norm_eps,
            )?,
            feed_forward,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryTables,
        step: &Step,
        layer: usize,
    ) -> Result<Tensor> {
        let attention =
            self.self_attn
                .forward(&self.input_layernorm.forward(x)?, rotary, step, layer)?;
        let x = (x + attention)?;
        let feed_forward = self
            .feed_forward
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + feed_forward)?)
    }
}

/// `MistralModel` (and `MixtralModel`): embeddings, the decoder layers and the final norm.
#[derive(Debug, Clone)]
pub struct MistralModel {
    embed_tokens: Embedding,
    layers: Vec<MistralLayer>,
    norm: RmsNorm,
    rotary: RotaryEmbedding,
    config: MistralConfig,
    dtype: DType,
    device: Device,
}

impl MistralModel {
    /// Loads `embed_tokens`, `layers.N` and `norm` from `vb` (the checkpoint's `model.` prefix).
    pub fn load(
        vb: VarBuilder,
        config: &MistralConfig,
        experts: Option<ExpertsConfig>,
    ) -> Result<Self> {
        config.validate()?;
        let embed_tokens =
            candle_nn::embedding(config.vocab_size, config.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| MistralLayer::load(vb.pp("layers").pp(i), config, experts))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(vb.pp("norm"), config.hidden_size, config.rms_norm_eps)?,
            rotary: RotaryEmbedding::new(
                config.head_dim(),
                config.rope_theta,
                config.max_position_embeddings,
                vb.dtype(),
                vb.device(),
            )?,
            config: config.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// What every layer keeps per sequence: its keys and values.
    pub fn state_spec(&self) -> StateSpec {
        StateSpec::uniform_attention(
            self.config.num_hidden_layers,
            self.config.attention().entries(),
        )
    }

    /// The config the model was built from.
    pub fn config(&self) -> &MistralConfig {
        &self.config
    }

    /// Final hidden states, `[batch, seq, hidden]` (only the last column with
    /// [`LogitsMode::Last`]: `[batch, hidden]`), normalised.
    pub fn forward(&self, step: &Step, columns: LogitsMode) -> Result<Tensor> {
        let batch = step.batch();
        let seq = batch.seq_len;
        let rotary = self.rotary.tables(batch)?;
        let mut x = self.embed_tokens.forward(&batch.input_ids)?;
        for (index, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rotary, step, index)?;
        }
        if columns == LogitsMode::Last {
            x = x.narrow(1, seq - 1, 1)?.squeeze(1)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// The input embedding matrix, for tied output heads.
    pub fn embeddings(&self) -> &Tensor {
        self.embed_tokens.embeddings()
    }
}

impl Quantize for MistralModel {
    fn quantize(&mut self, format: WeightQuantization, report: &mut QuantizeReport) -> Result<()> {
        for layer in &mut self.layers {
            layer.self_attn.quantize(format, report)?;
            layer.feed_forward.quantize(format, report)?;
        }
        Ok(())
    }
}

/// `MistralForCausalLM` (and `MixtralForCausalLM`).
#[derive(Debug, Clone)]
pub struct MistralForCausalLM {
    model: MistralModel,
    lm_head: Linear,
}

impl MistralForCausalLM {
    /// Loads the HF checkpoint layout (`model.*`, `lm_head.weight`); with
    /// `tie_word_embeddings` the head reuses the embedding matrix.
    pub fn load(vb: VarBuilder, config: &MistralConfig) -> Result<Self> {
        Self::load_with_experts(vb, config, None)
    }

    /// As [`MistralForCausalLM::load`], with Mixtral's experts in place of the dense MLPs.
    pub fn load_with_experts(
        vb: VarBuilder,
        config: &MistralConfig,
        experts: Option<ExpertsConfig>,
    ) -> Result<Self> {
        let model = MistralModel::load(vb.pp("model"), config, experts)?;
        let lm_head = if config.tie_word_embeddings {
            // The tied head's panels are a second copy of the embeddings, which the token lookup
            // reads as rows.
            Linear::from_weight(model.embeddings().clone()).into_batched_layout()?
        } else {
            Linear::load(
                vb.pp("lm_head"),
                config.hidden_size,
                config.vocab_size,
                false,
            )?
            .into_batched_layout()?
        };
        Ok(Self { model, lm_head })
    }
}

impl CausalLm for MistralForCausalLM {
    fn state_spec(&self) -> StateSpec {
        self.model.state_spec()
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    fn forward(&self, step: &Step, logits: LogitsMode) -> Result<Tensor> {
        let hidden = self.model.forward(step, logits)?;
        Ok(self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?)
    }

    fn quantize(&mut self, options: &QuantizeOptions) -> Result<QuantizeReport> {
        let mut report = QuantizeReport::default();
        self.model.quantize(options.format, &mut report)?;
        if options.lm_head {
            self.lm_head.quantize(options.format, &mut report)?;
        } else {
            report.kept += 1;
        }
        Ok(report)
    }
}

/// `MistralForSequenceClassification` (and Mixtral's): the decoder and a bias-free `score` head
/// read at one token per sequence.
pub struct MistralForSequenceClassification {
    model: MistralModel,
    score: Linear,
    pad_token_id: Option<u32>,
    labels: Labels,
}

impl MistralForSequenceClassification {
    /// Loads `model.*` and `score.weight`.
    pub fn load(
        vb: VarBuilder,
        config: &MistralConfig,
        experts: Option<ExpertsConfig>,
        labels: Labels,
        pad_token_id: Option<u32>,
    ) -> Result<Self> {
        let model = MistralModel::load(vb.pp("model"), config, experts)?;
        let score = Linear::load(
            vb.pp("score"),
            config.hidden_size,
            labels.names.len(),
            false,
        )?;
        Ok(Self {
            model,
            score,
            pad_token_id,
            labels,
        })
    }

    /// The token whose hidden state is scored (see [`scored_token`]).
    fn pooled_index(&self, sequence: &[u32]) -> usize {
        scored_token(self.pad_token_id, sequence)
    }
}

impl MistralForSequenceClassification {
    /// Raw logits, one row per sequence, the sequences run as one left-padded batch.
    fn logits(&self, sequences: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let longest = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        if sequences.is_empty() || sequences.iter().any(|s| s.is_empty()) {
            return Err(EngineError::InvalidRequest(
                "every text needs at least one token".into(),
            ));
        }
        // State just for this call: the sequences are read once, with no generation after, so
        // the step's writes are never stored.
        let mut state = SequenceState::new(
            self.model.state_spec(),
            sequences.len(),
            longest,
            self.model.dtype,
            &self.model.device,
        )?;
        let slots = sequences
            .iter()
            .map(|_| state.allocate())
            .collect::<Result<Vec<_>>>()?;
        let rows: Vec<StepRow> = slots
            .iter()
            .zip(sequences)
            .map(|(&slot, &tokens)| StepRow { slot, tokens })
            .collect();
        let batch = StepBatch::new(
            &rows,
            &state,
            self.model.config.vocab_size,
            &self.model.device,
        )?;
        let hidden = self
            .model
            .forward(&Step::new(&batch, &state), LogitsMode::All)?;
        let pooled = sequences
            .iter()
            .enumerate()
            .map(|(row, sequence)| {
                // Rows are left-padded: the sequence starts at column seq_len - len.
                let column = batch.seq_len - sequence.len() + self.pooled_index(sequence);
                Ok(hidden.get(row)?.get(column)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let logits = self
            .score
            .forward(&Tensor::stack(&pooled, 0)?)?
            .to_dtype(DType::F32)?;
        Ok(logits.to_vec2()?)
    }
}

/// The classifier behind the text-classification route: one row of logits per sequence, the
/// segment ids unused (Mistral has none).
impl EncoderModel for MistralForSequenceClassification {
    fn labels(&self) -> Option<&Labels> {
        Some(&self.labels)
    }

    fn contract(&self) -> EncoderContract {
        EncoderContract {
            limits: InputLimits {
                vocab_size: self.model.config.vocab_size,
                // Mistral has no segments: whatever segment ids the tokenizer gives are unused.
                type_vocab_size: usize::MAX,
                max_positions: self.model.config.max_position_embeddings,
                first_position: 0,
                causal: true,
                entities: None,
            },
            task: EncoderTask::SequenceClassification,
            has_pooler: false,
        }
    }

    fn hidden_size(&self) -> usize {
        self.model.config.hidden_size
    }

    fn forward(&self, inputs: &[EncoderInput]) -> Result<Vec<EncoderOutput>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let contract = self.contract();
        for input in inputs {
            contract.check(input)?;
            if input.position_ids.is_some() {
                return Err(EngineError::InvalidRequest(
                    "this model numbers its tokens itself; position ids are not taken".into(),
                ));
            }
        }
        let sequences: Vec<&[u32]> = inputs.iter().map(|input| input.ids.as_slice()).collect();
        Ok(self
            .logits(&sequences)?
            .into_iter()
            .map(EncoderOutput::Sequence)
            .collect())
    }
}
