//! Request fields and response pieces that completions and chat share, and their validation
//! into the scheduler's terms.

use std::collections::BTreeMap;

use candlewick_engine::grammar::Grammar;
use candlewick_engine::sampling::SamplingParams;
use schemars::JsonSchema;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most choices one request may ask for.
pub const MAX_N: usize = 16;
/// Most stop strings one request may give, as in OpenAI's API.
pub const MAX_STOP_STRINGS: usize = 4;
/// Highest temperature accepted, as in OpenAI's API.
pub const MAX_TEMPERATURE: f32 = 2.0;
/// What a `-inf` log-probability (a token masked out) is reported as: JSON has no infinity,
/// and vLLM uses the same stand-in.
pub const MASKED_LOGPROB: f32 = -9999.0;

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum StopSpec {
    /// `"stop": "\n"`
    One(String),
    /// `"stop": ["\n", "END"]`
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the usage of the whole request (and `"usage": null` in the
    /// others).
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// Random padding OpenAI adds against side channels; accepted and not needed here, where
    /// chunks are not padded.
    #[serde(default)]
    pub include_obfuscation: Option<bool>,
}

/// Token counts of a request. `prompt_tokens` counts each prompt once, however many choices it
/// has; `completion_tokens` adds up the tokens of every choice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, JsonSchema)]
pub struct Usage {
    /// Tokens of the prompts.
    pub prompt_tokens: usize,
    /// Tokens generated, over all choices.
    pub completion_tokens: usize,
    /// The sum of both.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage for these counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// The sampling and stopping fields completions and chat share, as the request gave them.
/// Integers are taken wide so that out-of-range values get a message naming the field.
#[derive(Debug, Clone, Default)]
pub struct SamplingFields {
    /// `max_tokens` (or chat's `max_completion_tokens`).
    pub max_tokens: Option<i64>,
    /// Which field `max_tokens` came from, for messages.
    pub max_tokens_param: &'static str,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    pub stop: Option<StopSpec>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Token id (as a string, as JSON object keys are) to bias.
    pub logit_bias: Option<BTreeMap<String, f32>>,
    pub seed: Option<i64>,
    /// Extension: keep only the k most probable tokens; 0 or -1 keeps all (as in vLLM).
    pub top_k: Option<i64>,
    /// Extension: keep tokens at least this fraction as probable as the most probable one.
    pub min_p: Option<f32>,
    /// Extension: penalise tokens already in the prompt or the output (1 = off).
    pub repetition_penalty: Option<f32>,
    /// Extension: keep generating past end-of-sequence tokens.
    pub ignore_eos: Option<bool>,
    /// Alternatives to report per token, already checked against the route's own bound.
    pub logprobs: Option<usize>,
}

/// What the shared fields mean for the scheduler, once checked.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// Choices per prompt.
    pub n: usize,
    /// Most tokens per choice; `None` for as many as the context allows.
    pub max_tokens: Option<usize>,
    /// Sampling of choice 0; choice `i` uses `seed + i` when a seed is given.
    pub sampling: SamplingParams,
    /// Texts that end a choice.
    pub stop_strings: Vec<String>,
    /// Whether end-of-sequence tokens are ignored.
    pub ignore_eos: bool,
}

impl SamplingFields {
    /// Checks the fields OpenAI bounds; the sampler checks the rest when the request is
    /// submitted, and its messages name the field too.
    pub fn validate(self) -> Result<GenerationParams, ApiError> {
        let max_tokens = match self.max_tokens {
            None => None,
            Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            Some(n) => {
                return Err(ApiError::invalid(
                    self.max_tokens_param,
                    format!("{} must be at least 1, got {n}", self.max_tokens_param),
                ))
            }
        };
        let n = match self.n.unwrap_or(1) {
            n if (1..=MAX_N as i64).contains(&n) => n as usize,
            n => {
                return Err(ApiError::invalid(
                    "n",
                    format!("n must be between 1 and {MAX_N}, got {n}"),
                ))
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and {MAX_TEMPERATURE}, got {temperature}"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1 or 0 (all tokens) or a positive number, got {k}"),
                ))
            }
        };
        let stop_strings = match self.stop {
            None => Vec::new(),
            Some(StopSpec::One(stop)) => vec![stop],
            Some(StopSpec::Many(stops)) => stops,
        };
        if stop_strings.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "stop may have at most {MAX_STOP_STRINGS} entries, got {}",
                    stop_strings.len()
                ),
            ));
        }
        let mut logit_bias = BTreeMap::new();
        for (token, bias) in self.logit_bias.unwrap_or_default() {
            let id = token.trim().parse::<u32>().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias keys must be token ids, got {token:?}"),
                )
            })?;
            logit_bias.insert(id, bias);
        }
        let defaults = SamplingParams::default();
        Ok(GenerationParams {
            n,
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p: self.top_p.unwrap_or(defaults.top_p),
                min_p: self.min_p.unwrap_or(defaults.min_p),
                repetition_penalty: self
                    .repetition_penalty
                    .unwrap_or(defaults.repetition_penalty),
                presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
                frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
                logit_bias,
                // Negative seeds (OpenAI allows any 64-bit integer) keep their bits.
                seed: self.seed.map(|seed| seed as u64),
                logprobs: self.logprobs,
            },
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

/// Refuses a field that this server does not implement, when it is present and not null.
pub fn refuse_if_present(
    param: &'static str,
    value: &Option<serde_json::Value>,
    why: &str,
) -> Result<(), ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(_) => Err(ApiError::invalid(
            param,
            format!("{param} is not supported: {why}"),
        )),
    }
}

