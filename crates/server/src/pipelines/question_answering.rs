//! question-answering: the span of a context that best answers a question, as transformers'
//! `QuestionAnsweringPipeline` finds it.
//!
//! The question and context are tokenized as a pair; a context too long for `max_seq_len` is
//! cut into windows that share `doc_stride` tokens, each run with the whole question. In each
//! window the start and end logits of the context tokens (and `[CLS]`) become probabilities, a
//! span scores `p_start * p_end` when it ends at most `max_answer_len` tokens after it starts,
//! and the best spans of all windows are mapped back to characters of the context.

use candlewick_engine::EncoderOutput;
use candlewick_scheduler::EncoderInfo;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::{Encoding, TruncationParams, TruncationStrategy};

use super::{
    char_slice, check_count, encoder_input, kind_of, parse_parameters, text_of, wrong_output,
    PipelineTokenizer, Prepared,
};
use crate::error::ApiError;

/// The pipeline's call parameters.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "QuestionAnsweringParameters")]
pub struct Parameters {
    /// How many answers to return, best first (default 1); at least 1.
    pub top_k: Option<i64>,
    /// Tokens shared by consecutive windows of a long context (default: half of
    /// `max_seq_len`, at most 128).
    pub doc_stride: Option<i64>,
    /// The longest answer in tokens (default 15); at least 1.
    pub max_answer_len: Option<i64>,
    /// Tokens in a window, question and special tokens included (default: the tokenizer's
    /// `model_max_length`, at most 384).
    pub max_seq_len: Option<i64>,
    /// Accepted as the pipeline accepts it; like the pipeline with a fast tokenizer, it has no
    /// effect (the question is never truncated).
    pub max_question_len: Option<i64>,
    /// Whether the empty answer competes, with the lowest `[CLS]` score of the windows.
    pub handle_impossible_answer: Option<bool>,
    /// Whether answers widen to whole words (default true).
    pub align_to_words: Option<bool>,
}

impl Parameters {
    /// Reads the request's `parameters`; absent or null means the defaults.
    pub fn parse(parameters: Option<&Value>) -> Result<Self, ApiError> {
        parse_parameters(parameters)
    }
}

/// A question and the context to find its answer in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The question.
    pub question: String,
    /// The text the answer is taken from.
    pub context: String,
}

/// One window of a question's context.
#[derive(Debug, Clone)]
struct Window {
    encoding: Encoding,
    /// Tokens that may be part of the answer: the context's, and `[CLS]`.
    allowed: Vec<bool>,
}

/// One question and its windows.
#[derive(Debug, Clone)]
struct Example {
    context: String,
    windows: Vec<Window>,
}

