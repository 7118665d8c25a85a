//! One table from config.json's `architectures` (or `model_type`) to what Candlewick builds: the
//! model's kind (a generator, or an encoder with one head), and its loader. Loading, serving and
//! the CLI read it; adding an architecture is adding a row here and a file under `models/`.

use candle_nn::VarBuilder;
use serde_json::Value;

use crate::decoder::CausalLm;
use crate::encoder::labels::Labels;
use crate::encoder::{EncoderModel, EncoderTask};
use crate::error::{EngineError, Result};
use crate::models::{self, gpt2, megatron_bert, mistral, mixtral, mobilebert, parse_config};

/// What a checkpoint is served as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A causal LM: generates over the completion routes.
    Generator,
    /// An encoder with one head: answers whole sequences over the task routes. The Mistral and
    /// Mixtral sequence classifiers are served so too.
    Encoder(EncoderTask),
}

/// How an architecture is built from config.json and its weights.
#[derive(Clone, Copy)]
enum Loader {
    Generator(fn(&str, VarBuilder) -> Result<Box<dyn CausalLm>>),
    Encoder(fn(&str, VarBuilder, EncoderTask) -> Result<Box<dyn EncoderModel>>),
}

/// One architecture Candlewick serves.
pub struct Architecture {
    /// The name config.json's `architectures` gives it.
    pub name: &'static str,
    /// What it is served as.
    pub kind: Kind,
    loader: Loader,
}

const fn generator(
    name: &'static str,
    load: fn(&str, VarBuilder) -> Result<Box<dyn CausalLm>>,
) -> Architecture {
    Architecture {
        name,
        kind: Kind::Generator,
        loader: Loader::Generator(load),
    }
}

const fn encoder(
    name: &'static str,
    task: EncoderTask,
    load: fn(&str, VarBuilder, EncoderTask) -> Result<Box<dyn EncoderModel>>,
) -> Architecture {
    Architecture {
        name,
        kind: Kind::Encoder(task),
        loader: Loader::Encoder(load),
    }
}

use EncoderTask::{
    FeatureExtraction, MaskedLm, MultipleChoice, NextSentencePrediction, QuestionAnswering,
    SequenceClassification, TokenClassification,
};

/// Every architecture Candlewick serves. A `*ForPreTraining` checkpoint is served as its
/// masked-LM head, as transformers' fill-mask pipeline loads it. An architecture with two heads has
/// a row of each kind, and is served as the first: `GPT2DoubleHeadsModel` generates, and its
/// multiple-choice head loads as an encoder.
pub const ARCHITECTURES: &[Architecture] = &[
    generator("MistralForCausalLM", load_mistral),
    generator("GPT2LMHeadModel", load_gpt2_lm),
    generator("GPT2DoubleHeadsModel", load_gpt2_lm),
    encoder("GPT2DoubleHeadsModel", MultipleChoice, load_gpt2),
    encoder("GPT2Model", FeatureExtraction, load_gpt2),
    encoder(
        "GPT2ForSequenceClassification",
        SequenceClassification,
        load_gpt2,
    ),
    encoder("GPT2ForTokenClassification", TokenClassification, load_gpt2),
    encoder("GPT2ForQuestionAnswering", QuestionAnswering, load_gpt2),
    generator("MixtralForCausalLM", load_mixtral),
    generator("MegatronBertForCausalLM", load_megatron_bert_causal_lm),
    encoder(
        "MistralForSequenceClassification",
        SequenceClassification,
        load_decoder_classifier,
    ),
    encoder(
        "MixtralForSequenceClassification",
        SequenceClassification,
        load_decoder_classifier,
    ),
    encoder("MobileBertModel", FeatureExtraction, load_mobilebert),
    encoder(
        "MobileBertForSequenceClassification",
        SequenceClassification,
        load_mobilebert,
    ),
    encoder(
        "MobileBertForTokenClassification",
        TokenClassification,
        load_mobilebert,
    ),
    encoder(
        "MobileBertForQuestionAnswering",
        QuestionAnswering,
        load_mobilebert,
    ),
    encoder("MobileBertForMaskedLM", MaskedLm, load_mobilebert),
    encoder("MobileBertForPreTraining", MaskedLm, load_mobilebert),
    encoder(
        "MobileBertForMultipleChoice",
        MultipleChoice,
        load_mobilebert,
    ),
    encoder(
        "MobileBertForNextSentencePrediction",
        NextSentencePrediction,
        load_mobilebert,
    ),
    encoder("MegatronBertModel", FeatureExtraction, load_megatron_bert),
    encoder(
        "MegatronBertForSequenceClassification",
        SequenceClassification,
        load_megatron_bert,
    ),
    encoder(
        "MegatronBertForTokenClassification",
        TokenClassification,
        load_megatron_bert,
    ),
    encoder(
        "MegatronBertForQuestionAnswering",
        QuestionAnswering,
        load_megatron_bert,
    ),
    encoder("MegatronBertForMaskedLM", MaskedLm, load_megatron_bert),
    encoder("MegatronBertForPreTraining", MaskedLm, load_megatron_bert),
    encoder(
        "MegatronBertForMultipleChoice",
        MultipleChoice,
        load_megatron_bert,
    ),
    encoder(
        "MegatronBertForNextSentencePrediction",
        NextSentencePrediction,
        load_megatron_bert,
    ),
];

