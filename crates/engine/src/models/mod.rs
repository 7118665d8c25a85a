//! Model architectures, one file each, and the dispatch from config.json to them.

pub mod mistral;
pub mod mixtral;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::batch::StepBatch;
use crate::classification::{Labels, SequenceClassifier};
use crate::error::{EngineError, Result};
use crate::kv_cache::{CacheShape, KvCache};

/// Which positions of a step the model computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// The last column only (`[batch, vocab]`): every row's newest token, since rows are
    /// left-padded. What generation needs.
    Last,
    /// Every column (`[batch, seq, vocab]`), padding included.
    All,
}

/// A decoder that generates text over the rolling KV cache.
pub trait CausalLm: Send {
    /// The cache the model needs.
    fn cache_shape(&self) -> CacheShape;
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// The context the model was trained for; the default bound of a sequence's length.
    fn max_position_embeddings(&self) -> usize;
    /// One forward step: appends the batch's tokens to their slots' caches and returns f32
    /// logits.
    fn forward(&self, batch: &StepBatch, cache: &KvCache, logits: LogitsMode) -> Result<Tensor>;
}

/// The causal-LM architectures Candlewick serves, as named in config.json's `architectures`.
pub const SUPPORTED_CAUSAL_LMS: &[&str] = &["MistralForCausalLM", "MixtralForCausalLM"];

/// The architecture config.json names: `architectures[0]`, else derived from `model_type`.
pub fn architecture(config: &serde_json::Value) -> Option<String> {
    if let Some(name) = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
    {
        return Some(name.to_string());
    }
    match config.get("model_type").and_then(|t| t.as_str())? {
        "mistral" => Some("MistralForCausalLM".into()),
        "mixtral" => Some("MixtralForCausalLM".into()),
        other => Some(other.to_string()),
    }
}

/// Builds the causal LM that `config_json` describes from the weights in `vb`.
pub fn load_causal_lm(config_json: &str, vb: VarBuilder) -> Result<Box<dyn CausalLm>> {
    let config: serde_json::Value = parse_config(config_json)?;
    let found = architecture(&config).unwrap_or_else(|| "(none)".into());
    match found.as_str() {
        "MistralForCausalLM" => {
            let config: mistral::MistralConfig = parse_config(config_json)?;
            Ok(Box::new(mistral::MistralForCausalLM::load(vb, &config)?))
        }
        "MixtralForCausalLM" => {
            let config: mixtral::MixtralConfig = parse_config(config_json)?;
            Ok(Box::new(mixtral::load_causal_lm(vb, &config)?))
        }
        _ => Err(EngineError::UnsupportedArchitecture {
            found,
            supported: SUPPORTED_CAUSAL_LMS.to_vec(),
        }),
    }
}

/// The sequence classifiers Candlewick serves.
pub const SUPPORTED_CLASSIFIERS: &[&str] = &[
    "MistralForSequenceClassification",
    "MixtralForSequenceClassification",
];

/// Builds the sequence classifier that `config_json` describes from the weights in `vb`.
pub fn load_sequence_classifier(
    config_json: &str,
    vb: VarBuilder,
) -> Result<Box<dyn SequenceClassifier>> {
    let config: serde_json::Value = parse_config(config_json)?;
    let found = architecture(&config).unwrap_or_else(|| "(none)".into());
    let labels = Labels::from_config(&config)?;
    let pad_token_id = config
        .get("pad_token_id")
        .and_then(serde_json::Value::as_u64)
        .map(|id| id as u32);
    match found.as_str() {
        "MistralForSequenceClassification" => {
            let config: mistral::MistralConfig = parse_config(config_json)?;
            Ok(Box::new(mistral::MistralForSequenceClassification::load(
                vb,
                &config,
                None,
                labels,
                pad_token_id,
            )?))
        }
        "MixtralForSequenceClassification" => {
            let config: mixtral::MixtralConfig = parse_config(config_json)?;
            Ok(Box::new(mistral::MistralForSequenceClassification::load(
                vb,
                &config.decoder(),
                Some(config.experts()?),
                labels,
                pad_token_id,
            )?))
        }
        _ => Err(EngineError::UnsupportedArchitecture {
            found,
            supported: SUPPORTED_CLASSIFIERS.to_vec(),
        }),
    }
}

/// Parses config.json into a model's config struct.
pub fn parse_config<T: serde::de::DeserializeOwned>(config_json: &str) -> Result<T> {
    serde_json::from_str(config_json).map_err(|e| EngineError::BadFile {
        path: "config.json".into(),
        reason: e.to_string(),
    })
}

/// The dtype a model runs in on `device` unless told otherwise: f32 on CPU, bf16 on CUDA.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Refuses a config field whose presence would change the model in a way we do not implement.
pub(crate) fn refuse_if_set(name: &str, value: &Option<serde_json::Value>) -> Result<()> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(value) => Err(EngineError::UnsupportedConfig(format!(
            "{name} = {value} is not implemented"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(config: &str) -> String {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        load_causal_lm(config, vb)
            .err()
            .expect("refused")
            .to_string()
    }

    const TINY: &str = r#""vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1"#;

    #[test]
    fn unknown_architectures_are_refused_with_the_supported_list() {
        let error = load_error(r#"{"architectures": ["FalconForCausalLM"]}"#);
        assert!(error.contains("FalconForCausalLM"), "{error}");
        assert!(error.contains("MistralForCausalLM"), "{error}");
    }

    #[test]
    fn unimplemented_config_fields_are_refused_not_ignored() {
        let error = load_error(&format!(
            r#"{{"architectures": ["MistralForCausalLM"], {TINY}, "rope_scaling": {{"type": "linear", "factor": 2.0}}}}"#
        ));
        assert!(error.contains("rope_scaling"), "{error}");
        let error = load_error(&format!(
            r#"{{"model_type": "mistral", {TINY}, "head_dim": 8}}"#
        ));
        assert!(error.contains("head_dim 8"), "{error}");
    }

    #[test]
    fn a_config_without_architectures_is_read_by_model_type() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let model = load_causal_lm(
            &format!(r#"{{"model_type": "mistral", {TINY}, "sliding_window": null}}"#),
            vb,
        )
        .expect("loads");
        assert_eq!(model.vocab_size(), 16);
        assert_eq!(model.cache_shape().sliding_window, None);
        assert_eq!(model.cache_shape().head_dim, 4);
    }
}
