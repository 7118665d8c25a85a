//! Encoders: bidirectional models that read a whole sequence at once and answer with one head.
//!
//! An encoder checkpoint carries exactly one head (the architecture in config.json names it). The
//! engine runs a batch of unpadded token sequences through it and returns f32 outputs per sequence,
//! trimmed to each sequence's own length; what the outputs mean to a user (labels, spans, masks
//! filled) is the server's pipelines' business.

pub mod batch;
pub mod heads;
pub mod labels;
pub mod layers;

use crate::encoder::labels::Labels;
use crate::error::Result;

/// What an encoder checkpoint's head computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderTask {
    /// The base model: hidden states and the pooled output (embeddings).
    FeatureExtraction,
    /// One row of logits per sequence, over the labels.
    SequenceClassification,
    /// One row of logits per token, over the labels.
    TokenClassification,
    /// Start and end logits per token.
    QuestionAnswering,
    /// One row of logits per token, over the vocabulary.
    MaskedLm,
    /// One score per (prompt, choice) pair; the caller groups choices.
    MultipleChoice,
    /// Two logits per sentence pair: "B follows A" and "B is random".
    NextSentencePrediction,
}

impl EncoderTask {
    /// The task's name as transformers' pipelines spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::FeatureExtraction => "feature-extraction",
            Self::SequenceClassification => "text-classification",
            Self::TokenClassification => "token-classification",
            Self::QuestionAnswering => "question-answering",
            Self::MaskedLm => "fill-mask",
            Self::MultipleChoice => "multiple-choice",
            Self::NextSentencePrediction => "next-sentence-prediction",
        }
    }
}

/// One tokenized sequence, special tokens included, without padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderInput {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Segment ids (0 for the first text, 1 for the second); same length as `ids`.
    pub type_ids: Vec<u32>,
}

/// A batch's outputs, one entry per input in input order, each trimmed to that input's length.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderOutput {
    /// Sequence classification and next-sentence prediction: `[labels]` per input; multiple choice:
    /// `[1]` per input.
    Sequences(Vec<Vec<f32>>),
    /// Token classification (`[len][labels]`) and masked LM (`[len][vocab]`).
    Tokens(Vec<Vec<Vec<f32>>>),
    /// Question answering: start and end logits, `[len]` each.
    Spans {
        /// Logits of each token starting the answer.
        start: Vec<Vec<f32>>,
        /// Logits of each token ending the answer.
        end: Vec<Vec<f32>>,
    },
    /// The base model: last hidden states `[len][hidden]` and, where the model has a pooler, its
    /// output `[hidden]`.
    Hidden {
        /// The last layer's hidden states.
        last: Vec<Vec<Vec<f32>>>,
        /// The pooler's output.
        pooled: Option<Vec<Vec<f32>>>,
    },
}

/// An encoder with its head, ready to run batches.
pub trait EncoderModel: Send {
    /// What the head computes.
    fn task(&self) -> EncoderTask;
    /// The labels of a classification head (sequence or token), None for other heads.
    fn labels(&self) -> Option<&Labels>;
    /// The longest sequence the position embeddings allow.
    fn max_positions(&self) -> usize;
    /// Width of the hidden states (of the embeddings the base model returns).
    fn hidden_size(&self) -> usize;
    /// Runs `inputs` as one batch, padded on the right to the longest, with an attention mask
    /// that hides the padding. Every input is non-empty and at most `max_positions` long.
    fn forward(&self, inputs: &[EncoderInput]) -> Result<EncoderOutput>;
}