/// The architecture a config.json without `architectures` is read as, by its `model_type`:
/// what transformers' auto classes build (the causal LM for decoders, the base encoder for
/// encoders).
const MODEL_TYPES: &[(&str, &str)] = &[
    ("mistral", "MistralForCausalLM"),
    ("gpt2", "GPT2LMHeadModel"),
    ("mixtral", "MixtralForCausalLM"),
    ("mobilebert", "MobileBertModel"),
    ("megatron-bert", "MegatronBertModel"),
];

/// The architecture config.json names: `architectures[0]`, else the default of its
/// `model_type`, else the `model_type` itself (so that an error can name it).
pub fn architecture_name(config: &Value) -> Option<String> {
    if let Some(name) = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
    {
        return Some(name.to_string());
    }
    let model_type = config.get("model_type").and_then(Value::as_str)?;
    Some(
        MODEL_TYPES
            .iter()
            .find(|(t, _)| *t == model_type)
            .map_or(model_type, |(_, name)| name)
            .to_string(),
    )
}

/// The architectures of one kind (any encoder head when `encoders`), for error messages.
fn supported(encoders: bool) -> Vec<&'static str> {
    ARCHITECTURES
        .iter()
        .filter(|a| matches!(a.kind, Kind::Encoder(_)) == encoders)
        .map(|a| a.name)
        .collect()
}

/// The row of the architecture `config_json` names.
pub fn lookup(config_json: &str) -> Result<&'static Architecture> {
    let config: Value = parse_config(config_json)?;
    let found = architecture_name(&config).unwrap_or_else(|| "(none)".into());
    ARCHITECTURES
        .iter()
        .find(|a| a.name == found)
        .ok_or_else(|| EngineError::UnsupportedArchitecture {
            found,
            supported: ARCHITECTURES.iter().map(|a| a.name).collect(),
        })
}

/// The row of the architecture `config_json` names, when it is of the kind asked for (an encoder
/// when `encoders`, else a generator); the refusal lists that kind's architectures.
fn lookup_kind(config_json: &str, encoders: bool) -> Result<&'static Architecture> {
    let refuse = |found: String| {
        Err(EngineError::UnsupportedArchitecture {
            found,
            supported: supported(encoders),
        })
    };
    let config: Value = parse_config(config_json)?;
    let found = architecture_name(&config).unwrap_or_else(|| "(none)".into());
    match ARCHITECTURES
        .iter()
        .find(|a| a.name == found && matches!(a.kind, Kind::Encoder(_)) == encoders)
    {
        Some(architecture) => Ok(architecture),
        None => refuse(found),
    }
}

/// Builds the causal LM that `config_json` describes from the weights in `vb`.
pub fn load_causal_lm(config_json: &str, vb: VarBuilder) -> Result<Box<dyn CausalLm>> {
    let architecture = lookup_kind(config_json, false)?;
    match architecture.loader {
        Loader::Generator(load) => load(config_json, vb),
        Loader::Encoder(_) => Err(mismatch(architecture)),
    }
}