/// Checks `stream_options` against `stream` and says whether usage is to be streamed.
pub fn include_usage(stream: bool, options: &Option<StreamOptions>) -> Result<bool, ApiError> {
    match options {
        None => Ok(false),
        Some(_) if !stream => Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        )),
        Some(options) => Ok(options.include_usage.unwrap_or(false)),
    }
}

/// A log-probability as JSON can carry it.
pub fn finite_logprob(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        MASKED_LOGPROB
    }
}

/// The legacy completions' `{token: logprob}` object, most probable first; a token text that
/// two ids share appears once, with the higher log-probability.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobs(pub Vec<(String, f32)>);

impl TopLogprobs {
    /// Adds `token` unless its text is already present.
    pub fn push(&mut self, token: String, logprob: f32) {
        if !self.0.iter().any(|(seen, _)| *seen == token) {
            self.0.push((token, finite_logprob(logprob)));
        }
    }
}

impl JsonSchema for TopLogprobs {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TopLogprobs".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "additionalProperties": {"type": "number"}
        })
    }
}

impl Serialize for TopLogprobs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> SamplingFields {
        SamplingFields {
            max_tokens_param: "max_tokens",
            ..SamplingFields::default()
        }
    }

    fn refused_param(fields: SamplingFields) -> &'static str {
        fields.validate().unwrap_err().param().unwrap()
    }

    #[test]
    fn defaults_leave_the_models_distribution_untouched() {
        let params = fields().validate().unwrap();
        assert_eq!(params.n, 1);
        assert_eq!(params.max_tokens, None);
        assert_eq!(params.sampling, SamplingParams::default());
        assert!(params.stop_strings.is_empty());
    }

    #[test]
    fn out_of_range_fields_are_refused_naming_the_field() {
        let cases = [
            (
                SamplingFields {
                    temperature: Some(2.5),
                    ..fields()
                },
                "temperature",
            ),
            (
                SamplingFields {
                    temperature: Some(-0.1),
                    ..fields()
                },
                "temperature",
            ),
            (
                SamplingFields {
                    max_tokens: Some(0),
                    ..fields()
                },
                "max_tokens",
            ),
            (
                SamplingFields {
                    n: Some(17),
                    ..fields()
                },
                "n",
            ),
            (
                SamplingFields {
                    n: Some(0),
                    ..fields()
                },
                "n",
            ),
            (
                SamplingFields {
                    top_k: Some(-2),
                    ..fields()
                },
                "top_k",
            ),
            (
                SamplingFields {
                    stop: Some(StopSpec::Many(vec!["a".into(); 5])),
                    ..fields()
                },
                "stop",
            ),
            (
                SamplingFields {
                    logit_bias: Some([("abc".to_string(), 1.0)].into()),
                    ..fields()
                },
                "logit_bias",
            ),
        ];
        for (fields, param) in cases {
            assert_eq!(refused_param(fields), param);
        }
    }

    #[test]
    fn bounds_themselves_are_accepted() {
        let params = SamplingFields {
            temperature: Some(2.0),
            n: Some(16),
            max_tokens: Some(1),
            top_k: Some(-1),
            stop: Some(StopSpec::Many(vec![
                "a".into(),
                "b".into(),
                "".into(),
                "d".into(),
            ])),
            logit_bias: Some([("7".to_string(), -100.0)].into()),
            seed: Some(-1),
            ..fields()
        }
        .validate()
        .unwrap();
        assert_eq!(params.n, 16);
        assert_eq!(params.sampling.top_k, None);
        assert_eq!(params.sampling.logit_bias.get(&7), Some(&-100.0));
        assert_eq!(params.sampling.seed, Some(u64::MAX));
        assert_eq!(params.stop_strings, ["a", "b", "d"]);
    }

    #[test]
    fn stream_options_without_stream_are_refused() {
        let options = Some(StreamOptions {
            include_usage: Some(true),
            ..StreamOptions::default()
        });
        assert!(include_usage(false, &options).is_err());
        assert!(include_usage(true, &options).unwrap());
        assert!(!include_usage(true, &None).unwrap());
    }

    #[test]
    fn top_logprobs_serialize_as_an_object_in_rank_order_without_infinities() {
        let mut top = TopLogprobs::default();
        top.push("b".into(), -0.5);
        top.push("a".into(), f32::NEG_INFINITY);
        top.push("b".into(), -3.0);
        assert_eq!(
            serde_json::to_string(&top).unwrap(),
            r#"{"b":-0.5,"a":-9999.0}"#
        );
    }
}