/// What [`finish`] needs: the windows of each question and the answer parameters.
#[derive(Debug, Clone)]
pub struct Plan {
    examples: Vec<Example>,
    /// Whether the context is the pair's second text (the tokenizer pads on the right).
    question_first: bool,
    top_k: usize,
    max_answer_len: usize,
    handle_impossible_answer: bool,
    align_to_words: bool,
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Answer {
    /// `p_start * p_end` of the span (or the empty answer's score).
    pub score: f64,
    /// First character of the answer in the context.
    pub start: usize,
    /// One past its last character.
    pub end: usize,
    /// The answer's text.
    pub answer: String,
}

/// The pipeline's answer.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
#[schemars(rename = "QuestionAnsweringOutput")]
pub enum Output {
    /// A question's only answer.
    One(Answer),
    /// A question's answers, best first (none or several).
    Several(Vec<Answer>),
    /// One answer per question of a list.
    List(Vec<Output>),
}

/// Parses `inputs`: a `{question, context}` object or a non-empty list of them.
pub fn parse_inputs(inputs: &Value) -> Result<Vec<Question>, ApiError> {
    match inputs {
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid(
            "inputs",
            "inputs is an empty list; give at least one {\"question\", \"context\"}",
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| parse_one(item, &format!("inputs[{i}]")))
            .collect(),
        other => Ok(vec![parse_one(other, "inputs")?]),
    }
}

fn parse_one(value: &Value, what: &str) -> Result<Question, ApiError> {
    let Value::Object(fields) = value else {
        return Err(ApiError::invalid(
            "inputs",
            format!(
                "{what} must be a {{\"question\": ..., \"context\": ...}} object, got {}",
                kind_of(value)
            ),
        ));
    };
    if let Some(key) = fields
        .keys()
        .find(|key| key.as_str() != "question" && key.as_str() != "context")
    {
        return Err(ApiError::invalid(
            "inputs",
            format!("{what} has an unknown field {key:?}; give \"question\" and \"context\""),
        ));
    }
    let field = |name: &str| match fields.get(name) {
        Some(value) => text_of(value, &format!("{what}.{name}")),
        None => Err(ApiError::invalid(
            "inputs",
            format!("{what} has no \"{name}\"; give \"question\" and \"context\""),
        )),
    };
    Ok(Question {
        question: field("question")?,
        context: field("context")?,
    })
}

/// A parameter that must be a positive count.
fn at_least(name: &str, value: i64, min: i64) -> Result<usize, ApiError> {
    if value < min {
        return Err(ApiError::invalid(
            "parameters",
            format!("{name} must be at least {min}, got {value}"),
        ));
    }
    Ok(usize::try_from(value).unwrap_or(usize::MAX))
}

/// Checks the inputs and parameters and cuts each question's context into windows.
pub fn prepare(
    tokenizer: &PipelineTokenizer,
    info: &EncoderInfo,
    inputs: &Value,
    parameters: &Parameters,
) -> Result<Prepared<Plan>, ApiError> {
    let top_k = at_least("top_k", parameters.top_k.unwrap_or(1), 1)?;
    let max_answer_len = at_least("max_answer_len", parameters.max_answer_len.unwrap_or(15), 1)?;
    if let Some(max_question_len) = parameters.max_question_len {
        at_least("max_question_len", max_question_len, 0)?;
    }
    let max = info.max_sequence_tokens;
    let max_seq_len = match parameters.max_seq_len {
        Some(requested) => {
            let requested = at_least("max_seq_len", requested, 1)?;
            if requested > max {
                return Err(ApiError::invalid(
                    "parameters",
                    format!(
                        "max_seq_len is {requested}, more than the {max} tokens this model takes"
                    ),
                ));
            }
            requested
        }
        None => tokenizer
            .model_max_length()
            .unwrap_or(usize::MAX)
            .min(384)
            .min(max),
    };
    let doc_stride = match parameters.doc_stride {
        Some(stride) => at_least("doc_stride", stride, 0)?,
        None => (max_seq_len / 2).min(128),
    };
    if doc_stride > max_seq_len {
        return Err(ApiError::invalid(
            "parameters",
            format!("doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})"),
        ));
    }
    let questions = parse_inputs(inputs)?;

    let question_first = !tokenizer.padding_left();
    let mut sequences = Vec::new();
    let mut examples = Vec::with_capacity(questions.len());
    for (i, question) in questions.into_iter().enumerate() {
        let what = if inputs.is_array() {
            format!("the question of inputs[{i}]")
        } else {
            "the question".to_string()
        };
        let encodings = windows(
            tokenizer,
            &question,
            question_first,
            max_seq_len,
            doc_stride,
            &what,
        )?;
        let windows = encodings
            .into_iter()
            .map(|encoding| {
                sequences.push(encoder_input(&encoding));
                // The pipeline masks the question and special tokens when the question comes
                // first, nothing otherwise; `[CLS]` always stays.
                let allowed = encoding
                    .get_sequence_ids()
                    .iter()
                    .zip(encoding.get_ids())
                    .map(|(sequence, &id)| {
                        !question_first || *sequence == Some(1) || Some(id) == tokenizer.cls_id()
                    })
                    .collect();
                Window { encoding, allowed }
            })
            .collect();
        examples.push(Example {
            context: question.context,
            windows,
        });
    }
    Ok(Prepared {
        inputs: sequences,
        plan: Plan {
            examples,
            question_first,
            top_k,
            max_answer_len,
            handle_impossible_answer: parameters.handle_impossible_answer.unwrap_or(false),
            align_to_words: parameters.align_to_words.unwrap_or(true),
        },
    })
}

/// Tokenizes a question with its context, in windows of `max_seq_len` tokens when the context
/// does not fit, consecutive windows sharing `doc_stride` context tokens.
fn windows(
    tokenizer: &PipelineTokenizer,
    question: &Question,
    question_first: bool,
    max_seq_len: usize,
    doc_stride: usize,
    what: &str,
) -> Result<Vec<Encoding>, ApiError> {
    let pair = if question_first {
        (question.question.as_str(), question.context.as_str())
    } else {
        (question.context.as_str(), question.question.as_str())
    };
    let whole = tokenizer.encode(pair.0, Some(pair.1), None)?;
    if whole.len() <= max_seq_len {
        return Ok(vec![whole]);
    }
    // The checks the tokenizer would otherwise fail (or panic) on.
    let context_sequence = if question_first { 1 } else { 0 };
    let sequence_ids = whole.get_sequence_ids();
    let context_tokens = sequence_ids
        .iter()
        .filter(|&&s| s == Some(context_sequence))
        .count();
    let other_tokens = whole.len() - context_tokens;
    if other_tokens >= max_seq_len {
        return Err(ApiError::invalid(
            "inputs",
            format!(
                "{what} and the special tokens take {other_tokens} tokens, leaving no room for the context in max_seq_len ({max_seq_len})"
            ),
        ));
    }
    let context_room = max_seq_len - other_tokens;
    if doc_stride >= context_room {
        return Err(ApiError::invalid(
            "parameters",
            format!(
                "doc_stride ({doc_stride}) must be less than the {context_room} context tokens a window of {what} holds"
            ),
        ));
    }
    let truncation = TruncationParams {
        max_length: max_seq_len,
        stride: doc_stride,
        strategy: if question_first {
            TruncationStrategy::OnlySecond
        } else {
            TruncationStrategy::OnlyFirst
        },
        ..TruncationParams::default()
    };
    let mut first = tokenizer.encode(pair.0, Some(pair.1), Some(truncation))?;
    let overflowing = first.take_overflowing();
    let mut windows = vec![first];
    windows.extend(overflowing);
    Ok(windows)
}

/// Finds the best spans of every window and maps them to the contexts.
pub fn finish(plan: Plan, outputs: Vec<EncoderOutput>) -> Result<Output, ApiError> {
    let windows: usize = plan.examples.iter().map(|e| e.windows.len()).sum();
    check_count(&outputs, windows)?;
    let mut outputs = outputs.into_iter();
    let mut answers = Vec::with_capacity(plan.examples.len());
    let context_sequence = if plan.question_first { 1 } else { 0 };
    for example in &plan.examples {
        let mut found = Vec::new();
        let mut min_null_score = 1_000_000f64;
        for window in &example.windows {
            let Some(EncoderOutput::Span { start, end }) = outputs.next() else {
                return Err(wrong_output("question-answering", "start and end logits"));
            };
            let length = window.allowed.len();
            if start.len() != length || end.len() != length {
                return Err(wrong_output(
                    "question-answering",
                    "a start and an end logit per token",
                ));
            }
            let spans = best_spans(&start, &end, &window.allowed, &mut min_null_score, &plan);
            for (s, e, score) in spans {
                let (start, end) = char_span(
                    &window.encoding,
                    s,
                    e,
                    context_sequence,
                    plan.align_to_words,
                );
                found.push(Answer {
                    score: f64::from(score),
                    start,
                    end,
                    answer: char_slice(&example.context, start, end).to_string(),
                });
            }
        }
        if plan.handle_impossible_answer {
            found.push(Answer {
                score: min_null_score,
                start: 0,
                end: 0,
                answer: String::new(),
            });
        }
        // Stable, best first: equal scores keep the windows' order.
        found.sort_by(|a, b| {
            b.score
                .partial_cmp(&a.score)
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        found.truncate(plan.top_k);
        answers.push(if found.len() == 1 {
            Output::One(found.remove(0))
        } else {
            Output::Several(found)
        });
    }
    Ok(if answers.len() == 1 {
        answers.remove(0)
    } else {
        Output::List(answers)
    })
}

/// Softmax over the allowed tokens of a window (the others get a logit of -10000, as in the
/// pipeline), in f32.
fn masked_probabilities(logits: &[f32], allowed: &[bool]) -> Vec<f32> {
    let masked: Vec<f32> = logits
        .iter()
        .zip(allowed)
        .map(|(&logit, &allowed)| if allowed { logit } else { -10000.0 })
        .collect();
    super::softmax(&masked)
}

/// The best `top_k` spans `(start, end, score)` of a window, lowering `min_null_score` to the
/// window's `[CLS]` score when the empty answer competes.
fn best_spans(
    start: &[f32],
    end: &[f32],
    allowed: &[bool],
    min_null_score: &mut f64,
    plan: &Plan,
) -> Vec<(usize, usize, f32)> {
    let mut start = masked_probabilities(start, allowed);
    let mut end = masked_probabilities(end, allowed);
    if start.is_empty() {
        return Vec::new();
    }
    if plan.handle_impossible_answer {
        *min_null_score = min_null_score.min(f64::from(start[0] * end[0]));
    }
    // The first token never starts or ends an answer.
    start[0] = 0.0;
    end[0] = 0.0;

    // Spans in row-major order (start, then end), as numpy flattens the score matrix.
    let n = start.len();
    let mut candidates: Vec<(usize, usize, f32)> = (0..n)
        .flat_map(|s| {
            let (start, end) = (&start, &end);
            (s..n.min(s + plan.max_answer_len)).map(move |e| (s, e, start[s] * end[e]))
        })
        .collect();
    // Best first; ties in row-major order (numpy's argmax for one answer).
    candidates.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    candidates.truncate(plan.top_k);
    // The pipeline tests membership against both coordinates of the mask's nonzero entries,
    // so token 0 passes whenever any token is allowed.
    let any_allowed = allowed.iter().any(|&a| a);
    let desired = |token: usize| allowed[token] || (token == 0 && any_allowed);
    candidates.retain(|&(s, e, _)| desired(s) && desired(e));
    candidates
}

/// The characters of the context a span covers: whole words with `align_to_words` (when the
/// tokenizer knows the words), the tokens' offsets otherwise.
fn char_span(
    encoding: &Encoding,
    start: usize,
    end: usize,
    context_sequence: usize,
    align_to_words: bool,
) -> (usize, usize) {
    if align_to_words {
        let words = encoding
            .token_to_word(start)
            .zip(encoding.token_to_word(end));
        if let Some(((_, start_word), (_, end_word))) = words {
            let chars = encoding
                .word_to_chars(start_word, context_sequence)
                .zip(encoding.word_to_chars(end_word, context_sequence));
            if let Some(((start, _), (_, end))) = chars {
                return (start, end);
            }
        }
    }
    let offsets = encoding.get_offsets();
    (offsets[start].0, offsets[end].1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::tokenizer::tests::bert_tokenizer;
    use candlewick_engine::encoder::EncoderTask;
    use serde_json::json;

    fn info() -> EncoderInfo {
        EncoderInfo {
            labels: None,
            max_sequence_tokens: 64,
            hidden_size: 4,
            contract: crate::pipelines::tests::contract(EncoderTask::QuestionAnswering),
        }
    }

    fn tokenizer() -> PipelineTokenizer {
        bert_tokenizer(&[
            "where", "does", "sarah", "live", "?", "she", "lives", "in", "new", "york", "city",
            ".", "un", "##believ", "##ably",
        ])
    }

    const QUESTION: &str = "Where does Sarah live?";
    const CONTEXT: &str = "She lives in New York City.";

    fn prepared(parameters: Value) -> Prepared<Plan> {
        let parameters = Parameters::parse(Some(&parameters)).unwrap();
        prepare(
            &tokenizer(),
            &info(),
            &json!({"question": QUESTION, "context": CONTEXT}),
            &parameters,
        )
        .unwrap()
    }

    /// Logits: `high` at the given positions, 0 elsewhere.
    fn logits(length: usize, high: &[(usize, f32)]) -> Vec<f32> {
        let mut row = vec![0.0; length];
        for &(i, value) in high {
            row[i] = value;
        }
        row
    }

    #[test]
    fn the_best_span_is_mapped_to_context_characters() {
        // [CLS] where does sarah live ? [SEP] she lives in new york city . [SEP]
        //   0     1    2     3     4   5   6    7    8    9  10   11   12  13  14
        let prepared = prepared(json!({}));
        assert_eq!(prepared.inputs.len(), 1);
        assert_eq!(prepared.inputs[0].ids.len(), 15);
        // The question scores highest but is masked; "new york" wins.
        let start = logits(15, &[(1, 9.0), (10, 3.0), (11, 1.0)]);
        let end = logits(15, &[(2, 9.0), (11, 3.0), (12, 2.0)]);
        let answer = finish(
            prepared.plan,
            vec![EncoderOutput::Span {
                start: start.clone(),
                end: end.clone(),
            }],
        )
        .unwrap();
        let allowed: Vec<bool> = (0..15).map(|i| i == 0 || (7..=13).contains(&i)).collect();
        let p_start = masked_probabilities(&start, &allowed);
        let p_end = masked_probabilities(&end, &allowed);
        assert_eq!(
            serde_json::to_value(answer).unwrap(),
            json!({"score": f64::from(p_start[10] * p_end[11]), "start": 13, "end": 21, "answer": "New York"})
        );
    }

    #[test]
    fn top_k_max_answer_len_and_the_impossible_answer() {
        let prepared =
            prepared(json!({"top_k": 3, "max_answer_len": 1, "handle_impossible_answer": true}));
        let start = logits(15, &[(0, 6.0), (10, 3.0), (11, 1.0)]);
        let end = logits(15, &[(0, 6.0), (11, 3.0), (12, 2.0)]);
        let answer = finish(
            prepared.plan,
            vec![EncoderOutput::Span {
                start: start.clone(),
                end: end.clone(),
            }],
        )
        .unwrap();
        let allowed: Vec<bool> = (0..15).map(|i| i == 0 || (7..=13).contains(&i)).collect();
        let p_start = masked_probabilities(&start, &allowed);
        let p_end = masked_probabilities(&end, &allowed);
        let answer = serde_json::to_value(answer).unwrap();
        // [CLS] is likely: the empty answer comes first; spans are single tokens.
        assert_eq!(
            answer[0],
            json!({"score": f64::from(p_start[0] * p_end[0]), "start": 0, "end": 0, "answer": ""})
        );
        assert_eq!(answer[1]["answer"], "York");
        assert_eq!(
            answer[1]["score"],
            json!(f64::from(p_start[11] * p_end[11]))
        );
        assert_eq!(answer[2]["answer"], "New");
        assert_eq!(answer.as_array().unwrap().len(), 3);
    }

    #[test]
    fn answers_widen_to_words_unless_asked_not_to() {
        let context = "She lives unbelievably.";
        let question = json!({"question": "where?", "context": context});
        // [CLS] where ? [SEP] she lives un ##believ ##ably . [SEP]
        //   0     1   2   3    4    5    6     7      8    9   10
        let start = logits(11, &[(7, 5.0)]);
        let end = logits(11, &[(7, 5.0)]);
        let mut answers = Vec::new();
        for align in [true, false] {
            let parameters = Parameters::parse(Some(&json!({"align_to_words": align}))).unwrap();
            let prepared = prepare(&tokenizer(), &info(), &question, &parameters).unwrap();
            let span = EncoderOutput::Span {
                start: start.clone(),
                end: end.clone(),
            };
            let answer = serde_json::to_value(finish(prepared.plan, vec![span]).unwrap()).unwrap();
            answers.push(answer["answer"].as_str().unwrap().to_string());
        }
        assert_eq!(answers, ["unbelievably", "believ"]);
    }

    #[test]
    fn long_contexts_run_in_windows_sharing_doc_stride_tokens() {
        // 8 question and special tokens, 4 context tokens a window, 2 shared.
        let prepared = prepared(json!({"max_seq_len": 12, "doc_stride": 2, "top_k": 2}));
        let ids: Vec<Vec<u32>> = prepared
            .inputs
            .iter()
            .map(|input| input.ids.clone())
            .collect();
        let question = [2, 5, 6, 7, 8, 9, 3];
        let window = |context: &[u32]| [&question[..], context, &[3]].concat();
        assert_eq!(
            ids,
            [
                window(&[10, 11, 12, 13]),
                window(&[12, 13, 14, 15]),
                window(&[14, 15, 16])
            ]
        );
        assert!(prepared
            .inputs
            .iter()
            .all(|input| input.type_ids[7] == 1 && input.type_ids[6] == 0));
        // Window 2 is confident about "new york", window 3 about "city".
        let spans = vec![
            EncoderOutput::Span {
                start: logits(12, &[]),
                end: logits(12, &[]),
            },
            EncoderOutput::Span {
                start: logits(12, &[(8, 4.0)]),
                end: logits(12, &[(9, 4.0)]),
            },
            EncoderOutput::Span {
                start: logits(11, &[(8, 6.0)]),
                end: logits(11, &[(8, 6.0)]),
            },
        ];
        let answer = serde_json::to_value(finish(prepared.plan, spans).unwrap()).unwrap();
        let texts: Vec<&str> = answer
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["answer"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["City", "New York"]);
    }

    #[test]
    fn lists_answer_per_question_and_bad_requests_are_refused() {
        let tokenizer = tokenizer();
        let two = json!([{"question": QUESTION, "context": CONTEXT}, {"question": "where?", "context": "new york"}]);
        let prepared = prepare(&tokenizer, &info(), &two, &Parameters::default()).unwrap();
        assert_eq!(prepared.inputs.len(), 2);
        let spans = prepared
            .inputs
            .iter()
            .map(|input| EncoderOutput::Span {
                start: logits(input.ids.len(), &[]),
                end: logits(input.ids.len(), &[]),
            })
            .collect();
        let answer = serde_json::to_value(finish(prepared.plan, spans).unwrap()).unwrap();
        assert_eq!(answer.as_array().unwrap().len(), 2);
        assert!(answer[1]["answer"].is_string());

        for (inputs, parameters, param) in [
            (
                json!({"question": "", "context": CONTEXT}),
                json!({}),
                "inputs",
            ),
            (json!({"question": QUESTION}), json!({}), "inputs"),
            (
                json!({"question": QUESTION, "context": CONTEXT, "answer": "x"}),
                json!({}),
                "inputs",
            ),
            (json!("where?"), json!({}), "inputs"),
            (json!([]), json!({}), "inputs"),
            (
                json!({"question": QUESTION, "context": CONTEXT}),
                json!({"top_k": 0}),
                "parameters",
            ),
            (
                json!({"question": QUESTION, "context": CONTEXT}),
                json!({"max_answer_len": 0}),
                "parameters",
            ),
            (
                json!({"question": QUESTION, "context": CONTEXT}),
                json!({"max_seq_len": 65}),
                "parameters",
            ),
            (
                json!({"question": QUESTION, "context": CONTEXT}),
                json!({"max_seq_len": 10, "doc_stride": 11}),
                "parameters",
            ),
            (
                json!({"question": QUESTION, "context": CONTEXT}),
                json!({"max_seq_len": 10, "doc_stride": 3}),
                "parameters",
            ),
            (
                json!({"question": QUESTION, "context": CONTEXT}),
                json!({"max_seq_len": 7}),
                "inputs",
            ),
        ] {
            let error = Parameters::parse(Some(&parameters))
                .and_then(|parsed| prepare(&tokenizer, &info(), &inputs, &parsed))
                .unwrap_err();
            assert_eq!(error.param(), Some(param), "{inputs} {parameters}: {error}");
        }
    }
}