/// Builds the encoder and head that `config_json` describes from the weights in `vb`.
pub fn load_encoder(config_json: &str, vb: VarBuilder) -> Result<Box<dyn EncoderModel>> {
    let architecture = lookup_kind(config_json, true)?;
    match (architecture.kind, architecture.loader) {
        (Kind::Encoder(task), Loader::Encoder(load)) => load(config_json, vb, task),
        _ => Err(mismatch(architecture)),
    }
}

/// A row whose loader is not of its kind: a bug in the table.
fn mismatch(architecture: &Architecture) -> EngineError {
    EngineError::Internal(format!(
        "the registry row of {} has a loader of another kind",
        architecture.name
    ))
}

fn load_mistral(config_json: &str, vb: VarBuilder) -> Result<Box<dyn CausalLm>> {
    let config: mistral::MistralConfig = parse_config(config_json)?;
    Ok(Box::new(mistral::MistralForCausalLM::load(vb, &config)?))
}

fn load_mixtral(config_json: &str, vb: VarBuilder) -> Result<Box<dyn CausalLm>> {
    let config: mixtral::MixtralConfig = parse_config(config_json)?;
    Ok(Box::new(mixtral::load_causal_lm(vb, &config)?))
}

fn load_megatron_bert_causal_lm(config_json: &str, vb: VarBuilder) -> Result<Box<dyn CausalLm>> {
    let config: megatron_bert::MegatronBertConfig = parse_config(config_json)?;
    Ok(Box::new(megatron_bert::MegatronBertForCausalLM::load(
        vb, &config,
    )?))
}

fn load_gpt2_lm(config_json: &str, vb: VarBuilder) -> Result<Box<dyn CausalLm>> {
    let config: gpt2::Gpt2Config = parse_config(config_json)?;
    Ok(Box::new(gpt2::Gpt2LmHeadModel::load(vb, &config)?))
}

fn load_gpt2(
    config_json: &str,
    vb: VarBuilder,
    task: EncoderTask,
) -> Result<Box<dyn EncoderModel>> {
    let config: gpt2::Gpt2Config = parse_config(config_json)?;
    Ok(match task {
        SequenceClassification => Box::new(gpt2::Gpt2SequenceHead::sequence_classification(
            vb,
            &config,
            labels(config_json)?,
        )?),
        MultipleChoice => Box::new(gpt2::Gpt2SequenceHead::multiple_choice(vb, &config)?),
        task => Box::new(gpt2::load(vb, &config, task, labels(config_json)?)?),
    })
}

fn load_decoder_classifier(
    config_json: &str,
    vb: VarBuilder,
    _: EncoderTask,
) -> Result<Box<dyn EncoderModel>> {
    Ok(Box::new(models::load_decoder_classifier(config_json, vb)?))
}

fn labels(config_json: &str) -> Result<Labels> {
    Labels::from_config(&parse_config::<Value>(config_json)?)
}

fn load_mobilebert(
    config_json: &str,
    vb: VarBuilder,
    task: EncoderTask,
) -> Result<Box<dyn EncoderModel>> {
    let config: mobilebert::MobileBertConfig = parse_config(config_json)?;
    Ok(Box::new(mobilebert::load(
        vb,
        &config,
        task,
        labels(config_json)?,
    )?))
}

fn load_megatron_bert(
    config_json: &str,
    vb: VarBuilder,
    task: EncoderTask,
) -> Result<Box<dyn EncoderModel>> {
    let config: megatron_bert::MegatronBertConfig = parse_config(config_json)?;
    Ok(Box::new(megatron_bert::load(
        vb,
        &config,
        task,
        labels(config_json)?,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

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
        let input = crate::encoder::EncoderInput::new(vec![1, 2, 3], vec![0, 0, 1]);
        match &model.forward(&[input]).expect("runs")[..] {
            [crate::encoder::EncoderOutput::Hidden {
                last,
                pooled: Some(pooled),
            }] => {
                assert_eq!((last.len(), last[0].len()), (3, 8));
                assert_eq!(pooled.len(), 8);
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
