//! The heads of BERT-family encoders and the [`EncoderModel`] that runs a body under one of
//! them. The heads are transformers' `*For{SequenceClassification, TokenClassification,
//! QuestionAnswering, MaskedLM, MultipleChoice, NextSentencePrediction}` and the base model;
//! their weight names are the same in every BERT-family model.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::encoder::batch::{split, InputLimits, PaddedBatch};
use crate::encoder::labels::Labels;
use crate::encoder::layers::dense;
use crate::encoder::pooling::{self, Pooling};
use crate::encoder::{
    EncoderContract, EncoderInput, EncoderModel, EncoderOutput, EncoderTask, Requested,
};
use crate::error::{EngineError, Result};
use crate::layers::Linear;
use crate::layers::{HiddenAct, Norm};

/// The part of an encoder below its head: a padded batch in, the last hidden states
/// `[batch, seq_len, hidden]` out.
pub trait EncoderBody: Send {
    /// What the body accepts.
    fn limits(&self) -> InputLimits;
    /// Width of the hidden states.
    fn hidden_size(&self) -> usize;
    /// The last hidden states of `batch`.
    fn forward(&self, batch: &PaddedBatch) -> Result<Tensor>;
}

/// The weights of a base model inside a checkpoint: under `prefix` (transformers'
/// `base_model_prefix`) when the checkpoint has a head, at the root when it is a base model's.
pub fn base_model_vb<'a>(vb: &VarBuilder<'a>, prefix: &str) -> VarBuilder<'a> {
    if vb.contains_tensor(&format!("{prefix}.embeddings.word_embeddings.weight")) {
        vb.pp(prefix)
    } else {
        vb.clone()
    }
}

/// The pooler: the first token's hidden state, through `tanh(dense(.))` when the model has the
/// dense layer (MobileBERT's `classifier_activation`; always for MegatronBERT).
#[derive(Debug, Clone)]
pub struct Pooler {
    dense: Option<Linear>,
}

impl Pooler {
    /// Loads `dense` (`hidden -> hidden`) from `vb` (transformers' `pooler`).
    pub fn with_dense(vb: VarBuilder, hidden_size: usize) -> Result<Self> {
        Ok(Self {
            dense: Some(dense(vb.pp("dense"), hidden_size, hidden_size)?),
        })
    }

    /// The pooler that returns the first token's hidden state as is.
    pub fn first_token() -> Self {
        Self { dense: None }
    }

    /// `[batch, hidden]` from the last hidden states `[batch, seq, hidden]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let first = pooling::first_token(hidden)?;
        Ok(match &self.dense {
            Some(dense) => dense.forward(&first)?.tanh()?,
            None => first,
        })
    }
}

/// `cls.predictions`: `dense`, the activation and a LayerNorm (`transform`), then the decoder
/// over the vocabulary with its bias.
#[derive(Debug, Clone)]
pub struct LmPredictionHead {
    dense: Linear,
    activation: HiddenAct,
    layer_norm: Norm,
    decoder: Linear,
    span: tracing::Span,
}

impl LmPredictionHead {
    /// Loads `transform.dense`, `transform.LayerNorm` and the bias (`bias`, or its tied twin
    /// `decoder.bias`) from `vb` (transformers' `cls.predictions`); `decoder_weight` is
    /// `[vocab, hidden]`, built by the model (tied to the word embeddings as transformers ties
    /// it).
    pub fn load(
        vb: VarBuilder,
        hidden_size: usize,
        activation: HiddenAct,
        layer_norm_eps: f64,
        decoder_weight: Tensor,
    ) -> Result<Self> {
        let vocab_size = decoder_weight.dim(0)?;
        let bias = if vb.contains_tensor("bias") {
            vb.get(vocab_size, "bias")?
        } else {
            vb.get(vocab_size, "decoder.bias")?
        };
        Ok(Self {
            dense: dense(vb.pp("transform.dense"), hidden_size, hidden_size)?,
            activation,
            layer_norm: Norm::layer_norm(
                vb.pp("transform.LayerNorm"),
                hidden_size,
                layer_norm_eps,
            )?,
            decoder: Linear::new(decoder_weight, Some(bias)).into_batched_layout()?,
            span: tracing::span!(tracing::Level::TRACE, "lm-head"),
        })
    }

    /// The stored decoder weight `cls.predictions.decoder.weight` (`[vocab, hidden]`), for
    /// checkpoints whose config unties it.
    pub fn stored_decoder_weight(
        vb: &VarBuilder,
        vocab_size: usize,
        hidden_size: usize,
    ) -> Result<Tensor> {
        Ok(vb.get((vocab_size, hidden_size), "decoder.weight")?)
    }

    /// The output vocabulary's size.
    pub fn vocab_size(&self) -> Result<usize> {
        self.decoder.out_dim()
    }
}

