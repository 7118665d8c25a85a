//! Model architectures, one file each, and the dispatch from config.json to them.

pub mod megatron_bert;
pub mod mistral;
pub mod mixtral;
pub mod mobilebert;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::decoder::CausalLm;
use crate::encoder::labels::{Labels, SequenceClassifier};
use crate::encoder::{EncoderModel, EncoderTask};
use crate::error::{EngineError, Result};

/// The causal-LM architectures Candlewick serves, as named in config.json's `architectures`.
pub const SUPPORTED_CAUSAL_LMS: &[&str] = &[
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "MegatronBertForCausalLM",
];

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
        // What transformers' AutoModel builds for these model types: the base encoder.
        "mobilebert" => Some("MobileBertModel".into()),
        "megatron-bert" => Some("MegatronBertModel".into()),
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
        "MegatronBertForCausalLM" => {
            let config: megatron_bert::MegatronBertConfig = parse_config(config_json)?;
            Ok(Box::new(megatron_bert::MegatronBertForCausalLM::load(
                vb, &config,
            )?))
        }
        _ => Err(EngineError::UnsupportedArchitecture {
            found,
            supported: SUPPORTED_CAUSAL_LMS.to_vec(),
        }),
    }
}

/// The encoders Candlewick serves, as named in config.json's `architectures`. A
/// `*ForPreTraining` checkpoint is served as its masked-LM head, as transformers' fill-mask
/// pipeline loads it.
pub const SUPPORTED_ENCODERS: &[&str] = &[
    "MobileBertModel",
    "MobileBertForSequenceClassification",
    "MobileBertForTokenClassification",
    "MobileBertForQuestionAnswering",
    "MobileBertForMaskedLM",
    "MobileBertForPreTraining",
    "MobileBertForMultipleChoice",
    "MobileBertForNextSentencePrediction",
    "MegatronBertModel",
    "MegatronBertForSequenceClassification",
    "MegatronBertForTokenClassification",
    "MegatronBertForQuestionAnswering",
    "MegatronBertForMaskedLM",
    "MegatronBertForPreTraining",
    "MegatronBertForMultipleChoice",
    "MegatronBertForNextSentencePrediction",
];

/// The model family and head an encoder architecture names.
fn encoder_head(architecture: &str) -> Option<(&'static str, EncoderTask)> {
    let (family, head) = ["MobileBert", "MegatronBert"]
        .into_iter()
        .find_map(|family| Some((family, architecture.strip_prefix(family)?)))?;
    let task = match head {
        "Model" => EncoderTask::FeatureExtraction,
        "ForSequenceClassification" => EncoderTask::SequenceClassification,
        "ForTokenClassification" => EncoderTask::TokenClassification,
        "ForQuestionAnswering" => EncoderTask::QuestionAnswering,
        "ForMaskedLM" | "ForPreTraining" => EncoderTask::MaskedLm,
        "ForMultipleChoice" => EncoderTask::MultipleChoice,
        "ForNextSentencePrediction" => EncoderTask::NextSentencePrediction,
        _ => return None,
    };
    Some((family, task))
}

