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

/// The token a decoder's sequence classifier scores, as transformers 4.37.2 picks it: the position
/// before the first `pad_token_id` in the sequence, modulo its length. For a sequence without that
/// id this is its last token (index -1), which is also what a left- or right-padded batch gives for
/// every row; a sequence that contains the pad id as a real token is scored at the token before it,
/// exactly as transformers does for it alone.
pub(crate) fn scored_token(pad_token_id: Option<u32>, sequence: &[u32]) -> usize {
    let first_pad = pad_token_id
        .and_then(|pad| sequence.iter().position(|&t| t == pad))
        .unwrap_or(0);
    (first_pad + sequence.len() - 1) % sequence.len()
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
