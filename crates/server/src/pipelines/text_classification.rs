//! text-classification: one score per label for a text or a text pair, as transformers'
//! `TextClassificationPipeline` answers.
//!
//! The answer's shape depends on how the call was made, as in the pipeline:
//! - without `top_k` (the legacy mode) each input gets its best label as one `{label, score}`
//!   (or, with `return_all_scores: true`, every label in the model's order), and a single string
//!   is answered with a one-element list while a single `{text, text_pair}` is answered bare;
//! - with `top_k` (a number, or null for all) each input gets its labels sorted by score, at most
//!   `top_k`, and a single input is answered with that list.

use candlewick_engine::encoder::labels::{Labels, ScoreFunction};
use candlewick_engine::EncoderOutput;
use candlewick_scheduler::EncoderInfo;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::{TruncationParams, TruncationStrategy};

use super::{
    check_count, encoder_input, kind_of, parse_parameters, present, text_of, too_long,
    wrong_output, PipelineTokenizer, Prepared,
};
use crate::error::ApiError;

/// The pipeline's call parameters.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "TextClassificationParameters")]
pub struct Parameters {
    /// How many labels to return per input, best first; null for all of them. Absent selects the
    /// legacy answer (the best label alone).
    #[serde(default, deserialize_with = "present")]
    pub top_k: Option<Option<i64>>,
    /// `softmax`, `sigmoid` or `none` (any case); the default follows the model's config as the
    /// pipeline does.
    pub function_to_apply: Option<String>,
    /// Deprecated in transformers: with `top_k` absent, true returns every label (in the
    /// model's order) and false the best one.
    pub return_all_scores: Option<bool>,
    /// A tokenizer argument: true or `longest_first`, `only_first`, `only_second` cut inputs to
    /// the model's length; false or `do_not_truncate` (the default) refuse longer inputs.
    pub truncation: Option<Value>,
}

impl Parameters {
    /// Reads the request's `parameters`; absent or null means the defaults.
    pub fn parse(parameters: Option<&Value>) -> Result<Self, ApiError> {
        parse_parameters(parameters)
    }
}

/// One text, or a pair classified together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextInput {
    /// The text.
    pub text: String,
    /// The second text of a pair.
    pub text_pair: Option<String>,
}

/// How the inputs came, which decides the answer's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A single string.
    Text,
    /// A single `{text, text_pair}` object.
    Pair,
    /// A list of strings or objects.
    List,
}

/// What [`finish`] needs: the labels, how to score, and the answer's shape.
#[derive(Debug, Clone)]
pub struct Plan {
    labels: Labels,
    function: ScoreFunction,
    /// None: every label.
    top_k: Option<usize>,
    legacy: bool,
    shape: Shape,
    count: usize,
}

/// A label and its score.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct LabelScore {
    /// The label's name (`id2label`).
    pub label: String,
    /// Its score after `function_to_apply`.
    pub score: f64,
}

/// The pipeline's answer.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
#[schemars(rename = "TextClassificationOutput")]
pub enum Output {
    /// The best label of one input (legacy mode).
    Best(LabelScore),
    /// The labels of one input.
    Labels(Vec<LabelScore>),
    /// One answer per input.
    List(Vec<Output>),
}

/// Parses `inputs`: a string, a `{text, text_pair}` object, or a non-empty list of either.
/// Returns the inputs and whether they came as a list.
pub fn parse_inputs(inputs: &Value) -> Result<(Vec<TextInput>, bool), ApiError> {
    match inputs {
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid(
            "inputs",
            "inputs is an empty list; give at least one text",
        )),
        Value::Array(items) => {
            let parsed = items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_one(item, &format!("inputs[{i}]")))
                .collect::<Result<_, _>>()?;
            Ok((parsed, true))
        }
        other => Ok((vec![parse_one(other, "inputs")?], false)),
    }
}