/// Builds the encoder and head that `config_json` describes (by `architectures[0]`) from the
/// weights in `vb`. The Mistral and Mixtral sequence classifiers are served as encoders too: they
/// read a whole sequence and answer with one row of logits.
pub fn load_encoder(config_json: &str, vb: VarBuilder) -> Result<Box<dyn EncoderModel>> {
    let config: serde_json::Value = parse_config(config_json)?;
    let found = architecture(&config).unwrap_or_else(|| "(none)".into());
    if SUPPORTED_CLASSIFIERS.contains(&found.as_str()) {
        return Ok(Box::new(load_decoder_classifier(config_json, vb)?));
    }
    let Some((family, task)) = encoder_head(&found) else {
        return Err(EngineError::UnsupportedArchitecture {
            found,
            supported: [SUPPORTED_ENCODERS, SUPPORTED_CLASSIFIERS].concat(),
        });
    };
    let labels = Labels::from_config(&config)?;
    if family == "MobileBert" {
        let config: mobilebert::MobileBertConfig = parse_config(config_json)?;
        Ok(Box::new(mobilebert::load(vb, &config, task, labels)?))
    } else {
        let config: megatron_bert::MegatronBertConfig = parse_config(config_json)?;
        Ok(Box::new(megatron_bert::load(vb, &config, task, labels)?))
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
    Ok(Box::new(load_decoder_classifier(config_json, vb)?))
}

/// `MistralForSequenceClassification` or `MixtralForSequenceClassification`.
fn load_decoder_classifier(
    config_json: &str,
    vb: VarBuilder,
) -> Result<mistral::MistralForSequenceClassification> {
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

    const TINY_MOBILEBERT: &str = r#""vocab_size": 16, "hidden_size": 8, "embedding_size": 4,
        "intra_bottleneck_size": 4, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_feedforward_networks": 2, "max_position_embeddings": 8"#;
    const TINY_MEGATRON: &str = r#""vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8"#;

    fn encoder(config: &str) -> Result<Box<dyn EncoderModel>> {
        load_encoder(config, VarBuilder::zeros(DType::F32, &Device::Cpu))
    }

    #[test]
    fn encoder_architectures_pick_their_head() {
        for (architecture, task) in [
            ("MobileBertModel", EncoderTask::FeatureExtraction),
            ("MobileBertForPreTraining", EncoderTask::MaskedLm),
            (
                "MobileBertForQuestionAnswering",
                EncoderTask::QuestionAnswering,
            ),
            (
                "MegatronBertForNextSentencePrediction",
                EncoderTask::NextSentencePrediction,
            ),
            ("MegatronBertForMultipleChoice", EncoderTask::MultipleChoice),
        ] {
            let tiny = if architecture.starts_with("Mobile") {
                TINY_MOBILEBERT
            } else {
                TINY_MEGATRON
            };
            let model = encoder(&format!(
                r#"{{"architectures": ["{architecture}"], {tiny}}}"#
            ))
            .expect(architecture);
            assert_eq!(model.task(), task, "{architecture}");
            assert_eq!(model.hidden_size(), 8);
            assert_eq!(model.max_positions(), 8);
        }
        let model = encoder(&format!(
            r#"{{"model_type": "megatron-bert", {TINY_MEGATRON}}}"#
        ))
        .expect("read by model_type");
        assert_eq!(model.task(), EncoderTask::FeatureExtraction);
        let input = crate::encoder::EncoderInput {
            ids: vec![1, 2, 3],
            type_ids: vec![0, 0, 1],
        };
        match model.forward(&[input]).expect("runs") {
            crate::encoder::EncoderOutput::Hidden { last, pooled } => {
                assert_eq!((last[0].len(), last[0][0].len()), (3, 8));
                assert_eq!(pooled.expect("pooler")[0].len(), 8);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsupported_encoders_and_configs_are_refused() {
        let error = encoder(r#"{"architectures": ["BertForMaskedLM"]}"#)
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains("BertForMaskedLM"), "{error}");
        assert!(error.contains("MobileBertForMaskedLM"), "{error}");
        let refused = |config: String, needle: &str| {
            let error = encoder(&config).err().expect("refused").to_string();
            assert!(error.contains(needle), "{error}");
        };
        refused(
            format!(
                r#"{{"architectures": ["MegatronBertModel"], {TINY_MEGATRON}, "position_embedding_type": "relative_key"}}"#
            ),
            "relative_key",
        );
        refused(
            format!(
                r#"{{"architectures": ["MobileBertModel"], {TINY_MOBILEBERT}, "hidden_act": "gelu_fancy"}}"#
            ),
            "gelu_fancy",
        );
        refused(
            format!(
                r#"{{"architectures": ["MobileBertModel"], {TINY_MOBILEBERT}, "normalization_type": "batch_norm"}}"#
            ),
            "batch_norm",
        );
        refused(
            format!(
                r#"{{"architectures": ["MobileBertForQuestionAnswering"], {TINY_MOBILEBERT}, "num_labels": 3}}"#
            ),
            "num_labels = 2",
        );
        refused(
            format!(
                r#"{{"architectures": ["MobileBertForMaskedLM"], {}, "embedding_size": 16}}"#,
                TINY_MOBILEBERT.replace(r#""embedding_size": 4,"#, "")
            ),
            "embedding_size 16",
        );
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
        let attention = model.state_spec().layers[0].attention.expect("attention");
        assert_eq!(attention.pattern, crate::attention::AttentionPattern::Full);
        assert_eq!(attention.key_width, 4);
    }
}
