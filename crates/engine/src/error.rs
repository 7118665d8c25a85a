use std::path::PathBuf;

/// Everything that can go wrong in the engine, with what a user needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file the model needs is not where it was looked for.
    #[error("{file} not found in {location}")]
    MissingFile { file: String, location: String },

    /// The hub could not be reached and the file is not in the local cache.
    #[error("{file} of {repo} is not in the local hub cache ({cache}) and the hub cannot be reached: {reason}")]
    NotCached {
        repo: String,
        file: String,
        cache: PathBuf,
        reason: String,
    },

    /// A file exists but could not be read or parsed.
    #[error("cannot read {path}: {reason}")]
    BadFile { path: String, reason: String },

    /// config.json names an architecture that Candlewick does not implement.
    #[error("unsupported architecture {found:?}; supported: {}", supported.join(", "))]
    UnsupportedArchitecture {
        found: String,
        supported: Vec<&'static str>,
    },

    /// config.json asks for something the implementation would otherwise silently get wrong.
    #[error("unsupported configuration: {0}")]
    UnsupportedConfig(String),

    /// The tokenizer failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A request does not fit the engine's limits or state.
    #[error("{0}")]
    InvalidRequest(String),

    /// No free sequence slot: every slot of the KV cache is in use.
    #[error("all {slots} sequence slots are in use")]
    NoFreeSlot { slots: usize },

    /// A sequence would grow past the context the engine was configured for.
    #[error("sequence of {tokens} tokens exceeds the maximum context of {max_context} tokens")]
    ContextOverflow { tokens: usize, max_context: usize },

    /// The engine broke one of its own invariants: a bug, never the request's fault.
    #[error("internal engine error: {0}")]
    Internal(String),

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl EngineError {
    /// Whether the request is at fault: its input breaks the model's limits or cannot be
    /// tokenized (a 4xx), as opposed to a file, a configuration, a full pool or the engine
    /// itself (a 5xx). The one place that decides.
    pub fn is_request_fault(&self) -> bool {
        match self {
            Self::InvalidRequest(_) | Self::ContextOverflow { .. } | Self::Tokenizer(_) => true,
            Self::MissingFile { .. }
            | Self::NotCached { .. }
            | Self::BadFile { .. }
            | Self::UnsupportedArchitecture { .. }
            | Self::UnsupportedConfig(_)
            | Self::NoFreeSlot { .. }
            | Self::Internal(_)
            | Self::Candle(_) => false,
        }
    }
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, EngineError>;
