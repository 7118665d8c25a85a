//! Sequence classification: models that map a token sequence to one score per label.

use serde_json::Value;

use crate::error::{EngineError, Result};

/// How raw logits become scores, as transformers' text-classification pipeline names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFunction {
    /// Probabilities over mutually exclusive labels.
    Softmax,
    /// An independent probability per label.
    Sigmoid,
    /// The raw logits.
    None,
}

impl ScoreFunction {
    /// Applies the function to one row of logits.
    pub fn apply(self, logits: &[f32]) -> Vec<f32> {
        match self {
            Self::Softmax => {
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
                let total: f32 = exp.iter().sum();
                exp.into_iter().map(|e| e / total).collect()
            }
            Self::Sigmoid => logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
            Self::None => logits.to_vec(),
        }
    }

    /// Parses `softmax`, `sigmoid` or `none`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "softmax" => Ok(Self::Softmax),
            "sigmoid" => Ok(Self::Sigmoid),
            "none" => Ok(Self::None),
            other => Err(EngineError::InvalidRequest(format!(
                "function_to_apply must be softmax, sigmoid or none, got {other:?}"
            ))),
        }
    }
}

/// The labels of a classifier and its default score function, from config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    /// Label names by index (`id2label`; `LABEL_i` when absent).
    pub names: Vec<String>,
    /// What the pipeline applies by default: sigmoid for multi-label problems and single
    /// outputs, none for regression, softmax otherwise.
    pub default_function: ScoreFunction,
}

impl Labels {
    /// Reads `id2label` (or `num_labels`) and `problem_type`.
    pub fn from_config(config: &Value) -> Result<Self> {
        let mut names: Vec<(usize, String)> =
            match config.get("id2label").and_then(Value::as_object) {
                Some(map) => map
                    .iter()
                    .map(|(id, label)| {
                        let id = id.parse::<usize>().map_err(|_| {
                            EngineError::UnsupportedConfig(format!(
                                "id2label key {id:?} is not an index"
                            ))
                        })?;
                        Ok((id, label.as_str().unwrap_or_default().to_string()))
                    })
                    .collect::<Result<_>>()?,
                None => {
                    let count = config
                        .get("num_labels")
                        .and_then(Value::as_u64)
                        .unwrap_or(2) as usize;
                    (0..count).map(|i| (i, format!("LABEL_{i}"))).collect()
                }
            };
        names.sort();
        if names.iter().enumerate().any(|(i, (id, _))| i != *id) || names.is_empty() {
            return Err(EngineError::UnsupportedConfig(
                "id2label must name the labels 0..num_labels".into(),
            ));
        }
        let default_function = match config.get("problem_type").and_then(Value::as_str) {
            Some("multi_label_classification") => ScoreFunction::Sigmoid,
            Some("regression") => ScoreFunction::None,
            _ if names.len() == 1 => ScoreFunction::Sigmoid,
            _ => ScoreFunction::Softmax,
        };
        Ok(Self {
            names: names.into_iter().map(|(_, name)| name).collect(),
            default_function,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_default_functions_follow_the_pipeline() {
        let single: Value =
            serde_json::from_str(r#"{"id2label": {"1": "POS", "0": "NEG"}}"#).unwrap();
        let labels = Labels::from_config(&single).unwrap();
        assert_eq!(labels.names, vec!["NEG", "POS"]);
        assert_eq!(labels.default_function, ScoreFunction::Softmax);
        let multi: Value = serde_json::from_str(
            r#"{"id2label": {"0": "a", "1": "b"}, "problem_type": "multi_label_classification"}"#,
        )
        .unwrap();
        assert_eq!(
            Labels::from_config(&multi).unwrap().default_function,
            ScoreFunction::Sigmoid
        );
        let gap: Value = serde_json::from_str(r#"{"id2label": {"0": "a", "2": "c"}}"#).unwrap();
        assert!(Labels::from_config(&gap).is_err());
    }

    #[test]
    fn score_functions() {
        let softmax = ScoreFunction::Softmax.apply(&[0.0, 0.0]);
        assert_eq!(softmax, vec![0.5, 0.5]);
        assert_eq!(ScoreFunction::Sigmoid.apply(&[0.0]), vec![0.5]);
        assert_eq!(ScoreFunction::None.apply(&[3.0]), vec![3.0]);
        assert!(ScoreFunction::parse("tanh").is_err());
    }
}
