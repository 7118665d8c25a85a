//! What every handler shares: the served model, its tokenizer, and the scheduler that runs it:
//! the continuous-batching generator for causal LMs, the dynamic batcher for encoders.

use std::sync::{Arc, OnceLock};

use candlewick_engine::grammar::{Constraint, GrammarCompiler, GrammarError};
use candlewick_engine::{EncoderTask, LoadedEncoder, LoadedGenerator, Tokenizer};
use candlewick_scheduler::{
    EncoderConfig, EncoderScheduler, Scheduler, SchedulerConfig, SchedulerError,
};

use crate::api::common::StructuredOutput;
use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::error::ApiError;
use crate::generation::unix_now;
use crate::pipelines::PipelineTokenizer;

/// How `/v1/embeddings` turns a sequence's hidden states into one vector (on the device).
pub use candlewick_engine::Pooling;

/// The engine behind the routes.
pub enum Engine {
    /// A causal LM, for the completion routes.
    Generator {
        /// The engine thread's handle.
        scheduler: Scheduler,
        /// The compiled chat template, or why there is none.
        chat_template: Result<ChatTemplate, ChatTemplateError>,
        /// The model's vocabulary as the grammar engine sees it, built by the first structured
        /// output.
        grammar: OnceLock<Result<Box<GrammarCompiler>, GrammarError>>,
    },
    /// An encoder with one head, for the task routes.
    Encoder {
        /// The encoder thread's handle.
        scheduler: EncoderScheduler,
        /// The tokenizer with the settings the task pipelines read from tokenizer_config.json.
        pipeline_tokenizer: PipelineTokenizer,
        /// How embeddings are pooled.
        pooling: Pooling,
    },
}

/// The served model.
pub struct AppState {
    /// The name requests must give as `model`.
    pub model_name: String,
    /// When the model was loaded (Unix seconds), for `/v1/models`.
    pub created: u64,
    /// The tokenizer, shared with the scheduler.
    pub tokenizer: Arc<Tokenizer>,
    /// The architecture config.json names.
    pub architecture: String,
    /// The scheduler that runs the model.
    pub engine: Engine,
}

impl AppState {
    /// Starts the scheduler over `loaded` and compiles its chat template. A template that does
    /// not compile is logged and reported to chat requests; completions still work.
    pub fn start(
        model_name: String,
        loaded: LoadedGenerator,
        config: SchedulerConfig,
    ) -> Result<Self, SchedulerError> {
        let tokenizer = Arc::new(loaded.tokenizer);
        let chat_template = match tokenizer.chat_template() {
            None => Err(ChatTemplateError::Missing),
            Some(source) => ChatTemplate::new(source, tokenizer.bos_token(), tokenizer.eos_token()),
        };
        if let Err(error) = &chat_template {
            tracing::warn!(%error, "chat completions are unavailable");
        }
        let scheduler = Scheduler::start(loaded.generator, Arc::clone(&tokenizer), config)?;
        Ok(Self {
            model_name,
            created: unix_now(),
            tokenizer,
            architecture: loaded.architecture,
            engine: Engine::Generator {
                scheduler,
                chat_template,
                grammar: OnceLock::new(),
            },
        })
    }

    /// Starts the encoder thread over `loaded`; `pipeline_tokenizer` is its tokenizer as the
    /// task pipelines see it.
    pub fn start_encoder(
        model_name: String,
        loaded: LoadedEncoder,
        pipeline_tokenizer: PipelineTokenizer,
        config: EncoderConfig,
        pooling: Pooling,
    ) -> Result<Self, SchedulerError> {
        let contract = loaded.model.contract();
        if contract.task == EncoderTask::FeatureExtraction
            && pooling == Pooling::Pooler
            && !contract.has_pooler
        {
            return Err(SchedulerError::InvalidRequest(
                "pooling = \"pooler\" needs a pooler, and this checkpoint has none; use mean or cls"
                    .into(),
            ));
        }
        let scheduler = EncoderScheduler::start(loaded.model, config)?;
        Ok(Self {
            model_name,
            created: unix_now(),
            tokenizer: Arc::new(loaded.tokenizer),
            architecture: loaded.architecture,
            engine: Engine::Encoder {
                scheduler,
                pipeline_tokenizer,
                pooling,
            },
        })
    }

    /// A fresh constraint for `structured` (none without it), compiled against the model's
    /// vocabulary; an invalid grammar is a 400 naming the field and quoting the grammar engine.
    /// Blocks: call it off the async runtime.
    pub fn constraint(
        &self,
        structured: Option<&StructuredOutput>,
    ) -> Result<Option<Constraint>, ApiError> {
        let Some(structured) = structured else {
            return Ok(None);
        };
        let Engine::Generator {
            scheduler, grammar, ..
        } = &self.engine
        else {
            return Err(ApiError::invalid(
                structured.param,
                "structured outputs need a generative model",
            ));
        };
        let compiler = grammar
            .get_or_init(|| {
                GrammarCompiler::new(&self.tokenizer, scheduler.vocab_size()).map(Box::new)
            })
            .as_ref()
            .map_err(|error| ApiError::invalid(structured.param, error.to_string()))?;
        compiler
            .compile(&structured.grammar)
            .map(Some)
            .map_err(|error| {
                ApiError::invalid(
                    structured.param,
                    format!("{} cannot be used: {error}", structured.param),
                )
            })
    }

