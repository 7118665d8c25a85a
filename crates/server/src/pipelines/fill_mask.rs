//! fill-mask: the likeliest tokens for each mask token of a text, as transformers'
//! `FillMaskPipeline` proposes them.
//!
//! A text with one mask gets a list of proposals; a text with several masks gets one list per
//! mask, each proposal filling its own mask only (the others stay in the sequence).

use candlewick_engine::{EncoderOutput, Requested};
use candlewick_scheduler::EncoderInfo;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::TruncationParams;

use super::text_classification::truncation_strategy;
use super::{
    check_count, encoder_input, kind_of, parse_parameters, texts_of, too_long, wrong_output,
    PipelineTokenizer, Prepared,
};
use crate::error::ApiError;

/// The pipeline's call parameters.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "FillMaskParameters")]
pub struct Parameters {
    /// How many proposals per mask (default 5); capped by the number of targets.
    pub top_k: Option<i64>,
    /// A token or tokens to choose among instead of the whole vocabulary; a target that is not
    /// in the vocabulary is replaced by the first token it tokenizes to.
    pub targets: Option<Value>,
    /// Arguments for the tokenizer: `{"truncation": true}` cuts long texts to the model's
    /// length.
    pub tokenizer_kwargs: Option<TokenizerKwargs>,
}

/// The tokenizer arguments fill-mask passes on.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizerKwargs {
    /// As text-classification's `truncation`.
    pub truncation: Option<Value>,
}

impl Parameters {
    /// Reads the request's `parameters`; absent or null means the defaults.
    pub fn parse(parameters: Option<&Value>) -> Result<Self, ApiError> {
        parse_parameters(parameters)
    }
}

/// One text: its tokens and where its masks are.
#[derive(Debug, Clone)]
struct Text {
    ids: Vec<u32>,
    masks: Vec<usize>,
}

/// What [`finish`] needs: the texts' tokens, the proposals to make and the tokenizer to write
/// them.
#[derive(Debug, Clone)]
pub struct Plan {
    tokenizer: PipelineTokenizer,
    texts: Vec<Text>,
    top_k: usize,
    /// Sorted, without duplicates; None for the whole vocabulary.
    target_ids: Option<Vec<u32>>,
    listed: bool,
}

/// One proposal for a mask.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Proposal {
    /// Its probability.
    pub score: f64,
    /// The token id.
    pub token: u32,
    /// The token decoded alone.
    pub token_str: String,
    /// The text with the mask filled (other masks kept, special tokens shown, when there are
    /// several).
    pub sequence: String,
}

/// The pipeline's answer.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
#[schemars(rename = "FillMaskOutput")]
pub enum Output {
    /// The proposals for a text's only mask.
    Proposals(Vec<Proposal>),
    /// The proposals for each mask of a text.
    PerMask(Vec<Vec<Proposal>>),
    /// One answer per text of a list.
    List(Vec<Output>),
}

