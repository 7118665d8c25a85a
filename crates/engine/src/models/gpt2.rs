//! GPT-2 (transformers 4.37.2 `modeling_gpt2`), which is also MegatronGPT2: token and learned
//! absolute position embeddings, pre-LayerNorm blocks of causal self-attention and an MLP, the
//! final `ln_f`. Its Conv1D weights are stored `[in, out]` and packed from that layout once at
//! load, so the blocks run on the same packed matmuls as every other model.
//!
//! Served as a causal LM (`GPT2LMHeadModel`, and the LM of `GPT2DoubleHeadsModel`) over the KV
//! cache, and as an encoder with causal attention under the sequence-, token-classification,
//! question-answering and multiple-choice heads and as the base model.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::attention::{Attention, AttentionPattern, AttentionSpec};
use crate::decoder::state::StateSpec;
use crate::decoder::step::Step;
use crate::decoder::{CausalLm, LogitsMode};
use crate::encoder::batch::{InputLimits, PaddedBatch};
use crate::encoder::heads::{EncoderBody, EncoderWithHead, HeadParts};
use crate::encoder::labels::Labels;
use crate::encoder::layers::scaled_attention;
use crate::encoder::{EncoderContract, EncoderInput, EncoderModel, EncoderOutput, EncoderTask};
use crate::error::{EngineError, Result};
use crate::layers::{HiddenAct, Linear, Norm, Quantize, QuantizeOptions, QuantizeReport};
use crate::models::scored_token;

fn default_vocab_size() -> usize {
    50257
}
fn default_n_positions() -> usize {
    1024
}
fn default_n_embd() -> usize {
    768
}
fn default_n_layer() -> usize {
    12
}
fn default_n_head() -> usize {
    12
}
fn default_activation_function() -> String {
    "gelu_new".into()
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_summary_type() -> String {
    "cls_index".into()
}

/// config.json of a GPT-2 model, with transformers 4.37.2's defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// The context: position embeddings exist for this many positions.
    #[serde(default = "default_n_positions")]
    pub n_positions: usize,
    #[serde(default = "default_n_embd")]
    pub n_embd: usize,
    #[serde(default = "default_n_layer")]
    pub n_layer: usize,
    #[serde(default = "default_n_head")]
    pub n_head: usize,
    /// The MLP's width; 4 * n_embd when absent.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation_function")]
    pub activation_function: String,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Divide the scores by sqrt(head size).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Divide the scores of layer `i` (from 0) by `i + 1` as well.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Compute the scores in f32, the scale folded into the product (see [`Gpt2Model`]).
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Cross-attention layers (an encoder-decoder setup): refused.
    #[serde(default)]
    pub add_cross_attention: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// The multiple-choice summary of `GPT2DoubleHeadsModel`: only `cls_index` (the hidden state
    /// at `mc_token_ids`) is implemented.
    #[serde(default = "default_summary_type")]
    pub summary_type: String,
    #[serde(default = "default_true")]
    pub summary_use_proj: bool,
    #[serde(default)]
    pub summary_activation: Option<String>,
    #[serde(default = "default_true")]
    pub summary_proj_to_labels: bool,
}

impl Gpt2Config {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// The factor of layer `layer`'s query-key products.
    pub fn attention_scale(&self, layer: usize) -> f64 {
        let mut scale = 1.0;
        if self.scale_attn_weights {
            scale /= (self.head_dim() as f64).sqrt();
        }
        if self.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        scale
    }

    /// Refuses what the implementation would otherwise get silently wrong.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |what: String| Err(EngineError::UnsupportedConfig(what));
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return unsupported(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if self.add_cross_attention {
            return unsupported("add_cross_attention (GPT-2 inside an encoder-decoder)".into());
        }
        HiddenAct::parse(&self.activation_function)?;
        Ok(())
    }
}

