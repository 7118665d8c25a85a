//! MobileBERT (transformers 4.37.2 `modeling_mobilebert`): trigram embeddings of a narrow
//! embedding table, bottlenecked layers of stacked feed-forward networks, NoNorm or LayerNorm.

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::encoder::batch::{InputLimits, PaddedBatch};
use crate::encoder::heads::{
    base_model_vb, EncoderBody, EncoderWithHead, HeadParts, LmPredictionHead, Pooler,
};
use crate::encoder::labels::Labels;
use crate::encoder::layers::{dense, DenseNorm, SelfAttention};
use crate::encoder::EncoderTask;
use crate::error::{EngineError, Result};
use crate::layers::Linear;
use crate::layers::{HiddenAct, Norm, NormKind};

/// The LayerNorm epsilon of the blocks that transformers builds without passing
/// `layer_norm_eps` (the embeddings' norm and `MobileBertOutput`'s): torch's default.
const TORCH_LAYER_NORM_EPS: f64 = 1e-5;

fn default_vocab_size() -> usize {
    30522
}
fn default_hidden_size() -> usize {
    512
}
fn default_num_hidden_layers() -> usize {
    24
}
fn default_num_attention_heads() -> usize {
    4
}
fn default_intermediate_size() -> usize {
    512
}
fn default_hidden_act() -> String {
    "relu".into()
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
fn default_embedding_size() -> usize {
    128
}
fn default_intra_bottleneck_size() -> usize {
    128
}
fn default_num_feedforward_networks() -> usize {
    4
}
fn default_normalization_type() -> String {
    "no_norm".into()
}
fn default_true() -> bool {
    true
}

/// config.json of a MobileBERT model, with transformers 4.37.2's defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct MobileBertConfig {
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
    #[serde(default = "default_embedding_size")]
    pub embedding_size: usize,
    #[serde(default = "default_true")]
    pub trigram_input: bool,
    #[serde(default = "default_true")]
    pub use_bottleneck: bool,
    #[serde(default = "default_intra_bottleneck_size")]
    pub intra_bottleneck_size: usize,
    #[serde(default)]
    pub use_bottleneck_attention: bool,
    #[serde(default = "default_true")]
    pub key_query_shared_bottleneck: bool,
    #[serde(default = "default_num_feedforward_networks")]
    pub num_feedforward_networks: usize,
    /// `no_norm` or `layer_norm`.
    #[serde(default = "default_normalization_type")]
    pub normalization_type: String,
    /// Whether the pooler applies `tanh(dense(.))` to the first token.
    #[serde(default = "default_true")]
    pub classifier_activation: bool,
    /// Whether the masked-LM decoder shares the word embeddings (transformers' default).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// A decoder's tokens see only earlier tokens.
    #[serde(default)]
    pub is_decoder: bool,
}

impl MobileBertConfig {
    /// The width inside the layers: the bottleneck's when there is one.
    pub fn true_hidden_size(&self) -> usize {
        if self.use_bottleneck {
            self.intra_bottleneck_size
        } else {
            self.hidden_size
        }
    }

    /// Refuses what transformers itself could not run, or what we would get silently wrong.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |what: String| Err(EngineError::UnsupportedConfig(what));
        let true_hidden = self.true_hidden_size();
        if self.num_attention_heads == 0 || !true_hidden.is_multiple_of(self.num_attention_heads) {
            return unsupported(format!(
                "the attention width {true_hidden} is not a multiple of num_attention_heads {}",
                self.num_attention_heads
            ));
        }
        if self.num_feedforward_networks == 0 {
            return unsupported("num_feedforward_networks = 0".into());
        }
        if self.use_bottleneck
            && !self.use_bottleneck_attention
            && !self.key_query_shared_bottleneck
            && self.intra_bottleneck_size != self.hidden_size
        {
            return unsupported(format!(
                "a bottleneck without use_bottleneck_attention or key_query_shared_bottleneck \
                 feeds hidden_size {} into attention of width intra_bottleneck_size {}",
                self.hidden_size, self.intra_bottleneck_size
            ));
        }
        HiddenAct::parse(&self.hidden_act)?;
        NormKind::parse(&self.normalization_type)?;
        Ok(())
    }

    fn limits(&self) -> InputLimits {
        InputLimits {
            vocab_size: self.vocab_size,
            type_vocab_size: self.type_vocab_size,
            max_positions: self.max_position_embeddings,
            first_position: 0,
            causal: self.is_decoder,
            entities: None,
        }
    }
}