fn parse_one(value: &Value, what: &str) -> Result<TextInput, ApiError> {
    match value {
        Value::Object(fields) => {
            if let Some(key) = fields
                .keys()
                .find(|key| key.as_str() != "text" && key.as_str() != "text_pair")
            {
                return Err(ApiError::invalid(
                    "inputs",
                    format!("{what} has an unknown field {key:?}; a pair is {{\"text\": ..., \"text_pair\": ...}}"),
                ));
            }
            let text = match fields.get("text") {
                Some(text) => text_of(text, &format!("{what}.text"))?,
                None => {
                    return Err(ApiError::invalid(
                        "inputs",
                        format!("{what} has no \"text\"; a pair is {{\"text\": ..., \"text_pair\": ...}}"),
                    ))
                }
            };
            let text_pair = match fields.get("text_pair") {
                None | Some(Value::Null) => None,
                Some(pair) => Some(text_of(pair, &format!("{what}.text_pair"))?),
            };
            Ok(TextInput { text, text_pair })
        }
        Value::Array(_) => Err(ApiError::invalid(
            "inputs",
            format!(
                "{what} is a list; to classify a text pair send {{\"text\": \"My text\", \"text_pair\": \"My pair\"}}"
            ),
        )),
        Value::String(_) => Ok(TextInput {
            text: text_of(value, what)?,
            text_pair: None,
        }),
        other => Err(ApiError::invalid(
            "inputs",
            format!("{what} must be a string or a {{\"text\", \"text_pair\"}} object, got {}", kind_of(other)),
        )),
    }
}

/// The score function the pipeline applies when the request names none: sigmoid for
/// multi-label problems and single outputs, softmax otherwise. (transformers reaches softmax
/// for a regression head with several outputs too; only the explicit `none` skips it.)
fn default_function(labels: &Labels) -> ScoreFunction {
    match labels.default_function {
        ScoreFunction::None if labels.names.len() == 1 => ScoreFunction::Sigmoid,
        ScoreFunction::None => ScoreFunction::Softmax,
        function => function,
    }
}

/// Reads the `truncation` tokenizer argument.
pub(crate) fn truncation_strategy(
    value: Option<&Value>,
) -> Result<Option<TruncationStrategy>, ApiError> {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(TruncationStrategy::LongestFirst)),
        Some(Value::String(name)) => match name.as_str() {
            "longest_first" => Ok(Some(TruncationStrategy::LongestFirst)),
            "only_first" => Ok(Some(TruncationStrategy::OnlyFirst)),
            "only_second" => Ok(Some(TruncationStrategy::OnlySecond)),
            "do_not_truncate" => Ok(None),
            other => Err(ApiError::invalid(
                "parameters",
                format!("truncation must be true, false, longest_first, only_first, only_second or do_not_truncate, got {other:?}"),
            )),
        },
        Some(other) => Err(ApiError::invalid(
            "parameters",
            format!("truncation must be a boolean or a strategy name, got {}", kind_of(other)),
        )),
    }
}

/// Checks the inputs and parameters and tokenizes the inputs, one sequence each.
pub fn prepare(
    tokenizer: &PipelineTokenizer,
    info: &EncoderInfo,
    inputs: &Value,
    parameters: &Parameters,
) -> Result<Prepared<Plan>, ApiError> {
    let labels = info
        .labels
        .clone()
        .ok_or_else(|| ApiError::Internal("the classifier has no labels".into()))?;
    let function = match &parameters.function_to_apply {
        Some(name) => ScoreFunction::parse(&name.to_lowercase())
            .map_err(|e| ApiError::invalid("parameters", e.to_string()))?,
        None => default_function(&labels),
    };
    let (legacy, top_k) = match parameters.top_k {
        Some(Some(k)) if k < 0 => {
            return Err(ApiError::invalid(
                "parameters",
                format!("top_k must be at least 0, got {k}"),
            ))
        }
        Some(k) => (false, k.map(|k| usize::try_from(k).unwrap_or(usize::MAX))),
        None => match parameters.return_all_scores {
            Some(true) => (true, None),
            _ => (true, Some(1)),
        },
    };
    let truncation = truncation_strategy(parameters.truncation.as_ref())?;
    let (texts, listed) = parse_inputs(inputs)?;
    let shape = if listed {
        Shape::List
    } else if inputs.is_object() {
        Shape::Pair
    } else {
        Shape::Text
    };

    let max = info.max_sequence_tokens;
    let mut sequences = Vec::with_capacity(texts.len());
    for (i, input) in texts.iter().enumerate() {
        let pair = input.text_pair.is_some();
        let params = match truncation {
            Some(strategy) => {
                let max_length = tokenizer.max_length(max);
                if max_length <= tokenizer.added_tokens(pair) {
                    return Err(ApiError::Internal(format!(
                        "a model limit of {max_length} tokens leaves no room for text"
                    )));
                }
                Some(TruncationParams {
                    max_length,
                    strategy,
                    ..TruncationParams::default()
                })
            }
            None => None,
        };
        let encoding = tokenizer.encode(&input.text, input.text_pair.as_deref(), params)?;
        let what = if listed {
            format!("inputs[{i}]")
        } else {
            "inputs".to_string()
        };
        if encoding.get_ids().is_empty() {
            return Err(ApiError::invalid("inputs", format!("{what} has no tokens")));
        }
        if encoding.len() > max {
            return Err(too_long(
                &what,
                encoding.len(),
                max,
                "; pass \"truncation\": true to cut it",
            ));
        }
        sequences.push(encoder_input(&encoding));
    }
    Ok(Prepared {
        inputs: sequences,
        plan: Plan {
            labels,
            function,
            top_k,
            legacy,
            shape,
            count: texts.len(),
        },
    })
}

