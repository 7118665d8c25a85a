//! What every handler shares: the served model, its tokenizer and chat template, and the
//! scheduler that runs it.

use std::sync::Arc;

use candlewick_engine::{LoadedGenerator, Tokenizer};
use candlewick_scheduler::{Scheduler, SchedulerConfig, SchedulerError};

use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::error::ApiError;
use crate::generation::unix_now;

/// The served model.
pub struct AppState {
    /// The name requests must give as `model`.
    pub model_name: String,
    /// When the model was loaded (Unix seconds), for `/v1/models`.
    pub created: u64,
    /// The engine thread's handle.
    pub scheduler: Scheduler,
    /// The tokenizer, shared with the scheduler.
    pub tokenizer: Arc<Tokenizer>,
    chat_template: Result<ChatTemplate, ChatTemplateError>,
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
            scheduler,
            tokenizer,
            chat_template,
        })
    }

    /// Refuses a request for another model.
    pub fn check_model(&self, requested: &str) -> Result<(), ApiError> {
        if requested == self.model_name {
            Ok(())
        } else {
            Err(ApiError::ModelNotFound(requested.to_string()))
        }
    }

    /// The compiled chat template, or why there is none.
    pub fn chat_template(&self) -> Result<&ChatTemplate, ApiError> {
        self.chat_template
            .as_ref()
            .map_err(|error| ApiError::ChatTemplate(error.clone()))
    }

    /// Lets accepted requests finish and stops the engine thread.
    pub fn shutdown(self) {
        let mut scheduler = self.scheduler;
        scheduler.shutdown();
    }
}
