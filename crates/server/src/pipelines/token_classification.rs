//! token-classification: a label per token, or entities grouped from them, as transformers'
//! `TokenClassificationPipeline` answers.
//!
//! Texts are truncated to the model's length; with `stride` the whole text is read in
//! overlapping windows and the entities of all windows are merged, longest (then best) first
//! where they overlap.

use candlewick_engine::encoder::labels::Labels;
use candlewick_engine::EncoderOutput;
use candlewick_scheduler::EncoderInfo;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::{TruncationParams, TruncationStrategy};

use super::{
    argmax, char_slice, check_count, encoder_input, nanmean, parse_parameters, softmax, texts_of,
    wrong_output, PipelineTokenizer, Prepared,
};
use crate::error::ApiError;

/// The pipeline's call parameters.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "TokenClassificationParameters")]
pub struct Parameters {
    /// `none` (default: one answer per token), `simple`, `first`, `average` or `max` (any case).
    pub aggregation_strategy: Option<String>,
    /// Labels left out of the answer; `["O"]` by default.
    pub ignore_labels: Option<Vec<String>>,
    /// Tokens shared by consecutive windows; given, the whole text is read in windows.
    pub stride: Option<i64>,
    /// Deprecated in transformers: true groups entities (`simple`, or `first` with
    /// `ignore_subwords`); overrides `aggregation_strategy` when either is given.
    pub grouped_entities: Option<bool>,
    /// Deprecated in transformers: see `grouped_entities`.
    pub ignore_subwords: Option<bool>,
}

impl Parameters {
    /// Reads the request's `parameters`; absent or null means the defaults.
    pub fn parse(parameters: Option<&Value>) -> Result<Self, ApiError> {
        parse_parameters(parameters)
    }
}

/// How token predictions become entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregationStrategy {
    /// One entity per token.
    None,
    /// Adjacent tokens with the same tag form one entity.
    Simple,
    /// As simple, a word taking its first token's label.
    First,
    /// As simple, a word taking the label of its averaged scores.
    Average,
    /// As simple, a word taking the label of its most confident token.
    Max,
}

impl AggregationStrategy {
    fn parse(name: &str) -> Result<Self, ApiError> {
        match name.to_lowercase().as_str() {
            "none" => Ok(Self::None),
            "simple" => Ok(Self::Simple),
            "first" => Ok(Self::First),
            "average" => Ok(Self::Average),
            "max" => Ok(Self::Max),
            _ => Err(ApiError::invalid(
                "parameters",
                format!(
                    "aggregation_strategy must be none, simple, first, average or max, got {name:?}"
                ),
            )),
        }
    }
}

/// One window of one text.
#[derive(Debug, Clone)]
struct Window {
    ids: Vec<u32>,
    offsets: Vec<(usize, usize)>,
    special: Vec<bool>,
}

/// One text and its windows.
#[derive(Debug, Clone)]
struct Text {
    sentence: String,
    windows: Vec<Window>,
}

/// What [`finish`] needs: the texts' windows, the labels and the tokenizer for words.
#[derive(Debug, Clone)]
pub struct Plan {
    tokenizer: PipelineTokenizer,
    labels: Labels,
    strategy: AggregationStrategy,
    ignore_labels: Vec<String>,
    texts: Vec<Text>,
    listed: bool,
}

/// One entity of the answer.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Entity {
    /// A token (aggregation `none`).
    Token {
        /// The token's label.
        entity: String,
        /// The label's probability.
        score: f64,
        /// The token's position in its window.
        index: usize,
        /// The token as the vocabulary spells it (the covered text for unknown tokens).
        word: String,
        /// First character of the token in the text.
        start: usize,
        /// One past its last character.
        end: usize,
    },
    /// Grouped tokens.
    Group {
        /// The label without its B-/I- prefix.
        entity_group: String,
        /// The mean of the grouped scores.
        score: f64,
        /// The grouped tokens decoded.
        word: String,
        /// First character of the entity in the text.
        start: usize,
        /// One past its last character.
        end: usize,
    },
}