/// `MobileBertEmbeddings`: word embeddings of width `embedding_size`, concatenated with their
/// neighbours' (trigram input) and projected to `hidden_size`, plus position and token-type
/// embeddings, then the norm.
#[derive(Debug, Clone)]
pub struct MobileBertEmbeddings {
    word_embeddings: Embedding,
    embedding_transformation: Option<Linear>,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    norm: Norm,
    trigram_input: bool,
    span: tracing::Span,
}

impl MobileBertEmbeddings {
    pub fn load(vb: VarBuilder, config: &MobileBertConfig, norm: NormKind) -> Result<Self> {
        let (embedding, hidden) = (config.embedding_size, config.hidden_size);
        let embedding_transformation = if config.trigram_input || embedding != hidden {
            let input = if config.trigram_input {
                3 * embedding
            } else {
                embedding
            };
            Some(dense(vb.pp("embedding_transformation"), input, hidden)?)
        } else {
            None
        };
        Ok(Self {
            word_embeddings: candle_nn::embedding(
                config.vocab_size,
                embedding,
                vb.pp("word_embeddings"),
            )?,
            embedding_transformation,
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
            norm: Norm::load(vb.pp("LayerNorm"), norm, hidden, TORCH_LAYER_NORM_EPS)?,
            trigram_input: config.trigram_input,
            span: tracing::span!(tracing::Level::TRACE, "embeddings"),
        })
    }

    /// The word embedding table `[vocab, embedding_size]`, for the tied masked-LM decoder.
    pub fn word_embeddings(&self) -> &Tensor {
        self.word_embeddings.embeddings()
    }

    pub fn forward(&self, batch: &PaddedBatch) -> Result<Tensor> {
        let _enter = self.span.enter();
        let mut x = self.word_embeddings.forward(&batch.input_ids)?;
        if self.trigram_input {
            // Each token reads [next, itself, previous], with zeros past either end of its own
            // sequence: padding is zeroed first, so that a sequence's last token does not read
            // the padding after it and its result does not depend on the batch.
            let seq = batch.seq_len;
            let x_real = x.broadcast_mul(&batch.token_mask)?;
            let next = x_real.pad_with_zeros(1, 0, 1)?.narrow(1, 1, seq)?;
            let previous = x_real.pad_with_zeros(1, 1, 0)?.narrow(1, 0, seq)?;
            x = Tensor::cat(&[&next, &x_real, &previous], 2)?;
        }
        if let Some(transformation) = &self.embedding_transformation {
            x = transformation.forward(&x)?;
        }
        let positions = self.position_embeddings.forward(&batch.position_ids)?;
        let x =
            (x + positions)?.add(&self.token_type_embeddings.forward(&batch.token_type_ids)?)?;
        Ok(self.norm.forward(&x)?)
    }
}

/// `Bottleneck`: the layer's input narrowed to `intra_bottleneck_size`, and for a shared
/// key/query bottleneck a second narrowing that feeds queries and keys.
#[derive(Debug, Clone)]
struct Bottleneck {
    input: DenseNorm,
    attention: Option<DenseNorm>,
    use_bottleneck_attention: bool,
}

/// What a layer's attention reads: queries and keys, values, and the residual of the attention
/// output.
struct AttentionInputs {
    query_key: Tensor,
    value: Tensor,
    layer_input: Tensor,
}

impl Bottleneck {
    fn load(vb: VarBuilder, config: &MobileBertConfig, norm: NormKind) -> Result<Self> {
        let (hidden, intra, eps) = (
            config.hidden_size,
            config.intra_bottleneck_size,
            config.layer_norm_eps,
        );
        let attention = if config.key_query_shared_bottleneck {
            Some(DenseNorm::load(
                vb.pp("attention"),
                hidden,
                intra,
                "LayerNorm",
                norm,
                eps,
            )?)
        } else {
            None
        };
        Ok(Self {
            input: DenseNorm::load(vb.pp("input"), hidden, intra, "LayerNorm", norm, eps)?,
            attention,
            use_bottleneck_attention: config.use_bottleneck_attention,
        })
    }