impl Module for LmPredictionHead {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let x = self.activation.forward(&self.dense.forward(x)?)?;
        self.decoder.forward(&self.layer_norm.forward(&x)?)
    }
}

/// The head on top of the body.
#[derive(Debug, Clone)]
enum Head {
    /// The base model: hidden states, and the pooled output where there is a pooler.
    Base,
    /// `classifier` on the pooled output.
    SequenceClassification(Linear),
    /// `classifier` on every token.
    TokenClassification(Linear),
    /// `qa_outputs`: two logits per token.
    QuestionAnswering(Linear),
    /// `cls.predictions` on every token.
    MaskedLm(LmPredictionHead),
    /// `classifier` to one score on the pooled output.
    MultipleChoice(Linear),
    /// `cls.seq_relationship` to two logits on the pooled output.
    NextSentencePrediction(Linear),
}

/// Whether transformers builds `task`'s base model with its pooler.
fn uses_pooler(task: EncoderTask) -> bool {
    matches!(
        task,
        EncoderTask::FeatureExtraction
            | EncoderTask::SequenceClassification
            | EncoderTask::MultipleChoice
            | EncoderTask::NextSentencePrediction
    )
}

/// A BERT-family body under one head: the [`EncoderModel`] the engine serves.
pub struct EncoderWithHead<B> {
    body: B,
    pooler: Option<Pooler>,
    head: Head,
    task: EncoderTask,
    labels: Option<Labels>,
    dtype: DType,
    device: Device,
}

/// How to build the pooler and the masked-LM decoder of a model: the parts of a head that
/// differ between BERT-family models.
pub struct HeadParts<P, M> {
    /// Builds the pooler; only called for heads that use one.
    pub pooler: P,
    /// Builds `cls.predictions`; only called for the masked-LM head.
    pub masked_lm: M,
}