impl Entity {
    fn start(&self) -> usize {
        match self {
            Self::Token { start, .. } | Self::Group { start, .. } => *start,
        }
    }

    fn end(&self) -> usize {
        match self {
            Self::Token { end, .. } | Self::Group { end, .. } => *end,
        }
    }

    fn score(&self) -> f64 {
        match self {
            Self::Token { score, .. } | Self::Group { score, .. } => *score,
        }
    }

    fn label(&self) -> &str {
        match self {
            Self::Token { entity, .. } => entity,
            Self::Group { entity_group, .. } => entity_group,
        }
    }
}

/// The pipeline's answer.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
#[schemars(rename = "TokenClassificationOutput")]
pub enum Output {
    /// The entities of a single text.
    Entities(Vec<Entity>),
    /// The entities of each text of a list.
    List(Vec<Vec<Entity>>),
}

/// Checks the inputs (a string or a list of strings) and parameters, and tokenizes each text
/// into its windows.
pub fn prepare(
    tokenizer: &PipelineTokenizer,
    info: &EncoderInfo,
    inputs: &Value,
    parameters: &Parameters,
) -> Result<Prepared<Plan>, ApiError> {
    let labels = info
        .labels
        .clone()
        .ok_or_else(|| ApiError::Internal("the token classifier has no labels".into()))?;
    let mut strategy = parameters
        .aggregation_strategy
        .as_deref()
        .map(AggregationStrategy::parse)
        .transpose()?;
    if parameters.grouped_entities.is_some() || parameters.ignore_subwords.is_some() {
        let grouped = parameters.grouped_entities.unwrap_or(false);
        let ignore_subwords = parameters.ignore_subwords.unwrap_or(false);
        strategy = Some(match (grouped, ignore_subwords) {
            (true, true) => AggregationStrategy::First,
            (true, false) => AggregationStrategy::Simple,
            _ => AggregationStrategy::None,
        });
    }
    let max_length = tokenizer.max_length(info.max_sequence_tokens);
    let room = max_length.saturating_sub(tokenizer.added_tokens(false));
    if room == 0 {
        return Err(ApiError::Internal(format!(
            "a model limit of {max_length} tokens leaves no room for text"
        )));
    }
    let stride = match parameters.stride {
        None => None,
        Some(stride) if stride < 0 => {
            return Err(ApiError::invalid(
                "parameters",
                format!("stride must be at least 0, got {stride}"),
            ))
        }
        Some(_) if strategy == Some(AggregationStrategy::None) => {
            return Err(ApiError::invalid(
                "parameters",
                "stride reads the whole text in windows, which needs an aggregation_strategy other than none",
            ))
        }
        Some(stride) => {
            let stride = usize::try_from(stride).unwrap_or(usize::MAX);
            if stride >= room {
                return Err(ApiError::invalid(
                    "parameters",
                    format!(
                        "stride must be less than the {room} text tokens of a window, got {stride}"
                    ),
                ));
            }
            Some(stride)
        }
    };
    let (sentences, listed) = texts_of(inputs)?;

    let truncation = TruncationParams {
        max_length,
        stride: stride.unwrap_or(0),
        strategy: TruncationStrategy::LongestFirst,
        ..TruncationParams::default()
    };
    let mut sequences = Vec::new();
    let mut texts = Vec::with_capacity(sentences.len());
    for sentence in sentences {
        let mut encoding = tokenizer.encode(&sentence, None, Some(truncation.clone()))?;
        let overflowing = encoding.take_overflowing();
        let mut encodings = vec![encoding];
        // Without a stride the pipeline reads the first window only.
        if stride.is_some() {
            encodings.extend(overflowing);
        }
        let windows = encodings
            .iter()
            .map(|encoding| {
                sequences.push(encoder_input(encoding));
                Window {
                    ids: encoding.get_ids().to_vec(),
                    offsets: encoding.get_offsets().to_vec(),
                    special: encoding
                        .get_special_tokens_mask()
                        .iter()
                        .map(|&m| m != 0)
                        .collect(),
                }
            })
            .collect();
        texts.push(Text { sentence, windows });
    }
    Ok(Prepared {
        inputs: sequences,
        plan: Plan {
            tokenizer: tokenizer.clone(),
            labels,
            strategy: strategy.unwrap_or(AggregationStrategy::None),
            ignore_labels: parameters
                .ignore_labels
                .clone()
                .unwrap_or_else(|| vec!["O".to_string()]),
            texts,
            listed,
        },
    })
}

