//! The encoder task routes, shaped like the Hugging Face Inference API
//! (`{"inputs": ..., "parameters": {...}}`) and answering with the outputs of the transformers
//! pipeline of the same task: `/v1/classify`, `/v1/token-classify`, `/v1/question-answering`,
//! `/v1/fill-mask`.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use candlewick_engine::encoder::EncoderInput;
use candlewick_engine::EncoderOutput;
use candlewick_scheduler::{EncoderInfo, EncoderScheduler, SchedulerError};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use super::JsonBody;
use crate::error::ApiError;
use crate::generation::blocking;
use crate::pipelines::{
    fill_mask, question_answering, text_classification, token_classification, PipelineTokenizer,
    Prepared,
};
use crate::state::Served;

/// A task request: the inputs, the pipeline's parameters, and optionally the model's name.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    /// The pipeline's inputs (a text, a list of texts, a question and context, ...).
    pub inputs: Value,
    /// The pipeline's parameters; absent means the defaults.
    #[serde(default)]
    pub parameters: Option<Value>,
    /// The served model's name; optional, as the Inference API has the model in the URL.
    #[serde(default)]
    pub model: Option<String>,
    /// Accepted for compatibility with Inference API clients; has no effect here.
    #[serde(default)]
    pub options: Option<Value>,
}

/// Runs `inputs` through the encoder thread and waits for their outputs. Errors about a
/// sequence's length name `param`.
pub async fn run_encoder(
    scheduler: &EncoderScheduler,
    inputs: Vec<EncoderInput>,
    param: &'static str,
) -> Result<Vec<EncoderOutput>, ApiError> {
    let count = inputs.len();
    let receiver = scheduler
        .submit(inputs)
        .map_err(|source| ApiError::scheduler(source, param))?;
    let outputs = receiver
        .await
        .map_err(|_| ApiError::scheduler(SchedulerError::Stopped, param))?
        .map_err(|source| ApiError::scheduler(source, param))?;
    if outputs.len() != count {
        return Err(ApiError::Internal(format!(
            "the encoder returned {} outputs for {count} inputs",
            outputs.len()
        )));
    }
    Ok(outputs)
}

/// `POST /v1/classify`: text-classification. A single input (a text or a pair) is answered with a
/// list holding its labels, as the Inference API does, so that clients read every answer as a
/// list of `[{label, score}]`; a list of inputs is answered as the pipeline answers it.
pub async fn classify(
    State(served): State<Arc<Served>>,
    JsonBody(request): JsonBody<TaskRequest>,
) -> Result<Json<Value>, ApiError> {
    let single = !request.inputs.is_array();
    let pipeline = Pipeline {
        task: "text-classification",
        parse: text_classification::Parameters::parse,
        prepare: text_classification::prepare,
        finish: text_classification::finish,
    };
    let answer = pipeline.run(&served, request).await?;
    let mut answer = serde_json::to_value(answer)
        .map_err(|error| ApiError::Internal(format!("serializing the answer: {error}")))?;
    if single {
        if !answer.is_array() {
            answer = Value::Array(vec![answer]);
        }
        answer = Value::Array(vec![answer]);
    }
    Ok(Json(answer))
}

/// `POST /v1/token-classify`: token-classification, with the pipeline's aggregation strategies
/// and character offsets into each text.
pub async fn token_classify(
    State(served): State<Arc<Served>>,
    JsonBody(request): JsonBody<TaskRequest>,
) -> Result<Json<token_classification::Output>, ApiError> {
    let pipeline = Pipeline {
        task: "token-classification",
        parse: token_classification::Parameters::parse,
        prepare: token_classification::prepare,
        finish: token_classification::finish,
    };
    pipeline.run(&served, request).await.map(Json)
}

/// `POST /v1/question-answering`: extractive question answering over contexts of any length
/// (cut into overlapping windows as the pipeline cuts them).
pub async fn question_answering(
    State(served): State<Arc<Served>>,
    JsonBody(request): JsonBody<TaskRequest>,
) -> Result<Json<question_answering::Output>, ApiError> {
    let pipeline = Pipeline {
        task: "question-answering",
        parse: question_answering::Parameters::parse,
        prepare: question_answering::prepare,
        finish: question_answering::finish,
    };
    pipeline.run(&served, request).await.map(Json)
}

/// `POST /v1/fill-mask`: the best tokens for each mask, or the scores of given targets.
pub async fn fill_mask(
    State(served): State<Arc<Served>>,
    JsonBody(request): JsonBody<TaskRequest>,
) -> Result<Json<fill_mask::Output>, ApiError> {
    let pipeline = Pipeline {
        task: "fill-mask",
        parse: fill_mask::Parameters::parse,
        prepare: fill_mask::prepare,
        finish: fill_mask::finish,
    };
    pipeline.run(&served, request).await.map(Json)
}

/// A pipeline's tokenizing step: the request's inputs into the sequences to run and a plan.
type PrepareFn<Parameters, Plan> =
    fn(&PipelineTokenizer, &EncoderInfo, &Value, &Parameters) -> Result<Prepared<Plan>, ApiError>;

/// A task's pipeline: its name (the head it needs) and its three steps.
struct Pipeline<Parameters, Plan, Output> {
    task: &'static str,
    parse: fn(Option<&Value>) -> Result<Parameters, ApiError>,
    prepare: PrepareFn<Parameters, Plan>,
    finish: fn(Plan, Vec<EncoderOutput>) -> Result<Output, ApiError>,
}

impl<Parameters, Plan, Output> Pipeline<Parameters, Plan, Output>
where
    Parameters: Send + 'static,
    Plan: Send + 'static,
    Output: Send + 'static,
{
    /// One call: check the model and task, read the parameters, tokenize (off the async
    /// workers: a long context takes a while), run the sequences through the encoder thread in
    /// its dynamic batches, and post-process (off the async workers too: fill-mask reads a
    /// vocabulary per mask, question answering every span of every window).
    async fn run(self, served: &Served, request: TaskRequest) -> Result<Output, ApiError> {
        let state = served.for_task(request.model.as_deref(), self.task)?;
        let (scheduler, tokenizer) = state.pipeline(self.task)?;
        let parameters = (self.parse)(request.parameters.as_ref())?;
        let tokenizer = tokenizer.clone();
        let info = scheduler.info().clone();
        let prepare = self.prepare;
        let prepared =
            blocking(move || prepare(&tokenizer, &info, &request.inputs, &parameters)).await?;
        let outputs = run_encoder(scheduler, prepared.inputs, "inputs").await?;
        let finish = self.finish;
        blocking(move || finish(prepared.plan, outputs)).await
    }
}