/// Scores each input's logits and shapes the answer as the pipeline does.
pub fn finish(plan: Plan, outputs: Vec<EncoderOutput>) -> Result<Output, ApiError> {
    check_count(&outputs, plan.count)?;
    let mut answers = Vec::with_capacity(outputs.len());
    for output in outputs {
        let EncoderOutput::Sequence(logits) = output else {
            return Err(wrong_output(
                "text-classification",
                "one row of logits per input",
            ));
        };
        if logits.len() != plan.labels.names.len() {
            return Err(wrong_output("text-classification", "one logit per label"));
        }
        answers.push(score(&plan, &logits));
    }
    Ok(match plan.shape {
        Shape::List => Output::List(answers),
        Shape::Pair => answers.pop().unwrap_or(Output::Labels(Vec::new())),
        // The pipeline wraps a lone string's legacy answer in a list.
        Shape::Text => {
            let answer = answers.pop().unwrap_or(Output::Labels(Vec::new()));
            if plan.legacy {
                Output::List(vec![answer])
            } else {
                answer
            }
        }
    })
}

/// One input's answer.
fn score(plan: &Plan, logits: &[f32]) -> Output {
    let scores = plan.function.apply(logits);
    let mut labelled: Vec<LabelScore> = plan
        .labels
        .names
        .iter()
        .zip(&scores)
        .map(|(label, &score)| LabelScore {
            label: label.clone(),
            score: f64::from(score),
        })
        .collect();
    if plan.legacy && plan.top_k == Some(1) {
        let best = super::argmax(&scores);
        return Output::Best(labelled.swap_remove(best));
    }
    if !plan.legacy {
        // Stable, best first: equal scores keep the labels' order, as Python's sort does.
        labelled.sort_by(|a, b| {
            b.score
                .partial_cmp(&a.score)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        if let Some(k) = plan.top_k {
            labelled.truncate(k);
        }
    }
    Output::Labels(labelled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::tokenizer::tests::bert_tokenizer;
    use candlewick_engine::encoder::EncoderTask;
    use serde_json::json;

    fn info(labels: &[&str], default_function: ScoreFunction) -> EncoderInfo {
        EncoderInfo {
            labels: Some(Labels {
                names: labels.iter().map(|s| s.to_string()).collect(),
                default_function,
            }),
            max_sequence_tokens: 8,
            hidden_size: 4,
            contract: crate::pipelines::tests::contract(EncoderTask::SequenceClassification),
        }
    }

    fn run(inputs: Value, parameters: Value, logits: &[&[f32]]) -> Result<Value, ApiError> {
        let tokenizer = bert_tokenizer(&["good", "bad", "movie"]);
        let info = info(&["neg", "neu", "pos"], ScoreFunction::Softmax);
        let parameters = Parameters::parse(Some(&parameters))?;
        let prepared = prepare(&tokenizer, &info, &inputs, &parameters)?;
        let outputs = logits
            .iter()
            .map(|row| EncoderOutput::Sequence(row.to_vec()))
            .collect();
        Ok(serde_json::to_value(finish(prepared.plan, outputs)?).unwrap())
    }

    fn labels_of(value: &Value) -> Vec<&str> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["label"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn answer_shapes_follow_the_pipeline_call() {
        let row: &[f32] = &[0.0, 2.0, 1.0];
        // Legacy: a string gets [best], a pair gets best, a list gets [best, ...].
        let answer = run(json!("good movie"), json!({}), &[row]).unwrap();
        assert_eq!(labels_of(&answer), ["neu"]);
        let answer = run(
            json!({"text": "good", "text_pair": "movie"}),
            json!(null),
            &[row],
        )
        .unwrap();
        assert_eq!(answer["label"], "neu");
        let answer = run(json!(["good", {"text": "bad"}]), json!({}), &[row, row]).unwrap();
        assert_eq!(answer.as_array().unwrap().len(), 2);
        assert_eq!(answer[1]["label"], "neu");
        // top_k given: sorted lists; null means all labels.
        let answer = run(json!("good"), json!({"top_k": 2}), &[row]).unwrap();
        assert_eq!(labels_of(&answer), ["neu", "pos"]);
        let answer = run(json!(["good"]), json!({"top_k": null}), &[row]).unwrap();
        assert_eq!(labels_of(&answer[0]), ["neu", "pos", "neg"]);
        let answer = run(json!("good"), json!({"top_k": 0}), &[row]).unwrap();
        assert_eq!(answer, json!([]));
        // return_all_scores keeps the model's label order.
        let answer = run(json!("good"), json!({"return_all_scores": true}), &[row]).unwrap();
        assert_eq!(labels_of(&answer[0]), ["neg", "neu", "pos"]);
    }

    #[test]
    fn scores_use_the_requested_function() {
        let row: &[f32] = &[0.5, -1.0, 2.0];
        let answer = run(
            json!("good"),
            json!({"top_k": null, "function_to_apply": "NONE"}),
            &[row],
        )
        .unwrap();
        assert_eq!(answer[0]["score"], json!(2.0));
        assert_eq!(answer[2]["score"], json!(-1.0));
        let answer = run(
            json!("good"),
            json!({"top_k": 1, "function_to_apply": "sigmoid"}),
            &[row],
        )
        .unwrap();
        let sigmoid = 1.0 / (1.0 + (-2.0f32).exp());
        assert_eq!(answer[0]["score"], json!(f64::from(sigmoid)));
        // Softmax by default, in f32 as numpy on float32 logits.
        let answer = run(json!("good"), json!({"top_k": 1}), &[row]).unwrap();
        let softmax = ScoreFunction::Softmax.apply(row);
        assert_eq!(answer[0]["score"], json!(f64::from(softmax[2])));
    }

    #[test]
    fn regression_heads_default_like_the_pipeline() {
        let single = info(&["score"], ScoreFunction::None);
        assert_eq!(
            default_function(single.labels.as_ref().unwrap()),
            ScoreFunction::Sigmoid
        );
        let several = info(&["a", "b"], ScoreFunction::None);
        assert_eq!(
            default_function(several.labels.as_ref().unwrap()),
            ScoreFunction::Softmax
        );
    }

    #[test]
    fn bad_inputs_and_parameters_are_refused() {
        let row: &[f32] = &[0.0, 0.0, 0.0];
        for (inputs, parameters, param) in [
            (json!(""), json!({}), "inputs"),
            (json!([]), json!({}), "inputs"),
            (json!(["good", ""]), json!({}), "inputs"),
            (json!([["good", "movie"]]), json!({}), "inputs"),
            (json!({"text": "good", "pair": "x"}), json!({}), "inputs"),
            (json!({"text_pair": "x"}), json!({}), "inputs"),
            (json!(3), json!({}), "inputs"),
            (json!("good"), json!({"top_k": -1}), "parameters"),
            (
                json!("good"),
                json!({"function_to_apply": "tanh"}),
                "parameters",
            ),
            (json!("good"), json!({"temperature": 1}), "parameters"),
            (
                json!("good"),
                json!({"truncation": "sideways"}),
                "parameters",
            ),
        ] {
            let error = run(inputs.clone(), parameters, &[row]).unwrap_err();
            assert_eq!(error.param(), Some(param), "{inputs}: {error}");
        }
    }

    #[test]
    fn long_inputs_are_refused_unless_truncated() {
        let row: &[f32] = &[0.0, 0.0, 0.0];
        let long = json!("good bad movie good bad movie good bad movie");
        let error = run(long.clone(), json!({}), &[row]).unwrap_err();
        assert!(error.to_string().contains("11 tokens"), "{error}");
        let tokenizer = bert_tokenizer(&["good", "bad", "movie"]);
        let info = info(&["neg", "neu", "pos"], ScoreFunction::Softmax);
        let parameters = Parameters::parse(Some(&json!({"truncation": true}))).unwrap();
        let prepared = prepare(&tokenizer, &info, &long, &parameters).unwrap();
        assert_eq!(prepared.inputs[0].ids, [2, 5, 6, 7, 5, 6, 7, 3]);
    }
}