/// Labels the tokens of every window and aggregates them into the pipeline's entities.
pub fn finish(plan: Plan, outputs: Vec<EncoderOutput>) -> Result<Output, ApiError> {
    let windows: usize = plan.texts.iter().map(|text| text.windows.len()).sum();
    check_count(&outputs, windows)?;
    let mut outputs = outputs.into_iter();
    let mut answers = Vec::with_capacity(plan.texts.len());
    for text in &plan.texts {
        let mut entities = Vec::new();
        for window in &text.windows {
            let Some(EncoderOutput::Tokens(logits)) = outputs.next() else {
                return Err(wrong_output("token-classification", "logits per token"));
            };
            if logits.len() != window.ids.len()
                || logits
                    .iter()
                    .any(|row| row.len() != plan.labels.names.len())
            {
                return Err(wrong_output(
                    "token-classification",
                    "one row of label logits per token",
                ));
            }
            let scores: Vec<Vec<f32>> = logits.iter().map(|row| softmax(row)).collect();
            let pre_entities = pre_entities(&plan, &text.sentence, window, scores)?;
            let grouped = aggregate(&plan, pre_entities)?;
            entities.extend(
                grouped
                    .into_iter()
                    .filter(|entity| !plan.ignore_labels.iter().any(|l| l == entity.label())),
            );
        }
        if text.windows.len() > 1 {
            entities = merge_overlapping(entities);
        }
        answers.push(entities);
    }
    Ok(if plan.listed {
        Output::List(answers)
    } else {
        Output::Entities(answers.pop().unwrap_or_default())
    })
}

/// A token with its scores, before aggregation.
#[derive(Debug, Clone)]
struct PreEntity {
    word: String,
    scores: Vec<f32>,
    start: usize,
    end: usize,
    index: usize,
    is_subword: bool,
}

/// A token or word with its label, before grouping.
#[derive(Debug, Clone)]
struct Labelled {
    entity: String,
    score: f32,
    index: usize,
    word: String,
    start: usize,
    end: usize,
}

/// The non-special tokens of a window with their words and whether they continue a word.
fn pre_entities(
    plan: &Plan,
    sentence: &str,
    window: &Window,
    scores: Vec<Vec<f32>>,
) -> Result<Vec<PreEntity>, ApiError> {
    let word_aware = plan.tokenizer.has_continuing_subword_prefix();
    let mut pre_entities = Vec::new();
    for (index, scores) in scores.into_iter().enumerate() {
        if window.special[index] {
            continue;
        }
        let id = window.ids[index];
        let (start, end) = window.offsets[index];
        let word_ref = char_slice(sentence, start, end);
        let mut word = plan
            .tokenizer
            .id_to_token(id)
            .ok_or_else(|| ApiError::Internal(format!("token {id} is not in the vocabulary")))?;
        let mut is_subword = if word_aware {
            word.chars().count() != word_ref.chars().count()
        } else {
            // Without word marks, a token glued to the previous character continues a word.
            start > 0 && !char_slice(sentence, start - 1, start + 1).contains(' ')
        };
        if Some(id) == plan.tokenizer.unk_id() {
            word = word_ref.to_string();
            is_subword = false;
        }
        pre_entities.push(PreEntity {
            word,
            scores,
            start,
            end,
            index,
            is_subword,
        });
    }
    Ok(pre_entities)
}