/// `response_format`: OpenAI's structured outputs.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text: no constraint.
    Text,
    /// Any JSON object.
    JsonObject,
    /// A JSON document valid against `json_schema.schema`.
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: String,
    pub description: Option<String>,
    /// Absent: any JSON document.
    pub schema: Option<Value>,
    /// Outputs always follow the schema here, strict or not.
    pub strict: Option<bool>,
}

/// The grammar a request's output must match, and the field that gave it (for errors).
#[derive(Debug, Clone, PartialEq)]
pub struct StructuredOutput {
    pub grammar: Grammar,
    pub param: &'static str,
}

/// The structured-output fields of a request: OpenAI's `response_format` and the extensions
/// named as vLLM names them.
#[derive(Debug, Clone, Default)]
pub struct StructuredFields {
    pub response_format: Option<ResponseFormat>,
    /// A JSON schema, as an object or as JSON text.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    /// A Lark grammar (llguidance's dialect).
    pub guided_grammar: Option<String>,
}

impl StructuredFields {
    /// The one grammar the fields ask for, if any; more than one is refused.
    pub fn validate(self) -> Result<Option<StructuredOutput>, ApiError> {
        let mut given: Vec<StructuredOutput> = Vec::new();
        let mut add = |param: &'static str, grammar: Grammar| {
            given.push(StructuredOutput { grammar, param });
        };
        match self.response_format {
            None | Some(ResponseFormat::Text) => {}
            Some(ResponseFormat::JsonObject) => add("response_format", Grammar::JsonObject),
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                if json_schema.name.is_empty()
                    || !json_schema
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    || json_schema.name.len() > 64
                {
                    return Err(ApiError::invalid(
                        "response_format",
                        format!(
                            "json_schema.name must be 1 to 64 letters, digits, '_' or '-', got {:?}",
                            json_schema.name
                        ),
                    ));
                }
                let schema = json_schema
                    .schema
                    .unwrap_or_else(|| Value::Object(Map::new()));
                add("response_format", Grammar::JsonSchema(schema));
            }
        }
        if let Some(schema) = self.guided_json {
            let schema = match schema {
                Value::String(text) => serde_json::from_str(&text).map_err(|e| {
                    ApiError::invalid("guided_json", format!("guided_json is not JSON: {e}"))
                })?,
                schema => schema,
            };
            add("guided_json", Grammar::JsonSchema(schema));
        }
        if let Some(regex) = self.guided_regex {
            add("guided_regex", Grammar::Regex(regex));
        }
        if let Some(choices) = self.guided_choice {
            if choices.is_empty() || choices.iter().any(String::is_empty) {
                return Err(ApiError::invalid(
                    "guided_choice",
                    "guided_choice must be a non-empty list of non-empty strings",
                ));
            }
            add("guided_choice", Grammar::Choice(choices));
        }
        if let Some(grammar) = self.guided_grammar {
            add("guided_grammar", Grammar::Lark(grammar));
        }
        match given.len() {
            0 | 1 => Ok(given.pop()),
            _ => Err(ApiError::invalid(
                given[1].param,
                format!(
                    "{} and {} both constrain the output; give one",
                    given[0].param, given[1].param
                ),
            )),
        }
    }
}