    /// What the served model does, as a pipeline task name.
    pub fn task(&self) -> &'static str {
        match &self.engine {
            Engine::Generator { .. } => "text-generation",
            Engine::Encoder { scheduler, .. } => scheduler.info().task().name(),
        }
    }

    /// The generation scheduler, or a 400 naming what the served model does instead.
    pub fn generator(&self) -> Result<&Scheduler, ApiError> {
        match &self.engine {
            Engine::Generator { scheduler, .. } => Ok(scheduler),
            Engine::Encoder { .. } => Err(self.wrong_task("text-generation")),
        }
    }

    /// The encoder scheduler if the served model's head does `task`, else a 400 naming the
    /// model's task.
    pub fn encoder(&self, task: &'static str) -> Result<&EncoderScheduler, ApiError> {
        self.pipeline(task).map(|(scheduler, _)| scheduler)
    }

    /// The encoder scheduler and the pipelines' tokenizer if the served model's head does
    /// `task`, else a 400 naming the model's task.
    pub fn pipeline(
        &self,
        task: &'static str,
    ) -> Result<(&EncoderScheduler, &PipelineTokenizer), ApiError> {
        match &self.engine {
            Engine::Encoder {
                scheduler,
                pipeline_tokenizer,
                ..
            } if scheduler.info().task().name() == task => Ok((scheduler, pipeline_tokenizer)),
            _ => Err(self.wrong_task(task)),
        }
    }

    /// How embeddings are pooled; None for a generator.
    pub fn pooling(&self) -> Option<Pooling> {
        match &self.engine {
            Engine::Encoder { pooling, .. } => Some(*pooling),
            Engine::Generator { .. } => None,
        }
    }

    fn wrong_task(&self, wanted: &'static str) -> ApiError {
        ApiError::WrongTask {
            model: self.model_name.clone(),
            architecture: self.architecture.clone(),
            task: self.task(),
            wanted,
        }
    }

    /// The compiled chat template, or why there is none.
    pub fn chat_template(&self) -> Result<&ChatTemplate, ApiError> {
        match &self.engine {
            Engine::Generator { chat_template, .. } => chat_template
                .as_ref()
                .map_err(|error| ApiError::ChatTemplate(error.clone())),
            Engine::Encoder { .. } => Err(self.wrong_task("text-generation")),
        }
    }

    /// Whether the engine thread runs.
    pub fn is_alive(&self) -> bool {
        match &self.engine {
            Engine::Generator { scheduler, .. } => scheduler.is_alive(),
            Engine::Encoder { scheduler, .. } => scheduler.is_alive(),
        }
    }

    /// Lets accepted requests finish and stops the engine thread.
    pub fn shutdown(self) {
        match self.engine {
            Engine::Generator { mut scheduler, .. } => scheduler.shutdown(),
            Engine::Encoder { mut scheduler, .. } => scheduler.shutdown(),
        }
    }
}

/// Every model one server serves, each with its own scheduler; requests pick one by `model`.
pub struct Served {
    models: Vec<Arc<AppState>>,
}

impl Served {
    /// The models, in the order `/v1/models` lists them. Names must be distinct.
    pub fn new(models: Vec<Arc<AppState>>) -> Result<Self, String> {
        if models.is_empty() {
            return Err("no model to serve".into());
        }
        for (i, model) in models.iter().enumerate() {
            if models[..i]
                .iter()
                .any(|other| other.model_name == model.model_name)
            {
                return Err(format!("two models are served as {:?}", model.model_name));
            }
        }
        Ok(Self { models })
    }

    /// Every served model.
    pub fn models(&self) -> &[Arc<AppState>] {
        &self.models
    }

    /// The model served as `name`; a 404 for a name no model has.
    pub fn get(&self, name: &str) -> Result<&Arc<AppState>, ApiError> {
        self.models
            .iter()
            .find(|model| model.model_name == name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
    }

    /// For the task routes, whose `model` is optional: the named model, or else the one model
    /// that does `task` (or the only model, which then answers that it does another task).
    pub fn for_task(&self, name: Option<&str>, task: &str) -> Result<&Arc<AppState>, ApiError> {
        if let Some(name) = name {
            return self.get(name);
        }
        let mut doing = self.models.iter().filter(|model| model.task() == task);
        match (doing.next(), doing.next()) {
            (Some(model), None) => Ok(model),
            _ if self.models.len() == 1 => Ok(&self.models[0]),
            (None, _) => Err(ApiError::invalid(
                "model",
                format!("no served model does {task}; name one of the served models as `model`"),
            )),
            (Some(_), Some(_)) => Err(ApiError::invalid(
                "model",
                format!("several served models do {task}: name one as `model`"),
            )),
        }
    }

    /// Whether every model's engine thread runs.
    pub fn is_alive(&self) -> bool {
        self.models.iter().all(|model| model.is_alive())
    }
}

impl From<Arc<AppState>> for Served {
    fn from(model: Arc<AppState>) -> Self {
        Self {
            models: vec![model],
        }
    }
}
