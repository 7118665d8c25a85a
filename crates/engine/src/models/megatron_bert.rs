//! MegatronBERT (transformers 4.37.2 `modeling_megatron_bert`): BERT with pre-LayerNorm
//! blocks, a final LayerNorm over the encoder's output (`encoder.ln`) and no norm on the
//! embeddings. Served as an encoder under every head, and as a causal LM
//! (`MegatronBertForCausalLM`) over the rolling KV cache.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::attention::{Attention, AttentionPattern, AttentionSpec};
use crate::decoder::state::StateSpec;
use crate::decoder::step::{Step, StepBatch};
use crate::decoder::{CausalLm, LogitsMode};
use crate::encoder::batch::{InputLimits, PaddedBatch};
use crate::encoder::heads::{
    base_model_vb, EncoderBody, EncoderWithHead, HeadParts, LmPredictionHead, Pooler,
};
use crate::encoder::labels::Labels;
use crate::encoder::layers::{dense, SelfAttention};
use crate::encoder::EncoderTask;
use crate::error::{EngineError, Result};
use crate::layers::Linear;
use crate::layers::{HiddenAct, Norm};

fn default_vocab_size() -> usize {
    29056
}
fn default_hidden_size() -> usize {
    1024
}
fn default_num_hidden_layers() -> usize {
    24
}
fn default_num_attention_heads() -> usize {
    16
}
fn default_intermediate_size() -> usize {
    4096
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_max_position_embeddings() -> usize {
    512
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}
fn default_true() -> bool {
    true
}

/// config.json of a MegatronBERT model, with transformers 4.37.2's defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct MegatronBertConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Only `absolute` is implemented; the relative kinds are refused.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// Whether the masked-LM decoder shares the word embeddings (transformers' default).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// A decoder's tokens see only earlier tokens.
    #[serde(default)]
    pub is_decoder: bool,
}

