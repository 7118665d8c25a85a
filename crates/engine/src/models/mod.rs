//! Model architectures, one file each. Which architecture a checkpoint is, and how it is built,
//! is [`crate::registry`]'s business.

pub mod gpt2;
pub mod megatron_bert;
pub mod mistral;
pub mod mixtral;
pub mod mobilebert;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::encoder::labels::Labels;
use crate::error::{EngineError, Result};

/// `MistralForSequenceClassification` or `MixtralForSequenceClassification`.
pub(crate) fn load_decoder_classifier(
    config_json: &str,
    vb: VarBuilder,
) -> Result<mistral::MistralForSequenceClassification> {
    let config: serde_json::Value = parse_config(config_json)?;
    let found = crate::registry::architecture_name(&config).unwrap_or_else(|| "(none)".into());
    let labels = Labels::from_config(&config)?;
    let pad_token_id = config
        .get("pad_token_id")
        .and_then(serde_json::Value::as_u64)
        .map(|id| id as u32);
    match found.as_str() {
        "MistralForSequenceClassification" => {
            let config: mistral::MistralConfig = parse_config(config_json)?;
            mistral::MistralForSequenceClassification::load(vb, &config, None, labels, pad_token_id)
        }
        "MixtralForSequenceClassification" => {
            let config: mixtral::MixtralConfig = parse_config(config_json)?;
            mistral::MistralForSequenceClassification::load(
                vb,
                &config.decoder(),
                Some(config.experts()?),
                labels,
                pad_token_id,
            )
        }
        _ => Err(EngineError::UnsupportedArchitecture {
            found,
            supported: vec![
                "MistralForSequenceClassification",
                "MixtralForSequenceClassification",
            ],
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