/// Labels tokens (none, simple) or words (first, average, max), then groups them unless the
/// strategy is none.
fn aggregate(plan: &Plan, pre_entities: Vec<PreEntity>) -> Result<Vec<Entity>, ApiError> {
    let label = |index: usize| plan.labels.names[index].clone();
    let labelled: Vec<Labelled> = match plan.strategy {
        AggregationStrategy::None | AggregationStrategy::Simple => pre_entities
            .into_iter()
            .map(|pre| {
                let best = argmax(&pre.scores);
                Labelled {
                    entity: label(best),
                    score: pre.scores[best],
                    index: pre.index,
                    word: pre.word,
                    start: pre.start,
                    end: pre.end,
                }
            })
            .collect(),
        strategy => {
            let mut words = Vec::new();
            let mut group: Vec<PreEntity> = Vec::new();
            for pre in pre_entities {
                if !group.is_empty() && !pre.is_subword {
                    words.push(aggregate_word(plan, strategy, std::mem::take(&mut group))?);
                }
                group.push(pre);
            }
            if !group.is_empty() {
                words.push(aggregate_word(plan, strategy, group)?);
            }
            words
        }
    };
    if plan.strategy == AggregationStrategy::None {
        return Ok(labelled
            .into_iter()
            .map(|token| Entity::Token {
                entity: token.entity,
                score: f64::from(token.score),
                index: token.index,
                word: token.word,
                start: token.start,
                end: token.end,
            })
            .collect());
    }
    group_entities(plan, labelled)
}

/// One word from its tokens, labelled as the strategy says.
fn aggregate_word(
    plan: &Plan,
    strategy: AggregationStrategy,
    tokens: Vec<PreEntity>,
) -> Result<Labelled, ApiError> {
    let (Some(first), Some(last)) = (tokens.first(), tokens.last()) else {
        return Err(ApiError::Internal("an empty word".into()));
    };
    let (start, end, index) = (first.start, last.end, first.index);
    let (best, score) = match strategy {
        AggregationStrategy::First => {
            let best = argmax(&first.scores);
            (best, first.scores[best])
        }
        AggregationStrategy::Max => {
            // The first token holding the highest score.
            let mut chosen = first;
            let mut chosen_max = max_of(&first.scores);
            for token in &tokens[1..] {
                let token_max = max_of(&token.scores);
                if token_max > chosen_max {
                    chosen = token;
                    chosen_max = token_max;
                }
            }
            let best = argmax(&chosen.scores);
            (best, chosen.scores[best])
        }
        _ => {
            let average: Vec<f32> = (0..first.scores.len())
                .map(|label| nanmean(tokens.iter().map(|token| token.scores[label])))
                .collect();
            let best = argmax(&average);
            (best, average[best])
        }
    };
    let word = plan
        .tokenizer
        .tokens_to_string(tokens.into_iter().map(|token| token.word).collect())?;
    Ok(Labelled {
        entity: plan.labels.names[best].clone(),
        score,
        index,
        word,
        start,
        end,
    })
}

/// numpy's max of a row (NaN if any).
fn max_of(values: &[f32]) -> f32 {
    values[argmax(values)]
}

/// The B-/I- prefix of a label (I when there is none) and its tag.
fn split_tag(label: &str) -> (bool, &str) {
    if let Some(tag) = label.strip_prefix("B-") {
        (true, tag)
    } else if let Some(tag) = label.strip_prefix("I-") {
        (false, tag)
    } else {
        (false, label)
    }
}

/// Groups adjacent tokens or words of the same tag, a B- starting a new group.
fn group_entities(plan: &Plan, labelled: Vec<Labelled>) -> Result<Vec<Entity>, ApiError> {
    let mut groups = Vec::new();
    let mut current: Vec<Labelled> = Vec::new();
    for entity in labelled {
        if let Some(last) = current.last() {
            let (begins, tag) = split_tag(&entity.entity);
            let (_, last_tag) = split_tag(&last.entity);
            if tag != last_tag || begins {
                groups.push(group(plan, std::mem::take(&mut current))?);
            }
        }
        current.push(entity);
    }
    if !current.is_empty() {
        groups.push(group(plan, current)?);
    }
    Ok(groups)
}