    fn forward(&self, hidden: &Tensor) -> Result<AttentionInputs> {
        let narrowed = self.input.forward(hidden, None)?;
        Ok(if self.use_bottleneck_attention {
            AttentionInputs {
                query_key: narrowed.clone(),
                value: narrowed.clone(),
                layer_input: narrowed,
            }
        } else if let Some(attention) = &self.attention {
            AttentionInputs {
                query_key: attention.forward(hidden, None)?,
                value: hidden.clone(),
                layer_input: narrowed,
            }
        } else {
            AttentionInputs {
                query_key: hidden.clone(),
                value: hidden.clone(),
                layer_input: narrowed,
            }
        })
    }
}

/// `FFNLayer`: `norm(dense(act(intermediate(x))) + x)`.
#[derive(Debug, Clone)]
struct FeedForward {
    intermediate: Linear,
    activation: HiddenAct,
    output: DenseNorm,
}

impl FeedForward {
    fn load(
        vb: VarBuilder,
        config: &MobileBertConfig,
        norm: NormKind,
        activation: HiddenAct,
        output_eps: f64,
    ) -> Result<Self> {
        let (true_hidden, intermediate) = (config.true_hidden_size(), config.intermediate_size);
        Ok(Self {
            intermediate: dense(vb.pp("intermediate.dense"), true_hidden, intermediate)?,
            activation,
            output: DenseNorm::load(
                vb.pp("output"),
                intermediate,
                true_hidden,
                "LayerNorm",
                norm,
                output_eps,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let intermediate = self.activation.forward(&self.intermediate.forward(x)?)?;
        self.output.forward(&intermediate, Some(x))
    }
}

/// `MobileBertLayer`.
#[derive(Debug, Clone)]
pub struct MobileBertLayer {
    bottleneck: Option<Bottleneck>,
    attention: SelfAttention,
    attention_output: DenseNorm,
    /// `ffn.N`: the stacked feed-forward networks before the last one.
    ffn: Vec<FeedForward>,
    /// `intermediate` and `output`: the last feed-forward network, whose norm transformers
    /// builds with torch's default epsilon.
    last_ffn: FeedForward,
    /// `output.bottleneck`: back to `hidden_size`, with the layer's input as residual.
    output_bottleneck: Option<DenseNorm>,
    span: tracing::Span,
}

impl MobileBertLayer {
    pub fn load(vb: VarBuilder, config: &MobileBertConfig) -> Result<Self> {
        let norm = NormKind::parse(&config.normalization_type)?;
        let activation = HiddenAct::parse(&config.hidden_act)?;
        let (hidden, true_hidden, eps) = (
            config.hidden_size,
            config.true_hidden_size(),
            config.layer_norm_eps,
        );
        let heads = config.num_attention_heads;
        let value_in = if config.use_bottleneck_attention {
            true_hidden
        } else {
            hidden
        };
        // Queries, keys and values read one tensor unless a shared key/query bottleneck feeds
        // queries and keys while values read the layer's input.
        let shared_key_query = config.use_bottleneck
            && !config.use_bottleneck_attention
            && config.key_query_shared_bottleneck;
        let attention = SelfAttention::load(
            vb.pp("attention.self"),
            true_hidden,
            value_in,
            heads,
            true_hidden / heads,
            !shared_key_query,
        )?;
        let ffn = (1..config.num_feedforward_networks)
            .map(|i| FeedForward::load(vb.pp("ffn").pp(i - 1), config, norm, activation, eps))
            .collect::<Result<Vec<_>>>()?;
        let last_ffn =
            FeedForward::load(vb.clone(), config, norm, activation, TORCH_LAYER_NORM_EPS)?;
        let (bottleneck, output_bottleneck) = if config.use_bottleneck {
            (
                Some(Bottleneck::load(vb.pp("bottleneck"), config, norm)?),
                Some(DenseNorm::load(
                    vb.pp("output.bottleneck"),
                    true_hidden,
                    hidden,
                    "LayerNorm",
                    norm,
                    eps,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            bottleneck,
            attention,
            attention_output: DenseNorm::load(
                vb.pp("attention.output"),
                true_hidden,
                true_hidden,
                "LayerNorm",
                norm,
                eps,
            )?,
            ffn,
            last_ffn,
            output_bottleneck,
            span: tracing::span!(tracing::Level::TRACE, "layer"),
        })
    }

    pub fn forward(&self, hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let inputs = match &self.bottleneck {
            Some(bottleneck) => bottleneck.forward(hidden)?,
            None => AttentionInputs {
                query_key: hidden.clone(),
                value: hidden.clone(),
                layer_input: hidden.clone(),
            },
        };
        let context = self
            .attention
            .forward(&inputs.query_key, &inputs.value, mask)?;
        let mut x = self
            .attention_output
            .forward(&context, Some(&inputs.layer_input))?;
        for ffn in &self.ffn {
            x = ffn.forward(&x)?;
        }
        let x = self.last_ffn.forward(&x)?;
        match &self.output_bottleneck {
            Some(bottleneck) => bottleneck.forward(&x, Some(hidden)),
            None => Ok(x),
        }
    }
}

/// `MobileBertModel` without its pooler: embeddings and layers.
#[derive(Debug, Clone)]
pub struct MobileBertModel {
    embeddings: MobileBertEmbeddings,
    layers: Vec<MobileBertLayer>,
    config: MobileBertConfig,
}

impl MobileBertModel {
    /// Loads `embeddings.*` and `encoder.layer.N.*` from `vb` (the base model's weights).
    pub fn load(vb: VarBuilder, config: &MobileBertConfig) -> Result<Self> {
        config.validate()?;
        let norm = NormKind::parse(&config.normalization_type)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| MobileBertLayer::load(vb.pp("encoder.layer").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: MobileBertEmbeddings::load(vb.pp("embeddings"), config, norm)?,
            layers,
            config: config.clone(),
        })
    }

    /// The word embedding table.
    pub fn word_embeddings(&self) -> &Tensor {
        self.embeddings.word_embeddings()
    }
}

impl EncoderBody for MobileBertModel {
    fn limits(&self) -> InputLimits {
        self.config.limits()
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn forward(&self, batch: &PaddedBatch) -> Result<Tensor> {
        let mut x = self.embeddings.forward(batch)?;
        for layer in &self.layers {
            x = layer.forward(&x, &batch.attention_mask)?;
        }
        Ok(x)
    }
}

/// `MobileBertLMPredictionHead`'s decoder, `[vocab, hidden]`: the tied word embeddings
/// (`[vocab, embedding_size]`) side by side with the transposed `dense` weight
/// (`[hidden - embedding_size, vocab]`), concatenated once at load, as transformers does on
/// every forward.
fn masked_lm_decoder(
    vb: &VarBuilder,
    config: &MobileBertConfig,
    word_embeddings: &Tensor,
) -> Result<Tensor> {
    let (vocab, embedding, hidden) = (config.vocab_size, config.embedding_size, config.hidden_size);
    if embedding > hidden {
        return Err(EngineError::UnsupportedConfig(format!(
            "the masked-LM head needs embedding_size {embedding} <= hidden_size {hidden}"
        )));
    }
    let decoder = if config.tie_word_embeddings {
        word_embeddings.clone()
    } else {
        LmPredictionHead::stored_decoder_weight(vb, vocab, embedding)?
    };
    if embedding == hidden {
        return Ok(decoder);
    }
    let dense = vb.get((hidden - embedding, vocab), "dense.weight")?;
    Ok(Tensor::cat(&[&decoder, &dense.t()?], 1)?.contiguous()?)
}

/// Loads a MobileBERT checkpoint (`vb` at its root) under `task`'s head.
pub fn load(
    vb: VarBuilder,
    config: &MobileBertConfig,
    task: EncoderTask,
    labels: Labels,
) -> Result<EncoderWithHead<MobileBertModel>> {
    let base = base_model_vb(&vb, "mobilebert");
    let model = MobileBertModel::load(base.clone(), config)?;
    let word_embeddings = model.word_embeddings().clone();
    let parts = HeadParts {
        pooler: || -> Result<Option<Pooler>> {
            if !config.classifier_activation {
                Ok(Some(Pooler::first_token()))
            } else if base.contains_tensor("pooler.dense.weight") {
                Ok(Some(Pooler::with_dense(
                    base.pp("pooler"),
                    config.hidden_size,
                )?))
            } else {
                Ok(None)
            }
        },
        masked_lm: || -> Result<LmPredictionHead> {
            let vb = vb.pp("cls.predictions");
            let decoder = masked_lm_decoder(&vb, config, &word_embeddings)?;
            LmPredictionHead::load(
                vb,
                config.hidden_size,
                HiddenAct::parse(&config.hidden_act)?,
                config.layer_norm_eps,
                decoder,
            )
        },
    };
    EncoderWithHead::load(&vb, model, task, labels, parts)
}
