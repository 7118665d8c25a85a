//! The pre- and post-processing of transformers' pipelines for the encoder tasks, as pure
//! functions.
//!
//! Each task module follows transformers 4.37.2's pipeline of the same name, its defaults, output
//! shapes and quirks included, so that a client of the Hugging Face Inference API gets what
//! `pipeline(task)(inputs, **parameters)` returns:
//! - `Parameters::parse` reads the request's `parameters` (all optional, unknown ones refused);
//! - `prepare` checks the request's `inputs`, tokenizes them and returns the sequences to run with
//!   a plan;
//! - `finish` turns the encoder's outputs for those sequences, in order, into the answer.
//!
//! Requests the pipeline would crash on (a sequence longer than the model takes, a stride the
//! tokenizer cannot honour) are refused with a 400 naming the field at fault.

pub mod fill_mask;
pub mod question_answering;
pub mod text_classification;
pub mod token_classification;
mod tokenizer;

pub use tokenizer::PipelineTokenizer;

use candlewick_engine::encoder::EncoderInput;
use candlewick_engine::EncoderOutput;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tokenizers::Encoding;

use crate::error::ApiError;

/// The sequences a request runs through the encoder, and what [`finish`](text_classification::finish)
/// needs to answer it.
#[derive(Debug, Clone)]
pub struct Prepared<P> {
    /// The token sequences, in the order their outputs must come back.
    pub inputs: Vec<EncoderInput>,
    /// What the task's `finish` needs besides the outputs.
    pub plan: P,
}

/// Reads a task's parameters; absent or null means the defaults.
fn parse_parameters<T: DeserializeOwned + Default>(
    parameters: Option<&Value>,
) -> Result<T, ApiError> {
    match parameters {
        None | Some(Value::Null) => Ok(T::default()),
        Some(value) => {
            T::deserialize(value).map_err(|e| ApiError::invalid("parameters", e.to_string()))
        }
    }
}

/// Deserializes a field that may be absent (`None`), null (`Some(None)`) or set, for the
/// parameters where the pipeline tells null from absent.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A text of `inputs`: a non-empty string. `what` says where it sits, for the message.
fn text_of(value: &Value, what: &str) -> Result<String, ApiError> {
    match value {
        Value::String(text) if text.is_empty() => Err(ApiError::invalid(
            "inputs",
            format!("{what} is empty; give a non-empty text"),
        )),
        Value::String(text) => Ok(text.clone()),
        other => Err(ApiError::invalid(
            "inputs",
            format!("{what} must be a string, got {}", kind_of(other)),
        )),
    }
}

/// A string or a non-empty list of strings, as token classification and fill-mask take them.
/// Returns the texts and whether they came as a list.
fn texts_of(inputs: &Value) -> Result<(Vec<String>, bool), ApiError> {
    match inputs {
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid(
            "inputs",
            "inputs is an empty list; give at least one text",
        )),
        Value::Array(items) => {
            let texts = items
                .iter()
                .enumerate()
                .map(|(i, item)| text_of(item, &format!("inputs[{i}]")))
                .collect::<Result<_, _>>()?;
            Ok((texts, true))
        }
        other => Ok((vec![text_of(other, "inputs")?], false)),
    }
}

/// The JSON type of `value`, for messages.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The 400 for a sequence longer than the model takes.
fn too_long(what: &str, tokens: usize, max: usize, hint: &str) -> ApiError {
    ApiError::invalid(
        "inputs",
        format!("{what} is {tokens} tokens long, more than the {max} this model takes{hint}"),
    )
}

/// The model input of one encoding.
fn encoder_input(encoding: &Encoding) -> EncoderInput {
    EncoderInput::new(
        encoding.get_ids().to_vec(),
        encoding.get_type_ids().to_vec(),
    )
}