/// One entity from adjacent tokens or words.
fn group(plan: &Plan, entities: Vec<Labelled>) -> Result<Entity, ApiError> {
    let (Some(first), Some(last)) = (entities.first(), entities.last()) else {
        return Err(ApiError::Internal("an empty entity group".into()));
    };
    // The tag after the first "-", as the pipeline splits it.
    let entity_group = first
        .entity
        .split_once('-')
        .map_or(first.entity.as_str(), |(_, tag)| tag)
        .to_string();
    let (start, end) = (first.start, last.end);
    let score = nanmean(entities.iter().map(|entity| entity.score));
    let word = plan
        .tokenizer
        .tokens_to_string(entities.into_iter().map(|entity| entity.word).collect())?;
    Ok(Entity::Group {
        entity_group,
        score: f64::from(score),
        word,
        start,
        end,
    })
}

/// Merges the entities of overlapping windows: by start, an entity starting inside the previous
/// one replaces it when longer, or as long and more confident.
fn merge_overlapping(mut entities: Vec<Entity>) -> Vec<Entity> {
    entities.sort_by_key(Entity::start);
    let mut merged = Vec::new();
    let mut entities = entities.into_iter();
    let Some(mut previous) = entities.next() else {
        return merged;
    };
    for entity in entities {
        if previous.start() <= entity.start() && entity.start() < previous.end() {
            let length = entity.end() - entity.start();
            let previous_length = previous.end() - previous.start();
            if length > previous_length
                || (length == previous_length && entity.score() > previous.score())
            {
                previous = entity;
            }
        } else {
            merged.push(std::mem::replace(&mut previous, entity));
        }
    }
    merged.push(previous);
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::tokenizer::tests::bert_tokenizer;
    use candlewick_engine::encoder::labels::ScoreFunction;
    use candlewick_engine::encoder::EncoderTask;
    use serde_json::json;

    const LABELS: [&str; 5] = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"];

    fn info(max_sequence_tokens: usize) -> EncoderInfo {
        EncoderInfo {
            labels: Some(Labels {
                names: LABELS.iter().map(|s| s.to_string()).collect(),
                default_function: ScoreFunction::Softmax,
            }),
            max_sequence_tokens,
            hidden_size: 4,
            contract: crate::pipelines::tests::contract(EncoderTask::TokenClassification),
        }
    }

    /// Logits that make `label` the clear winner with probability about `p`.
    fn row(label: usize, strength: f32) -> Vec<f32> {
        let mut row = vec![0.0; LABELS.len()];
        row[label] = strength;
        row
    }

    fn tokenizer() -> PipelineTokenizer {
        bert_tokenizer(&["sarah", "jo", "##nes", "lives", "in", "new", "york", "."])
    }

    fn run(text: &str, parameters: Value, labels: &[(usize, f32)]) -> Value {
        let tokenizer = tokenizer();
        let parameters = Parameters::parse(Some(&parameters)).unwrap();
        let prepared = prepare(&tokenizer, &info(64), &json!(text), &parameters).unwrap();
        assert_eq!(prepared.inputs.len(), 1);
        let mut rows = vec![row(0, 5.0)];
        rows.extend(labels.iter().map(|&(label, strength)| row(label, strength)));
        rows.push(row(0, 5.0));
        assert_eq!(rows.len(), prepared.inputs[0].ids.len());
        let output = finish(prepared.plan, vec![EncoderOutput::Tokens(rows)]).unwrap();
        serde_json::to_value(output).unwrap()
    }

    fn p(label: usize, strength: f32) -> f64 {
        f64::from(softmax(&row(label, strength))[label])
    }

    // "Sarah Jones lives in New York." -> sarah jo ##nes lives in new york .
    const TEXT: &str = "Sarah Jones lives in New York.";

    #[test]
    fn none_answers_each_token_with_its_index_and_offsets() {
        let labels = [
            (1, 2.0),
            (2, 3.0),
            (2, 1.0),
            (0, 4.0),
            (0, 4.0),
            (3, 2.0),
            (4, 2.0),
            (0, 1.0),
        ];
        let answer = run(TEXT, json!({}), &labels);
        assert_eq!(
            answer,
            json!([
                {"entity": "B-PER", "score": p(1, 2.0), "index": 1, "word": "sarah", "start": 0, "end": 5},
                {"entity": "I-PER", "score": p(2, 3.0), "index": 2, "word": "jo", "start": 6, "end": 8},
                {"entity": "I-PER", "score": p(2, 1.0), "index": 3, "word": "##nes", "start": 8, "end": 11},
                {"entity": "B-LOC", "score": p(3, 2.0), "index": 6, "word": "new", "start": 21, "end": 24},
                {"entity": "I-LOC", "score": p(4, 2.0), "index": 7, "word": "york", "start": 25, "end": 29},
            ])
        );
    }

    #[test]
    fn simple_groups_adjacent_tags_and_averages_scores() {
        let labels = [
            (1, 2.0),
            (2, 3.0),
            (2, 1.0),
            (0, 4.0),
            (0, 4.0),
            (3, 2.0),
            (3, 2.0),
            (0, 1.0),
        ];
        let answer = run(TEXT, json!({"aggregation_strategy": "SIMPLE"}), &labels);
        let per = nanmean([p(1, 2.0) as f32, p(2, 3.0) as f32, p(2, 1.0) as f32]);
        assert_eq!(
            answer,
            json!([
                {"entity_group": "PER", "score": f64::from(per), "word": "sarah jones", "start": 0, "end": 11},
                {"entity_group": "LOC", "score": p(3, 2.0), "word": "new", "start": 21, "end": 24},
                {"entity_group": "LOC", "score": p(3, 2.0), "word": "york", "start": 25, "end": 29},
            ])
        );
        // ignore_labels: [] keeps the O groups.
        let answer = run(
            TEXT,
            json!({"aggregation_strategy": "simple", "ignore_labels": []}),
            &labels,
        );
        let groups: Vec<&str> = answer
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["entity_group"].as_str().unwrap())
            .collect();
        assert_eq!(groups, ["PER", "O", "LOC", "LOC", "O"]);
    }

    #[test]
    fn word_strategies_make_words_agree() {
        // "jones" = jo (B-LOC, weak) + ##nes (I-PER, strong).
        let labels = [
            (1, 2.0),
            (3, 0.5),
            (2, 4.0),
            (0, 4.0),
            (0, 4.0),
            (0, 4.0),
            (0, 4.0),
            (0, 4.0),
        ];
        let first = run(TEXT, json!({"aggregation_strategy": "first"}), &labels);
        assert_eq!(first[0]["word"], "sarah");
        assert_eq!(first[1]["entity_group"], "LOC");
        assert_eq!(first[1]["word"], "jones");
        assert_eq!(first[1]["score"], json!(p(3, 0.5)));
        let max = run(TEXT, json!({"aggregation_strategy": "max"}), &labels);
        assert_eq!(max.as_array().unwrap().len(), 1);
        assert_eq!(max[0]["word"], "sarah jones");
        assert_eq!(
            (max[0]["start"].clone(), max[0]["end"].clone()),
            (json!(0), json!(11))
        );
        let average = run(TEXT, json!({"aggregation_strategy": "average"}), &labels);
        let jo = softmax(&row(3, 0.5));
        let nes = softmax(&row(2, 4.0));
        let mean: Vec<f32> = (0..5).map(|l| nanmean([jo[l], nes[l]])).collect();
        let expected = nanmean([softmax(&row(1, 2.0))[1], mean[2]]);
        assert_eq!(average[0]["score"], json!(f64::from(expected)));
        assert_eq!(average[0]["word"], "sarah jones");
    }

    #[test]
    fn deprecated_grouping_flags_pick_the_strategy() {
        let labels = [
            (1, 2.0),
            (3, 0.5),
            (2, 4.0),
            (0, 4.0),
            (0, 4.0),
            (0, 4.0),
            (0, 4.0),
            (0, 4.0),
        ];
        let grouped = run(
            TEXT,
            json!({"grouped_entities": true, "ignore_subwords": true, "aggregation_strategy": "none"}),
            &labels,
        );
        assert_eq!(
            grouped,
            run(TEXT, json!({"aggregation_strategy": "first"}), &labels)
        );
    }

    #[test]
    fn unknown_tokens_take_the_text_they_cover() {
        let answer = run(
            "Sarah Zoë",
            json!({"ignore_labels": []}),
            &[(1, 2.0), (2, 2.0)],
        );
        assert_eq!(answer[1]["word"], "Zoë");
        assert_eq!(
            (answer[1]["start"].clone(), answer[1]["end"].clone()),
            (json!(6), json!(9))
        );
    }

    #[test]
    fn stride_reads_overlapping_windows_and_merges_their_entities() {
        let tokenizer = tokenizer();
        // 6 tokens a window: 4 of text, 2 shared.
        let parameters = Parameters::parse(Some(
            &json!({"stride": 2, "aggregation_strategy": "simple"}),
        ))
        .unwrap();
        let prepared = prepare(&tokenizer, &info(6), &json!([TEXT]), &parameters).unwrap();
        let windows: Vec<Vec<u32>> = prepared
            .inputs
            .iter()
            .map(|input| input.ids.clone())
            .collect();
        assert_eq!(
            windows,
            [
                vec![2, 5, 6, 7, 8, 3],
                vec![2, 7, 8, 9, 10, 3],
                vec![2, 9, 10, 11, 12, 3]
            ]
        );
        // Window 1 sees "sarah jones" as PER; window 2 a longer PER from "##nes" to "in", which
        // replaces it where they overlap; window 3 sees "new york".
        let outputs = vec![
            EncoderOutput::Tokens(vec![
                row(0, 5.0),
                row(1, 2.0),
                row(2, 2.0),
                row(2, 2.0),
                row(0, 2.0),
                row(0, 5.0),
            ]),
            EncoderOutput::Tokens(vec![
                row(0, 5.0),
                row(1, 2.0),
                row(2, 2.0),
                row(2, 3.0),
                row(0, 2.0),
                row(0, 5.0),
            ]),
            EncoderOutput::Tokens(vec![
                row(0, 5.0),
                row(0, 2.0),
                row(3, 2.0),
                row(4, 2.0),
                row(0, 2.0),
                row(0, 5.0),
            ]),
        ];
        let answer = serde_json::to_value(finish(prepared.plan, outputs).unwrap()).unwrap();
        let spans: Vec<(String, u64, u64)> = answer[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["word"].as_str().unwrap().to_string(),
                    e["start"].as_u64().unwrap(),
                    e["end"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            spans,
            [
                ("##nes lives in".to_string(), 8, 20),
                ("new york".to_string(), 21, 29)
            ]
        );
    }

    #[test]
    fn bad_parameters_are_refused() {
        let tokenizer = tokenizer();
        for parameters in [
            json!({"aggregation_strategy": "longest"}),
            json!({"stride": 2, "aggregation_strategy": "none"}),
            json!({"stride": 4, "aggregation_strategy": "simple"}),
            json!({"stride": -1}),
            json!({"ignore_labels": "O"}),
        ] {
            let error = Parameters::parse(Some(&parameters))
                .and_then(|parsed| prepare(&tokenizer, &info(6), &json!(TEXT), &parsed))
                .unwrap_err();
            assert_eq!(error.param(), Some("parameters"), "{parameters}: {error}");
        }
    }
}