impl MegatronBertConfig {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Refuses what the implementation would otherwise get silently wrong.
    pub fn validate(&self) -> Result<()> {
        if self.position_embedding_type != "absolute" {
            return Err(EngineError::UnsupportedConfig(format!(
                "position_embedding_type {:?} is not implemented; only \"absolute\" is",
                self.position_embedding_type
            )));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(EngineError::UnsupportedConfig(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        HiddenAct::parse(&self.hidden_act)?;
        Ok(())
    }
}

/// `MegatronBertEmbeddings`: word + token type + absolute position embeddings, with no norm
/// (each layer normalises its own input).
#[derive(Debug, Clone)]
pub struct MegatronBertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
}

impl MegatronBertEmbeddings {
    pub fn load(vb: VarBuilder, config: &MegatronBertConfig) -> Result<Self> {
        let hidden = config.hidden_size;
        Ok(Self {
            word_embeddings: candle_nn::embedding(
                config.vocab_size,
                hidden,
                vb.pp("word_embeddings"),
            )?,
            position_embeddings: candle_nn::embedding(
                config.max_position_embeddings,
                hidden,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings: candle_nn::embedding(
                config.type_vocab_size,
                hidden,
                vb.pp("token_type_embeddings"),
            )?,
        })
    }

    /// The embeddings of a padded encoder batch, each token at its position id.
    pub fn forward(&self, batch: &PaddedBatch) -> Result<Tensor> {
        let words = self.word_embeddings.forward(&batch.input_ids)?;
        let types = self.token_type_embeddings.forward(&batch.token_type_ids)?;
        let positions = self.position_embeddings.forward(&batch.position_ids)?;
        Ok(((words + types)? + positions)?)
    }

    /// The embeddings of a decoder step: segment 0 everywhere (transformers' default when no
    /// token types are given) and each token at its own absolute position.
    pub fn forward_step(&self, batch: &StepBatch) -> Result<Tensor> {
        let (rows, seq) = (batch.batch_size(), batch.seq_len);
        let max_positions = self.position_embeddings.embeddings().dim(0)?;
        if let Some(&last) = batch.positions.iter().max() {
            if last as usize >= max_positions {
                return Err(EngineError::ContextOverflow {
                    tokens: last as usize + 1,
                    max_context: max_positions,
                });
            }
        }
        let words = self.word_embeddings.forward(&batch.input_ids)?;
        let segment_zero = self.token_type_embeddings.embeddings().narrow(0, 0, 1)?;
        let positions = Tensor::from_slice(&batch.positions, rows * seq, words.device())?;
        let positions = self.position_embeddings.forward(&positions)?.reshape((
            rows,
            seq,
            self.word_embeddings.hidden_size(),
        ))?;
        Ok((words.broadcast_add(&segment_zero)? + positions)?)
    }

    /// The word embedding table, for the tied masked-LM decoder.
    pub fn word_embeddings(&self) -> &Tensor {
        self.word_embeddings.embeddings()
    }
}

/// `MegatronBertLayer`: pre-norm attention (`attention.ln`) and pre-norm feed-forward (`ln`),
/// each with a residual connection.
#[derive(Debug, Clone)]
pub struct MegatronBertLayer {
    attention_ln: Norm,
    attention: SelfAttention,
    attention_output: Linear,
    ln: Norm,
    intermediate: Linear,
    activation: HiddenAct,
    output: Linear,
    span: tracing::Span,
}

impl MegatronBertLayer {
    pub fn load(vb: VarBuilder, config: &MegatronBertConfig) -> Result<Self> {
        let (hidden, intermediate, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
        );
        Ok(Self {
            attention_ln: Norm::layer_norm(vb.pp("attention.ln"), hidden, eps)?,
            attention: SelfAttention::load(
                vb.pp("attention.self"),
                hidden,
                hidden,
                config.num_attention_heads,
                config.head_dim(),
                true,
            )?,
            attention_output: dense(vb.pp("attention.output.dense"), hidden, hidden)?,
            ln: Norm::layer_norm(vb.pp("ln"), hidden, eps)?,
            intermediate: dense(vb.pp("intermediate.dense"), hidden, intermediate)?,
            activation: HiddenAct::parse(&config.hidden_act)?,
            output: dense(vb.pp("output.dense"), intermediate, hidden)?,
            span: tracing::span!(tracing::Level::TRACE, "layer"),
        })
    }

    /// The layer over `x` (`[batch, seq, hidden]`), with `attend` turning this layer's
    /// queries, keys and values (`[batch, heads, seq, head_dim]`) into the attention context
    /// `[batch, seq, hidden]`: bidirectional over a padded batch, or causal over the KV cache.
    pub fn forward(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let normed = self.attention_ln.forward(x)?;
        let (queries, keys, values) = self.attention.project(&normed, &normed)?;
        let context = attend(&queries, &keys, &values)?;
        let x = (x + self.attention_output.forward(&context)?)?;
        let intermediate = self
            .activation
            .forward(&self.intermediate.forward(&self.ln.forward(&x)?)?)?;
        Ok((&x + self.output.forward(&intermediate)?)?)
    }
}

/// `MegatronBertModel` without its pooler: embeddings, layers and the final `encoder.ln`.
#[derive(Debug, Clone)]
pub struct MegatronBertModel {
    embeddings: MegatronBertEmbeddings,
    layers: Vec<MegatronBertLayer>,
    ln: Norm,
    config: MegatronBertConfig,
}

impl MegatronBertModel {
    /// Loads `embeddings.*`, `encoder.layer.N.*` and `encoder.ln` from `vb` (the base model's
    /// weights).
    pub fn load(vb: VarBuilder, config: &MegatronBertConfig) -> Result<Self> {
        config.validate()?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| MegatronBertLayer::load(vb.pp("encoder.layer").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: MegatronBertEmbeddings::load(vb.pp("embeddings"), config)?,
            layers,
            ln: Norm::layer_norm(
                vb.pp("encoder.ln"),
                config.hidden_size,
                config.layer_norm_eps,
            )?,
            config: config.clone(),
        })
    }

    /// The word embedding table.
    pub fn word_embeddings(&self) -> &Tensor {
        self.embeddings.word_embeddings()
    }
}

impl EncoderBody for MegatronBertModel {
    fn limits(&self) -> InputLimits {
        InputLimits {
            vocab_size: self.config.vocab_size,
            type_vocab_size: self.config.type_vocab_size,
            max_positions: self.config.max_position_embeddings,
            first_position: 0,
            causal: self.config.is_decoder,
            entities: None,
        }
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn forward(&self, batch: &PaddedBatch) -> Result<Tensor> {
        let mut x = self.embeddings.forward(batch)?;
        for layer in &self.layers {
            x = layer.forward(&x, |queries, keys, values| {
                layer
                    .attention
                    .attend(queries, keys, values, &batch.attention_mask)
            })?;
        }
        Ok(self.ln.forward(&x)?)
    }
}

/// `cls.predictions`, its decoder tied to the word embeddings as transformers ties it (the
/// stored `cls.predictions.decoder.weight` when config.json unties them).
fn lm_head(
    vb: VarBuilder,
    config: &MegatronBertConfig,
    word_embeddings: &Tensor,
) -> Result<LmPredictionHead> {
    let decoder = if config.tie_word_embeddings {
        word_embeddings.clone()
    } else {
        LmPredictionHead::stored_decoder_weight(&vb, config.vocab_size, config.hidden_size)?
    };
    LmPredictionHead::load(
        vb,
        config.hidden_size,
        HiddenAct::parse(&config.hidden_act)?,
        config.layer_norm_eps,
        decoder,
    )
}

/// Loads a MegatronBERT checkpoint (`vb` at its root) under `task`'s head.
pub fn load(
    vb: VarBuilder,
    config: &MegatronBertConfig,
    task: EncoderTask,
    labels: Labels,
) -> Result<EncoderWithHead<MegatronBertModel>> {
    let base = base_model_vb(&vb, "bert");
    let model = MegatronBertModel::load(base.clone(), config)?;
    let word_embeddings = model.word_embeddings().clone();
    let parts = HeadParts {
        pooler: || -> Result<Option<Pooler>> {
            if base.contains_tensor("pooler.dense.weight") {
                Ok(Some(Pooler::with_dense(
                    base.pp("pooler"),
                    config.hidden_size,
                )?))
            } else {
                Ok(None)
            }
        },
        masked_lm: || lm_head(vb.pp("cls.predictions"), config, &word_embeddings),
    };
    EncoderWithHead::load(&vb, model, task, labels, parts)
}

/// `MegatronBertForCausalLM`: the layers attend causally over the rolling KV cache (no sliding
/// window: the cache holds `max_position_embeddings` positions) and `cls.predictions` scores the
/// next token.
#[derive(Debug, Clone)]
pub struct MegatronBertForCausalLM {
    model: MegatronBertModel,
    lm_head: LmPredictionHead,
    attention: Attention,
}

impl MegatronBertForCausalLM {
    /// Loads `bert.*` and `cls.predictions.*`.
    pub fn load(vb: VarBuilder, config: &MegatronBertConfig) -> Result<Self> {
        let model = MegatronBertModel::load(base_model_vb(&vb, "bert"), config)?;
        let lm_head = lm_head(vb.pp("cls.predictions"), config, model.word_embeddings())?;
        let heads = config.num_attention_heads;
        Ok(Self {
            attention: Attention::new(AttentionSpec::softmax(
                heads,
                heads,
                config.head_dim(),
                AttentionPattern::Full,
            )),
            model,
            lm_head,
        })
    }
}

impl CausalLm for MegatronBertForCausalLM {
    fn state_spec(&self) -> StateSpec {
        StateSpec::uniform_attention(
            self.model.config.num_hidden_layers,
            self.attention.spec().entries(),
        )
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    fn forward(&self, step: &Step, logits: LogitsMode) -> Result<Tensor> {
        let batch = step.batch();
        let mut x = self.model.embeddings.forward_step(batch)?;
        for (index, layer) in self.model.layers.iter().enumerate() {
            x = layer.forward(&x, |queries, keys, values| {
                self.attention
                    .forward(queries, keys, values, None, step, index)
            })?;
        }
        if logits == LogitsMode::Last {
            x = x.narrow(1, batch.seq_len - 1, 1)?.squeeze(1)?;
        }
        let hidden = self.model.ln.forward(&x)?;
        Ok(self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?)
    }
}
