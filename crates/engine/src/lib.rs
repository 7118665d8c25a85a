//! Candlewick's engine: models, weights loading, tokenizers, the rolling KV cache and sampling.
//! No async and no HTTP: the scheduler drives it from its own thread.

pub mod attention;
pub mod batch;
pub mod cpu_attention;
pub mod cpu_matmul;
pub mod detokenizer;
pub mod error;
pub mod generator;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod models;
pub mod sampling;
pub mod tokenizer;

pub use batch::StepRow;
pub use error::{EngineError, Result};
pub use generator::{Generator, GeneratorConfig};
pub use loader::{ModelFiles, ModelSource};
pub use models::LogitsMode;
pub use tokenizer::Tokenizer;

use candle_core::{DType, Device};

/// What to load and where to run it.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The device; CPU unless built with `cuda` and asked for it.
    pub device: Device,
    /// The dtype; None for [`models::default_dtype`] of the device.
    pub dtype: Option<DType>,
    /// Cache and step sizes.
    pub generator: GeneratorConfig,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            generator: GeneratorConfig::default(),
        }
    }
}

/// A causal LM ready to generate: its generator and its tokenizer.
pub struct LoadedGenerator {
    /// The model and its KV cache.
    pub generator: Generator,
    /// The model's tokenizer and special tokens.
    pub tokenizer: Tokenizer,
    /// The architecture config.json named.
    pub architecture: String,
}

/// Resolves `source`, loads its weights and tokenizer, and allocates the KV cache.
pub fn load_generator(source: &ModelSource, options: &LoadOptions) -> Result<LoadedGenerator> {
    let files = ModelFiles::resolve(source)?;
    let dtype = options
        .dtype
        .unwrap_or_else(|| models::default_dtype(&options.device));
    let tokenizer = Tokenizer::from_model_files(
        &files.tokenizer,
        files.tokenizer_config.as_deref(),
        files.generation_config.as_deref(),
        &files.config,
    )?;
    let config: serde_json::Value = models::parse_config(&files.config)?;
    let architecture = models::architecture(&config).unwrap_or_default();
    let vb = files.var_builder(dtype, &options.device)?;
    let model = models::load_causal_lm(&files.config, vb)?;
    let generator = Generator::new(model, &options.generator, &options.device, dtype)?;
    Ok(LoadedGenerator {
        generator,
        tokenizer,
        architecture,
    })
}