/// A Conv1D layer of GPT-2 (`weight` stored `[in, out]`, with bias) as a [`Linear`] in the
/// batched layout.
fn conv1d(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = vb.get((in_dim, out_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::from_input_major(weight, Some(bias))
}

/// `GPT2Block`: pre-norm causal self-attention (`ln_1`, `attn`) and MLP (`ln_2`, `mlp`), each with
/// a residual connection.
#[derive(Debug, Clone)]
pub struct Gpt2Block {
    ln_1: Norm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    activation: HiddenAct,
    mlp_proj: Linear,
    heads: usize,
    head_dim: usize,
    span: tracing::Span,
}

impl Gpt2Block {
    pub fn load(vb: VarBuilder, config: &Gpt2Config) -> Result<Self> {
        let (hidden, inner, eps) = (config.n_embd, config.inner_dim(), config.layer_norm_epsilon);
        Ok(Self {
            ln_1: Norm::layer_norm(vb.pp("ln_1"), hidden, eps)?,
            c_attn: conv1d(vb.pp("attn.c_attn"), hidden, 3 * hidden)?,
            attn_proj: conv1d(vb.pp("attn.c_proj"), hidden, hidden)?,
            ln_2: Norm::layer_norm(vb.pp("ln_2"), hidden, eps)?,
            c_fc: conv1d(vb.pp("mlp.c_fc"), hidden, inner)?,
            activation: HiddenAct::parse(&config.activation_function)?,
            mlp_proj: conv1d(vb.pp("mlp.c_proj"), inner, hidden)?,
            heads: config.n_head,
            head_dim: config.head_dim(),
            span: tracing::span!(tracing::Level::TRACE, "block"),
        })
    }

    /// The block over `x` (`[batch, seq, hidden]`), with `attend` turning its queries, keys and
    /// values (`[batch, heads, seq, head_dim]`, contiguous) into the context `[batch, seq,
    /// hidden]`: over a padded batch, or over the KV cache.
    pub fn forward(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (batch, seq, hidden) = x.dims3()?;
        let qkv = self.c_attn.forward(&self.ln_1.forward(x)?)?;
        let heads = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, i * hidden, hidden)?
                .reshape((batch, seq, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let context = attend(&heads(0)?, &heads(1)?, &heads(2)?)?;
        let x = (x + self.attn_proj.forward(&context)?)?;
        let inner = self
            .activation
            .forward(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?;
        Ok((&x + self.mlp_proj.forward(&inner)?)?)
    }
}

impl Quantize for Gpt2Block {
    fn quantize(
        &mut self,
        format: crate::layers::WeightQuantization,
        report: &mut QuantizeReport,
    ) -> Result<()> {
        for linear in [
            &mut self.c_attn,
            &mut self.attn_proj,
            &mut self.c_fc,
            &mut self.mlp_proj,
        ] {
            linear.quantize(format, report)?;
        }
        Ok(())
    }
}

/// `GPT2Model`: `wte` + `wpe`, the blocks `h.N` and `ln_f`.
///
/// `reorder_and_upcast_attn` changes how transformers computes the scores (in f32, the scale
/// folded into the product) and nothing else: the padded-batch attention here upcasts the queries
/// and keys when it is set; the cached attention computes scores in the model's dtype and softmaxes
/// them in f32, which is the same computation in f32.
#[derive(Debug, Clone)]
pub struct Gpt2Model {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Gpt2Block>,
    ln_f: Norm,
    config: Gpt2Config,
}

/// The weights of the base model: under `transformer.` in a checkpoint with a head, at the root
/// in a `GPT2Model` checkpoint.
fn transformer_vb<'a>(vb: &VarBuilder<'a>) -> VarBuilder<'a> {
    if vb.contains_tensor("transformer.wte.weight") {
        vb.pp("transformer")
    } else {
        vb.clone()
    }
}

impl Gpt2Model {
    /// Loads `wte`, `wpe`, `h.N.*` and `ln_f` from `vb` (the base model's weights).
    pub fn load(vb: VarBuilder, config: &Gpt2Config) -> Result<Self> {
        config.validate()?;
        let blocks = (0..config.n_layer)
            .map(|i| Gpt2Block::load(vb.pp("h").pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            wte: candle_nn::embedding(config.vocab_size, config.n_embd, vb.pp("wte"))?,
            wpe: candle_nn::embedding(config.n_positions, config.n_embd, vb.pp("wpe"))?,
            blocks,
            ln_f: Norm::layer_norm(vb.pp("ln_f"), config.n_embd, config.layer_norm_epsilon)?,
            config: config.clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// The token embedding matrix, which the tied LM head reuses.
    pub fn wte(&self) -> &Tensor {
        self.wte.embeddings()
    }

    /// What every block keeps per sequence: its keys and values, for the whole context.
    fn attention(&self, layer: usize) -> AttentionSpec {
        let heads = self.config.n_head;
        AttentionSpec {
            scale: self.config.attention_scale(layer),
            ..AttentionSpec::softmax(heads, heads, self.config.head_dim(), AttentionPattern::Full)
        }
    }

    /// The final hidden states of a step over the KV cache, `[batch, seq, hidden]` (only the last
    /// column, `[batch, hidden]`, with [`LogitsMode::Last`]).
    fn forward_step(
        &self,
        step: &Step,
        attention: &[Attention],
        columns: LogitsMode,
    ) -> Result<Tensor> {
        let batch = step.batch();
        let (rows, seq) = (batch.batch_size(), batch.seq_len);
        if let Some(&last) = batch.positions.iter().max() {
            if last as usize >= self.config.n_positions {
                return Err(EngineError::ContextOverflow {
                    tokens: last as usize + 1,
                    max_context: self.config.n_positions,
                });
            }
        }
        let positions =
            self.wpe
                .forward(batch.position_ids())?
                .reshape((rows, seq, self.config.n_embd))?;
        let mut x = (self.wte.forward(&batch.input_ids)? + positions)?;
        for (index, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, |queries, keys, values| {
                attention[index].forward(queries, keys, values, None, step, index)
            })?;
        }
        if columns == LogitsMode::Last {
            x = x.narrow(1, seq - 1, 1)?.squeeze(1)?;
        }
        Ok(self.ln_f.forward(&x)?)
    }
}

impl EncoderBody for Gpt2Model {
    fn limits(&self) -> InputLimits {
        InputLimits {
            vocab_size: self.config.vocab_size,
            // GPT-2's tokenizers give no segment ids; whatever ids come are unused.
            type_vocab_size: usize::MAX,
            max_positions: self.config.n_positions,
            first_position: 0,
            causal: true,
            entities: None,
        }
    }

    fn hidden_size(&self) -> usize {
        self.config.n_embd
    }

    fn forward(&self, batch: &PaddedBatch) -> Result<Tensor> {
        let words = self.wte.forward(&batch.input_ids)?;
        let mut x = (words + self.wpe.forward(&batch.position_ids)?)?;
        for (index, block) in self.blocks.iter().enumerate() {
            let scale = self.config.attention_scale(index);
            x = block.forward(&x, |queries, keys, values| {
                if self.config.reorder_and_upcast_attn && queries.dtype() != DType::F32 {
                    let context = scaled_attention(
                        &queries.to_dtype(DType::F32)?,
                        &keys.to_dtype(DType::F32)?,
                        &values.to_dtype(DType::F32)?,
                        &batch.attention_mask,
                        scale,
                    )?;
                    Ok(context.to_dtype(values.dtype())?)
                } else {
                    scaled_attention(queries, keys, values, &batch.attention_mask, scale)
                }
            })?;
        }
        Ok(self.ln_f.forward(&x)?)
    }
}

/// `GPT2LMHeadModel`, and the language model of `GPT2DoubleHeadsModel`: `lm_head` tied to `wte`
/// (the stored `lm_head.weight` when config.json unties them).
#[derive(Debug, Clone)]
pub struct Gpt2LmHeadModel {
    model: Gpt2Model,
    lm_head: Linear,
    attention: Vec<Attention>,
}

impl Gpt2LmHeadModel {
    /// Loads `transformer.*` and, when untied, `lm_head.weight`.
    pub fn load(vb: VarBuilder, config: &Gpt2Config) -> Result<Self> {
        let model = Gpt2Model::load(transformer_vb(&vb), config)?;
        let lm_head = if config.tie_word_embeddings {
            Linear::from_weight(model.wte().clone())
        } else {
            Linear::load(vb.pp("lm_head"), config.n_embd, config.vocab_size, false)?
        }
        .into_batched_layout()?;
        let attention = (0..config.n_layer)
            .map(|layer| Attention::new(model.attention(layer)))
            .collect();
        Ok(Self {
            model,
            lm_head,
            attention,
        })
    }
}

impl CausalLm for Gpt2LmHeadModel {
    fn state_spec(&self) -> StateSpec {
        StateSpec::uniform_attention(self.model.config.n_layer, self.model.attention(0).entries())
    }

    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.model.config.n_positions
    }

    fn forward(&self, step: &Step, logits: LogitsMode) -> Result<Tensor> {
        let hidden = self.model.forward_step(step, &self.attention, logits)?;
        Ok(self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?)
    }

    fn quantize(&mut self, options: &QuantizeOptions) -> Result<QuantizeReport> {
        let mut report = QuantizeReport::default();
        for block in &mut self.model.blocks {
            block.quantize(options.format, &mut report)?;
        }
        if options.lm_head {
            self.lm_head.quantize(options.format, &mut report)?;
        } else {
            report.kept += 1;
        }
        Ok(report)
    }
}

/// Loads a GPT-2 checkpoint (`vb` at its root) under one of the BERT-style heads:
/// `GPT2Model` (feature extraction), `GPT2ForTokenClassification` (`classifier`) and
/// `GPT2ForQuestionAnswering` (`qa_outputs`).
pub fn load(
    vb: VarBuilder,
    config: &Gpt2Config,
    task: EncoderTask,
    labels: Labels,
) -> Result<EncoderWithHead<Gpt2Model>> {
    let model = Gpt2Model::load(transformer_vb(&vb), config)?;
    let parts = HeadParts {
        pooler: || Ok(None),
        masked_lm: || {
            Err(EngineError::UnsupportedConfig(
                "GPT-2 has no masked-LM head".into(),
            ))
        },
    };
    EncoderWithHead::load(&vb, model, task, labels, parts)
}

/// How a sequence-level GPT-2 head reads its sequence.
#[derive(Debug, Clone)]
enum SequenceHead {
    /// `GPT2ForSequenceClassification`: the bias-free `score` at the token before the first
    /// `pad_token_id`.
    Score { score: Linear, labels: Labels },
    /// `GPT2DoubleHeadsModel`'s `multiple_choice_head` (`summary`, then the activation when
    /// config.json names one) at each choice's last token.
    MultipleChoice {
        summary: Option<Linear>,
        activation: Option<HiddenAct>,
    },
}

/// `GPT2ForSequenceClassification` or the multiple-choice head of `GPT2DoubleHeadsModel`: one
/// token's final hidden state per sequence, through a linear head.
pub struct Gpt2SequenceHead {
    model: Gpt2Model,
    head: SequenceHead,
    pad_token_id: Option<u32>,
}

impl Gpt2SequenceHead {
    /// `GPT2ForSequenceClassification`: `transformer.*` and `score.weight`.
    pub fn sequence_classification(
        vb: VarBuilder,
        config: &Gpt2Config,
        labels: Labels,
    ) -> Result<Self> {
        let model = Gpt2Model::load(transformer_vb(&vb), config)?;
        let score = Linear::load(vb.pp("score"), config.n_embd, labels.names.len(), false)?;
        Ok(Self {
            model,
            head: SequenceHead::Score { score, labels },
            pad_token_id: config.pad_token_id,
        })
    }

    /// `GPT2DoubleHeadsModel`'s multiple-choice head: `transformer.*` and
    /// `multiple_choice_head.summary.*`, one score per choice (the model sets `num_labels = 1`
    /// whatever config.json says).
    pub fn multiple_choice(vb: VarBuilder, config: &Gpt2Config) -> Result<Self> {
        if config.summary_type != "cls_index" {
            return Err(EngineError::UnsupportedConfig(format!(
                "summary_type {:?} is not implemented; only \"cls_index\" is",
                config.summary_type
            )));
        }
        let model = Gpt2Model::load(transformer_vb(&vb), config)?;
        let summary = if config.summary_use_proj {
            let out = if config.summary_proj_to_labels {
                1
            } else {
                config.n_embd
            };
            Some(Linear::load(
                vb.pp("multiple_choice_head.summary"),
                config.n_embd,
                out,
                true,
            )?)
        } else {
            None
        };
        let activation = match config.summary_activation.as_deref() {
            None => None,
            Some("tanh") => Some(HiddenAct::Tanh),
            Some(other) => {
                return Err(EngineError::UnsupportedConfig(format!(
                    "summary_activation {other:?} is not implemented; only \"tanh\" is"
                )))
            }
        };
        Ok(Self {
            model,
            head: SequenceHead::MultipleChoice {
                summary,
                activation,
            },
            pad_token_id: config.pad_token_id,
        })
    }

    /// The token whose hidden state the head reads: for the score head, the token before the
    /// first pad as transformers picks it ([`scored_token`]); for the multiple-choice head, the
    /// choice's last token, the default `mc_token_ids` of an unpadded choice.
    fn pooled_index(&self, sequence: &[u32]) -> usize {
        match self.head {
            SequenceHead::Score { .. } => scored_token(self.pad_token_id, sequence),
            SequenceHead::MultipleChoice { .. } => sequence.len() - 1,
        }
    }
}

impl EncoderModel for Gpt2SequenceHead {
    fn labels(&self) -> Option<&Labels> {
        match &self.head {
            SequenceHead::Score { labels, .. } => Some(labels),
            SequenceHead::MultipleChoice { .. } => None,
        }
    }

    fn contract(&self) -> EncoderContract {
        let task = match self.head {
            SequenceHead::Score { .. } => EncoderTask::SequenceClassification,
            SequenceHead::MultipleChoice { .. } => EncoderTask::MultipleChoice,
        };
        EncoderContract {
            limits: self.model.limits(),
            task,
            has_pooler: false,
        }
    }

    fn hidden_size(&self) -> usize {
        self.model.config.n_embd
    }

    fn forward(&self, inputs: &[EncoderInput]) -> Result<Vec<EncoderOutput>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let contract = self.contract();
        for input in inputs {
            contract.check_output(&input.output)?;
        }
        let wte = self.model.wte();
        let batch = PaddedBatch::new(inputs, &contract.limits, wte.dtype(), wte.device())?;
        let hidden = self.model.forward(&batch)?;
        let pooled = inputs
            .iter()
            .enumerate()
            .map(|(row, input)| Ok(hidden.get(row)?.get(self.pooled_index(&input.ids))?))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        let logits = match &self.head {
            SequenceHead::Score { score, .. } => score.forward(&pooled)?,
            SequenceHead::MultipleChoice {
                summary,
                activation,
            } => {
                let mut x = match summary {
                    Some(summary) => summary.forward(&pooled)?,
                    None => pooled,
                };
                if let Some(activation) = activation {
                    x = activation.forward(&x)?;
                }
                x
            }
        };
        Ok(logits
            .to_dtype(DType::F32)?
            .to_vec2()?
            .into_iter()
            .map(EncoderOutput::Sequence)
            .collect())
    }
}