/// Checks that the encoder answered once per sequence.
fn check_count(outputs: &[EncoderOutput], expected: usize) -> Result<(), ApiError> {
    if outputs.len() == expected {
        Ok(())
    } else {
        Err(ApiError::Internal(format!(
            "the encoder returned {} outputs for {expected} sequences",
            outputs.len()
        )))
    }
}

/// The 500 for an output of the wrong kind or shape.
fn wrong_output(task: &str, expected: &str) -> ApiError {
    ApiError::Internal(format!(
        "the model's outputs do not fit {task}: expected {expected}"
    ))
}

/// Softmax of one row in f32, as numpy computes it on float32 logits: shifted by the maximum,
/// exponentiated, divided by the sum.
fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

/// The index of the first maximum, as numpy's argmax (a NaN counts as the maximum).
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &value) in values.iter().enumerate() {
        if value.is_nan() {
            return i;
        }
        if value > values[best] {
            best = i;
        }
    }
    best
}

/// The mean in f32, skipping NaNs, as numpy's nanmean over float32 (NaN when nothing is left).
fn nanmean(values: impl IntoIterator<Item = f32>) -> f32 {
    let (sum, count) = values
        .into_iter()
        .filter(|v| !v.is_nan())
        .fold((0f32, 0usize), |(sum, count), v| (sum + v, count + 1));
    sum / count as f32
}

/// `text[start..end]` in characters, clamped as Python slices are.
fn char_slice(text: &str, start: usize, end: usize) -> &str {
    let byte = |chars: usize| {
        text.char_indices()
            .nth(chars)
            .map_or(text.len(), |(byte, _)| byte)
    };
    let (start, end) = (byte(start), byte(end));
    if start >= end {
        ""
    } else {
        &text[start..end]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candlewick_engine::encoder::{EncoderContract, EncoderTask, InputLimits};

    use super::*;

    /// The contract of a test model doing `task` that takes whatever the tests' tokenizers
    /// give.
    pub(crate) fn contract(task: EncoderTask) -> EncoderContract {
        EncoderContract {
            limits: InputLimits {
                vocab_size: 1 << 16,
                type_vocab_size: 2,
                max_positions: 512,
                first_position: 0,
                causal: false,
                entities: None,
            },
            task,
            has_pooler: false,
        }
    }

    #[test]
    fn char_slices_count_characters_and_clamp_like_python() {
        let text = "naïve 東京";
        assert_eq!(char_slice(text, 0, 5), "naïve");
        assert_eq!(char_slice(text, 6, 8), "東京");
        assert_eq!(char_slice(text, 6, 100), "東京");
        assert_eq!(char_slice(text, 5, 2), "");
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_nan_wins() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[1.0, f32::NAN, 3.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn softmax_and_nanmean_work_in_f32() {
        let probabilities = softmax(&[1.0, 2.0, 3.0]);
        let expected = [0.090_030_57f32, 0.244_728_48, 0.665_240_94];
        for (p, e) in probabilities.iter().zip(expected) {
            assert!((p - e).abs() < 1e-7, "{p} vs {e}");
        }
        assert_eq!(nanmean([1.0, f32::NAN, 2.0]), 1.5);
        assert!(nanmean([f32::NAN]).is_nan());
    }

    #[test]
    fn texts_must_be_non_empty_strings() {
        let (texts, listed) = texts_of(&serde_json::json!(["a", "b"])).unwrap();
        assert_eq!((texts.len(), listed), (2, true));
        let (texts, listed) = texts_of(&serde_json::json!("a")).unwrap();
        assert_eq!((texts, listed), (vec!["a".to_string()], false));
        for bad in [
            serde_json::json!([]),
            serde_json::json!(""),
            serde_json::json!(["a", ""]),
            serde_json::json!(3),
            serde_json::json!(["a", ["b"]]),
        ] {
            let error = texts_of(&bad).unwrap_err();
            assert_eq!(error.param(), Some("inputs"), "{bad}");
        }
    }
}