/// The ids `targets` (a string or a list of strings) stand for: a target in the vocabulary is
/// its id, any other the first token it tokenizes to; targets with no token are dropped.
fn target_ids(tokenizer: &PipelineTokenizer, targets: &Value) -> Result<Vec<u32>, ApiError> {
    let targets: Vec<&str> = match targets {
        Value::String(target) => vec![target.as_str()],
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str().ok_or_else(|| {
                    ApiError::invalid(
                        "parameters",
                        format!("targets must be strings, got {}", kind_of(item)),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(ApiError::invalid(
                "parameters",
                format!(
                    "targets must be a string or a list of strings, got {}",
                    kind_of(other)
                ),
            ))
        }
    };
    let mut ids = Vec::with_capacity(targets.len());
    for target in targets {
        match tokenizer.token_to_id(target) {
            Some(id) => ids.push(id),
            None => {
                if let Some(&id) = tokenizer.ids_without_specials(target)?.first() {
                    ids.push(id);
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "parameters",
            "targets must name at least one token of the vocabulary",
        ));
    }
    Ok(ids)
}

/// Checks the inputs (a string or a list of strings, each with a mask token) and parameters,
/// and tokenizes the texts.
pub fn prepare(
    tokenizer: &PipelineTokenizer,
    info: &EncoderInfo,
    inputs: &Value,
    parameters: &Parameters,
) -> Result<Prepared<Plan>, ApiError> {
    let Some((mask_token, mask_id)) = tokenizer.mask() else {
        return Err(ApiError::invalid(
            "inputs",
            "the tokenizer does not define a mask token",
        ));
    };
    let top_k = match parameters.top_k.unwrap_or(5) {
        k if k < 0 => {
            return Err(ApiError::invalid(
                "parameters",
                format!("top_k must be at least 0, got {k}"),
            ))
        }
        k => usize::try_from(k).unwrap_or(usize::MAX),
    };
    let target_ids = parameters
        .targets
        .as_ref()
        .map(|targets| target_ids(tokenizer, targets))
        .transpose()?;
    let top_k = match &target_ids {
        Some(ids) => top_k.min(ids.len()),
        None => {
            let vocab = tokenizer.vocab_size();
            if top_k > vocab {
                return Err(ApiError::invalid(
                    "parameters",
                    format!("top_k is {top_k}, more than the {vocab} tokens of the vocabulary"),
                ));
            }
            top_k
        }
    };
    let truncation = truncation_strategy(
        parameters
            .tokenizer_kwargs
            .as_ref()
            .and_then(|kwargs| kwargs.truncation.as_ref()),
    )?;
    let (sentences, listed) = texts_of(inputs)?;

    let max = info.max_sequence_tokens;
    let mut sequences = Vec::with_capacity(sentences.len());
    let mut texts = Vec::with_capacity(sentences.len());
    for (i, sentence) in sentences.iter().enumerate() {
        let what = if listed {
            format!("inputs[{i}]")
        } else {
            "inputs".to_string()
        };
        let params = truncation.map(|strategy| TruncationParams {
            max_length: tokenizer.max_length(max),
            strategy,
            ..TruncationParams::default()
        });
        if params
            .as_ref()
            .is_some_and(|p| p.max_length <= tokenizer.added_tokens(false))
        {
            return Err(ApiError::Internal(format!(
                "a model limit of {max} tokens leaves no room for text"
            )));
        }
        let encoding = tokenizer.encode(sentence, None, params)?;
        if encoding.len() > max {
            return Err(too_long(
                &what,
                encoding.len(),
                max,
                "; pass \"tokenizer_kwargs\": {\"truncation\": true} to cut it",
            ));
        }
        let masks: Vec<usize> = encoding
            .get_ids()
            .iter()
            .enumerate()
            .filter(|(_, &id)| id == mask_id)
            .map(|(position, _)| position)
            .collect();
        if masks.is_empty() {
            return Err(ApiError::invalid(
                "inputs",
                format!("No mask_token ({mask_token}) found on the input ({what})"),
            ));
        }
        // Only the masks' rows of the vocabulary logits are computed and copied.
        let mask_tokens = masks.iter().map(|&position| position as u32).collect();
        sequences.push(encoder_input(&encoding).requesting(Requested::Tokens(mask_tokens)));
        texts.push(Text {
            ids: encoding.get_ids().to_vec(),
            masks,
        });
    }
    Ok(Prepared {
        inputs: sequences,
        plan: Plan {
            tokenizer: tokenizer.clone(),
            texts,
            top_k,
            target_ids,
            listed,
        },
    })
}

/// Proposes the likeliest tokens for each mask.
pub fn finish(plan: Plan, outputs: Vec<EncoderOutput>) -> Result<Output, ApiError> {
    check_count(&outputs, plan.texts.len())?;
    let mut answers = Vec::with_capacity(outputs.len());
    for (text, output) in plan.texts.iter().zip(outputs) {
        let EncoderOutput::Tokens(logits) = output else {
            return Err(wrong_output("fill-mask", "vocabulary logits per token"));
        };
        if logits.len() != text.masks.len() {
            return Err(wrong_output("fill-mask", "a row of logits per mask"));
        }
        let single_mask = text.masks.len() == 1;
        let mut per_mask = Vec::with_capacity(text.masks.len());
        for (&position, mask_logits) in text.masks.iter().zip(&logits) {
            let probabilities = super::softmax(mask_logits);
            let candidates: Vec<(u32, f32)> = match &plan.target_ids {
                Some(ids) => ids
                    .iter()
                    .map(|&id| {
                        probabilities
                            .get(id as usize)
                            .map(|&p| (id, p))
                            .ok_or_else(|| {
                                wrong_output("fill-mask", "a logit per vocabulary token")
                            })
                    })
                    .collect::<Result<_, _>>()?,
                None => (0u32..).zip(probabilities.iter().copied()).collect(),
            };
            if candidates.len() < plan.top_k {
                return Err(wrong_output("fill-mask", "a logit per vocabulary token"));
            }
            let mut proposals = Vec::with_capacity(plan.top_k);
            for (token, score) in top_k(candidates, plan.top_k) {
                let mut ids = text.ids.clone();
                ids[position] = token;
                ids.retain(|&id| Some(id) != plan.tokenizer.pad_id());
                // With several masks the others must stay visible, so special tokens stay too.
                let sequence = plan.tokenizer.decode(&ids, single_mask)?;
                proposals.push(Proposal {
                    score: f64::from(score),
                    token,
                    token_str: plan.tokenizer.decode(&[token], false)?,
                    sequence,
                });
            }
            per_mask.push(proposals);
        }
        answers.push(if single_mask {
            Output::Proposals(per_mask.remove(0))
        } else {
            Output::PerMask(per_mask)
        });
    }
    Ok(if plan.listed && answers.len() > 1 {
        Output::List(answers)
    } else {
        // A list of one text is answered as the text alone, as the pipeline does.
        answers.remove(0)
    })
}

/// The `k` best `(token, probability)`, best first, ties to the lower id.
fn top_k(mut candidates: Vec<(u32, f32)>, k: usize) -> Vec<(u32, f32)> {
    let by_score = |a: &(u32, f32), b: &(u32, f32)| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    };
    if k < candidates.len() {
        if k == 0 {
            return Vec::new();
        }
        candidates.select_nth_unstable_by(k - 1, by_score);
        candidates.truncate(k);
    }
    candidates.sort_by(by_score);
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::tokenizer::tests::bert_tokenizer;
    use candlewick_engine::encoder::EncoderTask;
    use serde_json::json;

    const WORDS: [&str; 8] = ["the", "capital", "of", "france", "is", "paris", ".", "city"];
    const VOCAB: usize = 5 + WORDS.len();

    fn info() -> EncoderInfo {
        EncoderInfo {
            labels: None,
            max_sequence_tokens: 16,
            hidden_size: 4,
            contract: crate::pipelines::tests::contract(EncoderTask::MaskedLm),
        }
    }

    fn run(
        inputs: Value,
        parameters: Value,
        favourites: &[&[(u32, f32)]],
    ) -> Result<Value, ApiError> {
        let tokenizer = bert_tokenizer(&WORDS);
        let parameters = Parameters::parse(Some(&parameters))?;
        let prepared = prepare(&tokenizer, &info(), &inputs, &parameters)?;
        let outputs = prepared
            .inputs
            .iter()
            .zip(favourites)
            .map(|(input, favourites)| {
                // The model answers the mask tokens only, as the input asks.
                let Requested::Tokens(masks) = &input.output else {
                    panic!("fill-mask asks for every token: {:?}", input.output);
                };
                assert!(
                    masks.iter().all(|&m| input.ids[m as usize] == 4),
                    "[MASK] is 4"
                );
                let rows = masks
                    .iter()
                    .map(|_| {
                        let mut row = vec![0.0; VOCAB];
                        for &(id, logit) in *favourites {
                            row[id as usize] = logit;
                        }
                        row
                    })
                    .collect();
                EncoderOutput::Tokens(rows)
            })
            .collect();
        Ok(serde_json::to_value(finish(prepared.plan, outputs)?).unwrap())
    }

    fn probability(favourites: &[(u32, f32)], id: u32) -> f64 {
        let mut row = vec![0.0; VOCAB];
        for &(id, logit) in favourites {
            row[id as usize] = logit;
        }
        f64::from(crate::pipelines::softmax(&row)[id as usize])
    }

    #[test]
    fn one_mask_gets_a_list_of_proposals() {
        // paris = 10, city = 12, the = 5
        let favourites: &[(u32, f32)] = &[(10, 4.0), (12, 3.0), (5, 2.0)];
        let answer = run(
            json!("The capital of France is [MASK]."),
            json!({"top_k": 2}),
            &[favourites],
        )
        .unwrap();
        assert_eq!(
            answer,
            json!([
                {"score": probability(favourites, 10), "token": 10, "token_str": "paris", "sequence": "the capital of france is paris."},
                {"score": probability(favourites, 12), "token": 12, "token_str": "city", "sequence": "the capital of france is city."},
            ])
        );
        // A list of one text answers as the text.
        let listed = run(
            json!(["The capital of France is [MASK]."]),
            json!({"top_k": 2}),
            &[favourites],
        )
        .unwrap();
        assert_eq!(listed, answer);
        // Five by default.
        let answer = run(json!("[MASK] is paris"), json!({}), &[favourites]).unwrap();
        assert_eq!(answer.as_array().unwrap().len(), 5);
    }

    #[test]
    fn several_masks_get_a_list_each_with_the_other_masks_shown() {
        let favourites: &[(u32, f32)] = &[(10, 4.0), (12, 3.0)];
        let answer = run(
            json!("[MASK] is [MASK]"),
            json!({"top_k": 1}),
            &[favourites],
        )
        .unwrap();
        assert_eq!(
            answer,
            json!([
                [{"score": probability(favourites, 10), "token": 10, "token_str": "paris", "sequence": "[CLS] paris is [MASK] [SEP]"}],
                [{"score": probability(favourites, 10), "token": 10, "token_str": "paris", "sequence": "[CLS] [MASK] is paris [SEP]"}],
            ])
        );
        let two = run(
            json!(["[MASK] is paris", "paris is [MASK]"]),
            json!({"top_k": 1}),
            &[favourites, favourites],
        )
        .unwrap();
        assert_eq!(two.as_array().unwrap().len(), 2);
        assert_eq!(two[1][0]["sequence"], "paris is paris");
    }

    #[test]
    fn targets_restrict_the_proposals_and_cap_top_k() {
        let favourites: &[(u32, f32)] = &[(10, 4.0), (12, 3.0), (5, 2.0)];
        // "City" is not in the vocabulary: its first token ("city") stands for it; " " has no
        // token and is dropped.
        let answer = run(
            json!("[MASK] is paris"),
            json!({"top_k": 10, "targets": ["the", "City", "of", "city", " "]}),
            &[favourites],
        )
        .unwrap();
        let tokens: Vec<u64> = answer
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["token"].as_u64().unwrap())
            .collect();
        assert_eq!(tokens, [12, 5, 7]);
        assert_eq!(answer[0]["score"], json!(probability(favourites, 12)));
    }

    #[test]
    fn inputs_without_a_mask_and_bad_parameters_are_refused() {
        let favourites: &[(u32, f32)] = &[];
        for (inputs, parameters, param) in [
            (json!("the capital of france"), json!({}), "inputs"),
            (json!(["[MASK] is paris", "paris"]), json!({}), "inputs"),
            (json!(""), json!({}), "inputs"),
            (json!({"text": "[MASK]"}), json!({}), "inputs"),
            (json!("[MASK]"), json!({"top_k": -1}), "parameters"),
            (json!("[MASK]"), json!({"top_k": 100}), "parameters"),
            (json!("[MASK]"), json!({"targets": []}), "parameters"),
            (json!("[MASK]"), json!({"targets": [3]}), "parameters"),
            (
                json!("[MASK]"),
                json!({"tokenizer_kwargs": {"padding": true}}),
                "parameters",
            ),
        ] {
            let error = run(inputs.clone(), parameters, &[favourites]).unwrap_err();
            assert_eq!(error.param(), Some(param), "{inputs}: {error}");
        }
        let error = run(json!("the capital"), json!({}), &[favourites]).unwrap_err();
        assert!(
            error.to_string().contains("No mask_token ([MASK])"),
            "{error}"
        );
    }
}