impl<B: EncoderBody> EncoderWithHead<B> {
    /// Puts `task`'s head (weights from `vb`, the checkpoint's root) on `body`. `labels` are
    /// config.json's; they size the classification heads, and question answering needs exactly
    /// two.
    pub fn load<P, M>(
        vb: &VarBuilder,
        body: B,
        task: EncoderTask,
        labels: Labels,
        parts: HeadParts<P, M>,
    ) -> Result<Self>
    where
        P: FnOnce() -> Result<Option<Pooler>>,
        M: FnOnce() -> Result<LmPredictionHead>,
    {
        let hidden = body.hidden_size();
        let linear = |name: &str, out: usize| dense(vb.pp(name), hidden, out);
        let pooler = if uses_pooler(task) {
            match (parts.pooler)()? {
                Some(pooler) => Some(pooler),
                None if task == EncoderTask::FeatureExtraction => None,
                None => {
                    return Err(EngineError::UnsupportedConfig(format!(
                        "the {} head needs the pooler, and the checkpoint has none",
                        task.name()
                    )))
                }
            }
        } else {
            None
        };
        let mut kept_labels = None;
        let head = match task {
            EncoderTask::FeatureExtraction => Head::Base,
            EncoderTask::SequenceClassification => {
                let head = Head::SequenceClassification(linear("classifier", labels.names.len())?);
                kept_labels = Some(labels);
                head
            }
            EncoderTask::TokenClassification => {
                let head = Head::TokenClassification(linear("classifier", labels.names.len())?);
                kept_labels = Some(labels);
                head
            }
            EncoderTask::QuestionAnswering => {
                if labels.names.len() != 2 {
                    return Err(EngineError::UnsupportedConfig(format!(
                        "question answering needs num_labels = 2 (start and end), got {}",
                        labels.names.len()
                    )));
                }
                Head::QuestionAnswering(linear("qa_outputs", 2)?)
            }
            EncoderTask::MaskedLm => Head::MaskedLm((parts.masked_lm)()?),
            EncoderTask::MultipleChoice => Head::MultipleChoice(linear("classifier", 1)?),
            EncoderTask::NextSentencePrediction => {
                Head::NextSentencePrediction(linear("cls.seq_relationship", 2)?)
            }
        };
        Ok(Self {
            body,
            pooler,
            head,
            task,
            labels: kept_labels,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The pooled output `[batch, hidden]`.
    fn pooled(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.pooler {
            Some(pooler) => pooler.forward(hidden),
            None => Err(EngineError::InvalidRequest(format!(
                "the {} head has no pooler",
                self.task.name()
            ))),
        }
    }

    /// The base model's outputs: hidden states at the requested tokens (with the pooler's
    /// output, where there is one), or a vector pooled on the device. Each pooling runs once
    /// for the batch, and only when some input asks for it.
    fn base_outputs(
        &self,
        inputs: &[EncoderInput],
        batch: &PaddedBatch,
        hidden: &Tensor,
    ) -> Result<Vec<EncoderOutput>> {
        let wants = |pooling: Pooling| {
            inputs.iter().any(|input| match &input.output {
                Requested::Pooled(p) => *p == pooling,
                Requested::All | Requested::Tokens(_) => pooling == Pooling::Pooler,
            })
        };
        let mut pooled: HashMap<Pooling, Vec<Vec<f32>>> = HashMap::new();
        for pooling in Pooling::ALL.into_iter().filter(|&pooling| wants(pooling)) {
            let rows = match (pooling, &self.pooler) {
                (Pooling::Mean, _) => rows_f32(&pooling::mean(hidden, batch)?)?,
                (Pooling::Cls, _) => rows_f32(&pooling::first_token(hidden)?)?,
                (Pooling::Pooler, Some(pooler)) => rows_f32(&pooler.forward(hidden)?)?,
                (Pooling::Pooler, None) => continue,
            };
            pooled.insert(pooling, rows);
        }
        let mut tokens = self.token_rows(inputs, batch, hidden, |x| Ok(x.clone()))?;
        let mut pooled_row = |pooling: Pooling, row: usize| {
            pooled
                .get_mut(&pooling)
                .map(|rows| std::mem::take(&mut rows[row]))
        };
        inputs
            .iter()
            .enumerate()
            .map(|(row, input)| match &input.output {
                Requested::Pooled(pooling) => pooled_row(*pooling, row)
                    .map(EncoderOutput::Pooled)
                    .ok_or_else(|| {
                        EngineError::InvalidRequest("the checkpoint has no pooler".into())
                    }),
                Requested::All | Requested::Tokens(_) => Ok(EncoderOutput::Hidden {
                    last: std::mem::take(&mut tokens[row]),
                    pooled: pooled_row(Pooling::Pooler, row),
                }),
            })
            .collect()
    }

    /// `head` over the requested tokens' rows of `hidden`, one list of f32 rows per input.
    fn token_rows(
        &self,
        inputs: &[EncoderInput],
        batch: &PaddedBatch,
        hidden: &Tensor,
        head: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        match batch.requested_tokens(inputs)? {
            Some((index, counts)) => {
                let rows = rows_f32(&head(&batch.rows_at(hidden, &index)?)?)?;
                Ok(split(rows, &counts))
            }
            None => Ok(vec![Vec::new(); inputs.len()]),
        }
    }
}

/// `[rows, n]` as f32 rows.
fn rows_f32(x: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(x.to_dtype(DType::F32)?.to_vec2()?)
}

impl<B: EncoderBody> EncoderModel for EncoderWithHead<B> {
    fn labels(&self) -> Option<&Labels> {
        self.labels.as_ref()
    }

    fn contract(&self) -> EncoderContract {
        EncoderContract {
            limits: self.body.limits(),
            task: self.task,
            has_pooler: self.pooler.is_some(),
        }
    }

    fn hidden_size(&self) -> usize {
        self.body.hidden_size()
    }

    fn forward(&self, inputs: &[EncoderInput]) -> Result<Vec<EncoderOutput>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        // The batch checks the inputs against the limits; the head checks what they ask of it.
        let contract = self.contract();
        for input in inputs {
            contract.check_output(&input.output)?;
        }
        let batch = PaddedBatch::new(inputs, &contract.limits, self.dtype, &self.device)?;
        let hidden = self.body.forward(&batch)?;
        // Per-token heads run on the requested tokens only: padding, and the tokens nobody
        // reads, cost nothing in the head (the masked-LM decoder is the largest matmul of a
        // small model).
        let tokens = |head: &dyn Module| {
            let rows = self.token_rows(inputs, &batch, &hidden, |x| Ok(head.forward(x)?))?;
            Ok::<_, EngineError>(rows.into_iter().map(EncoderOutput::Tokens).collect())
        };
        match &self.head {
            Head::Base => self.base_outputs(inputs, &batch, &hidden),
            Head::SequenceClassification(classifier)
            | Head::MultipleChoice(classifier)
            | Head::NextSentencePrediction(classifier) => {
                let logits = classifier.forward(&self.pooled(&hidden)?)?;
                Ok(rows_f32(&logits)?
                    .into_iter()
                    .map(EncoderOutput::Sequence)
                    .collect())
            }
            Head::TokenClassification(classifier) => tokens(classifier),
            Head::MaskedLm(lm_head) => tokens(lm_head),
            Head::QuestionAnswering(qa_outputs) => {
                let logits = qa_outputs.forward(&batch.real_rows(&hidden)?)?;
                let column = |i: usize| -> Result<Vec<Vec<f32>>> {
                    let values: Vec<f32> = logits
                        .narrow(D::Minus1, i, 1)?
                        .squeeze(D::Minus1)?
                        .to_dtype(DType::F32)?
                        .to_vec1()?;
                    Ok(batch.split_by_sequence(values))
                };
                Ok(column(0)?
                    .into_iter()
                    .zip(column(1)?)
                    .map(|(start, end)| EncoderOutput::Span { start, end })
                    .collect())
            }
        }
    }
}
