//! Candlewick's engine: models, weights loading, tokenizers, sequence state and sampling.
//! No async and no HTTP: the scheduler drives it from its own thread.

pub mod attention;
pub mod convert;
pub mod decoder;
pub mod detokenizer;
pub mod encoder;
pub mod error;
pub mod grammar;
pub mod kernels;
pub mod layers;
pub mod loader;
pub mod models;
pub mod registry;
pub mod sampling;
pub mod tokenizer;

pub use decoder::generator::{Generator, GeneratorConfig};
pub use decoder::step::StepRow;
pub use decoder::LogitsMode;
pub use encoder::{
    EncoderContract, EncoderInput, EncoderModel, EncoderOutput, EncoderTask, EntityInput, Pooling,
    Requested,
};
pub use error::{EngineError, Result};
pub use layers::{QuantizeOptions, QuantizeReport, WeightQuantization};
pub use loader::{ModelFiles, ModelSource};
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
    /// In-situ quantization of a generator's linear weights; None keeps them exact.
    pub quantize: Option<QuantizeOptions>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            generator: GeneratorConfig::default(),
            quantize: None,
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
    /// What in-situ quantization did, when it was asked for.
    pub quantization: Option<QuantizeReport>,
}

/// An encoder with its head, ready to run batches, with its tokenizer.
pub struct LoadedEncoder {
    /// The model and its head.
    pub model: Box<dyn EncoderModel>,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// The text of tokenizer_config.json, when the model has one: the pipelines read its
    /// special tokens and `model_max_length`.
    pub tokenizer_config: Option<String>,
    /// The architecture config.json named.
    pub architecture: String,
}

/// Resolves `source` and loads it as an encoder with the head its config.json names.
pub fn load_encoder(source: &ModelSource, options: &LoadOptions) -> Result<LoadedEncoder> {
    if options.quantize.is_some() {
        return Err(EngineError::UnsupportedConfig(
            "in-situ quantization applies to generators; encoders run in their dtype".into(),
        ));
    }
    let opened = OpenedModel::open(source, options)?;
    let model = registry::load_encoder(&opened.files.config, opened.weights)?;
    Ok(LoadedEncoder {
        model,
        tokenizer: opened.tokenizer,
        tokenizer_config: opened.files.tokenizer_config,
        architecture: opened.architecture,
    })
}

/// What the checkpoint at `source` is served as, read from its config.json alone.
pub fn model_kind(source: &ModelSource) -> Result<registry::Kind> {
    let files = ModelFiles::resolve(source)?;
    Ok(registry::lookup(&files.config)?.kind)
}

/// A model's files with its tokenizer read and its weights opened.
struct OpenedModel {
    files: ModelFiles,
    tokenizer: Tokenizer,
    architecture: String,
    weights: candle_nn::VarBuilder<'static>,
    dtype: DType,
}

impl OpenedModel {
    fn open(source: &ModelSource, options: &LoadOptions) -> Result<Self> {
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
        let architecture = registry::architecture_name(&config).unwrap_or_default();
        let weights = files.var_builder(dtype, &options.device)?;
        Ok(Self {
            files,
            tokenizer,
            architecture,
            weights,
            dtype,
        })
    }
}

/// Resolves `source`, loads its weights and tokenizer, and allocates the KV cache.
pub fn load_generator(source: &ModelSource, options: &LoadOptions) -> Result<LoadedGenerator> {
    let opened = OpenedModel::open(source, options)?;
    let mut model = registry::load_causal_lm(&opened.files.config, opened.weights)?;
    let quantization = match &options.quantize {
        Some(quantize) => {
            let report = model.quantize(quantize)?;
            tracing::info!(
                format = quantize.format.name(),
                quantized = report.quantized,
                kept = report.kept,
                "quantized the linear weights"
            );
            Some(report)
        }
        None => None,
    };
    let generator = Generator::new(model, &options.generator, &options.device, opened.dtype)?;
    Ok(LoadedGenerator {
        generator,
        tokenizer: opened.tokenizer,
        architecture: opened.architecture,
        quantization,
    })
}
