//! Encoders: bidirectional models that read a whole sequence at once and answer with one head.
//!
//! An encoder checkpoint carries exactly one head (the architecture in config.json names it). The
//! engine runs a batch of unpadded token sequences through it and returns f32 outputs per
//! sequence. Each input says what it needs back ([`Requested`]): the head's rows at a few tokens
//! only, or one pooled vector, are selected and pooled on the device, so that what crosses to
//! the host is what the caller reads. What the outputs mean to a user (labels, spans, masks
//! filled) is the server's pipelines' business.

pub mod batch;
pub mod heads;
pub mod labels;
pub mod layers;
pub mod pooling;

pub use crate::encoder::batch::InputLimits;
use crate::encoder::labels::Labels;
pub use crate::encoder::pooling::Pooling;
use crate::error::{EngineError, Result};

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

/// One tokenized sequence, special tokens included, without padding, and what to return for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncoderInput {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Segment ids (0 for the first text, 1 for the second); same length as `ids`.
    pub type_ids: Vec<u32>,
    /// Each token's position id; `None` numbers the tokens as the model does by itself
    /// (from [`InputLimits::first_position`](batch::InputLimits) up).
    pub position_ids: Option<Vec<u32>>,
    /// The entities of an entity-aware model (LUKE), if any.
    pub entities: Option<EntityInput>,
    /// Which of the head's outputs the caller needs.
    pub output: Requested,
}

impl EncoderInput {
    /// A sequence with its segment ids, numbered by the model, asking for every output.
    pub fn new(ids: Vec<u32>, type_ids: Vec<u32>) -> Self {
        Self {
            ids,
            type_ids,
            ..Self::default()
        }
    }

    /// A single-segment sequence (segment 0 everywhere).
    pub fn single(ids: Vec<u32>) -> Self {
        let type_ids = vec![0; ids.len()];
        Self::new(ids, type_ids)
    }

    /// The same input asking for `output`.
    pub fn requesting(mut self, output: Requested) -> Self {
        self.output = output;
        self
    }

    /// Positions the input occupies in a padded batch: its tokens and its entities.
    pub fn width(&self) -> usize {
        self.ids.len() + self.entities.as_ref().map_or(0, |e| e.ids.len())
    }
}

/// The entities of one sequence: transformers' `entity_ids`, `entity_position_ids` (one row per
/// entity, without the `-1` padding) and `entity_token_type_ids`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntityInput {
    /// Entity ids in the model's entity vocabulary.
    pub ids: Vec<u32>,
    /// For each entity, the position ids of the tokens of its mention (at least one, at most
    /// the model's `max_mention_length`).
    pub mentions: Vec<Vec<u32>>,
    /// Each entity's segment id.
    pub type_ids: Vec<u32>,
}

/// Which outputs a request needs, so that the engine computes and copies only those.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Requested {
    /// Everything the head returns, every token's row for the per-token heads.
    #[default]
    All,
    /// A per-token head's rows at these token indexes only, in this order (fill-mask asks for
    /// its mask tokens).
    Tokens(Vec<u32>),
    /// The base model's hidden states pooled to one vector, on the device.
    Pooled(Pooling),
}

/// What an encoder returns for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderOutput {
    /// Sequence classification and next-sentence prediction: a row over the labels; multiple
    /// choice: one score.
    Sequence(Vec<f32>),
    /// Token classification (`[tokens][labels]`) and masked LM (`[tokens][vocab]`): a row per
    /// requested token, every token unless the request named some.
    Tokens(Vec<Vec<f32>>),
    /// Question answering: start and end logits, one per token each.
    Span {
        /// Logits of each token starting the answer.
        start: Vec<f32>,
        /// Logits of each token ending the answer.
        end: Vec<f32>,
    },
    /// The base model: last hidden states `[tokens][hidden]` and, where the model has a
    /// pooler, its output `[hidden]`.
    Hidden {
        /// The last layer's hidden states.
        last: Vec<Vec<f32>>,
        /// The pooler's output.
        pooled: Option<Vec<f32>>,
    },
    /// The base model's hidden states pooled to one vector `[hidden]`.
    Pooled(Vec<f32>),
}

/// What an encoder accepts: its input limits and the outputs its head gives. Plain data, so that
/// a scheduler checks each request on the request's own thread before it joins a batch, and one
/// bad request never fails the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderContract {
    /// Ids, lengths and entities the model takes.
    pub limits: InputLimits,
    /// What the head computes.
    pub task: EncoderTask,
    /// Whether the base model has a pooler (for [`Pooling::Pooler`]).
    pub has_pooler: bool,
}

impl EncoderContract {
    /// Checks `input` against the limits and its requested outputs against the head. Every
    /// error is the request's fault.
    pub fn check(&self, input: &EncoderInput) -> Result<()> {
        batch::validate(input, &self.limits)?;
        self.check_output(&input.output)
    }

    /// Checks that the head can return what `output` asks.
    pub fn check_output(&self, output: &Requested) -> Result<()> {
        let refuse = |what: &str| {
            Err(EngineError::InvalidRequest(format!(
                "the {} head cannot return {what}",
                self.task.name()
            )))
        };
        match output {
            Requested::All => Ok(()),
            Requested::Tokens(_) => match self.task {
                EncoderTask::FeatureExtraction
                | EncoderTask::TokenClassification
                | EncoderTask::MaskedLm => Ok(()),
                _ => refuse("rows of selected tokens"),
            },
            Requested::Pooled(pooling) => match (self.task, pooling) {
                (EncoderTask::FeatureExtraction, Pooling::Pooler) if !self.has_pooler => {
                    refuse("the pooler's output: the checkpoint has no pooler")
                }
                (EncoderTask::FeatureExtraction, _) => Ok(()),
                _ => refuse("pooled hidden states"),
            },
        }
    }
}

/// An encoder with its head, ready to run batches.
pub trait EncoderModel: Send {
    /// What the head computes.
    fn task(&self) -> EncoderTask {
        self.contract().task
    }
    /// The labels of a classification head (sequence or token), None for other heads.
    fn labels(&self) -> Option<&Labels>;
    /// What the model accepts, for checking requests before they are batched.
    fn contract(&self) -> EncoderContract;
    /// The longest sequence the position embeddings allow.
    fn max_positions(&self) -> usize {
        self.contract().limits.max_tokens()
    }
    /// Width of the hidden states (of the embeddings the base model returns).
    fn hidden_size(&self) -> usize;
    /// Runs `inputs` as one batch and returns one output per input, in order. Refuses the
    /// whole batch if one input breaks the [`EncoderContract`]; callers that batch requests
    /// together check each on its own first.
    fn forward(&self, inputs: &[EncoderInput]) -> Result<Vec<EncoderOutput>>;
}
