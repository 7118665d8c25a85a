//! The tokenizer as the pipelines see it: tokenizer.json with the settings transformers reads from
//! tokenizer_config.json (special tokens, `model_max_length`, `padding_side`,
//! `clean_up_tokenization_spaces`).

use std::sync::Arc;

use serde_json::Value;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::ModelWrapper;
use tokenizers::{truncate_encodings, Decoder, Encoding, PostProcessor, TruncationParams};

use candlewick_engine::detokenizer::clean_up_tokenization;
use candlewick_engine::tokenizer::cleans_up_tokenization_spaces;

use crate::error::ApiError;

/// A tokenizer with what the pipelines need to know about its special tokens and limits.
#[derive(Clone)]
pub struct PipelineTokenizer {
    /// tokenizer.json with its own truncation and padding turned off: the pipelines set both per
    /// call, as transformers' fast tokenizers do.
    tokenizer: Arc<tokenizers::Tokenizer>,
    cls_id: Option<u32>,
    pad_id: Option<u32>,
    unk_id: Option<u32>,
    mask: Option<(String, u32)>,
    model_max_length: Option<usize>,
    padding_left: bool,
    clean_up_tokenization_spaces: bool,
}

impl std::fmt::Debug for PipelineTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineTokenizer")
            .field("cls_id", &self.cls_id)
            .field("pad_id", &self.pad_id)
            .field("unk_id", &self.unk_id)
            .field("mask", &self.mask)
            .field("model_max_length", &self.model_max_length)
            .field("padding_left", &self.padding_left)
            .finish_non_exhaustive()
    }
}

/// Names tried, in order, for a special token that tokenizer_config.json does not name.
const CLS_NAMES: [&str; 2] = ["[CLS]", "<s>"];
const PAD_NAMES: [&str; 2] = ["[PAD]", "<pad>"];
const UNK_NAMES: [&str; 2] = ["[UNK]", "<unk>"];
const MASK_NAMES: [&str; 2] = ["[MASK]", "<mask>"];

impl PipelineTokenizer {
    /// Wraps `tokenizer` (tokenizer.json) with the settings of `tokenizer_config` (the text of
    /// tokenizer_config.json, when the model has one). Special tokens the config does not name
    /// are looked up by their usual BERT and RoBERTa names.
    pub fn new(
        tokenizer: &tokenizers::Tokenizer,
        tokenizer_config: Option<&str>,
    ) -> Result<Self, ApiError> {
        let config: Value = match tokenizer_config {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                ApiError::Internal(format!("tokenizer_config.json is not JSON: {e}"))
            })?,
            None => Value::Null,
        };
        let mut plain = tokenizer.clone();
        plain
            .with_truncation(None)
            .map_err(|e| ApiError::Internal(format!("cannot reset the truncation: {e}")))?;
        plain.with_padding(None);
        let id_of = |key: &str, fallbacks: &[&str]| -> Option<(String, u32)> {
            match special_token(&config, key) {
                // transformers maps a token missing from the vocabulary to the unknown token.
                Some(token) => plain
                    .token_to_id(&token)
                    .or_else(|| {
                        special_token(&config, "unk_token").and_then(|unk| plain.token_to_id(&unk))
                    })
                    .map(|id| (token, id)),
                None => fallbacks
                    .iter()
                    .find_map(|name| plain.token_to_id(name).map(|id| (name.to_string(), id))),
            }
        };
        let model_max_length = config
            .get("model_max_length")
            .and_then(Value::as_u64)
            .map(|length| usize::try_from(length).unwrap_or(usize::MAX));
        Ok(Self {
            cls_id: id_of("cls_token", &CLS_NAMES).map(|(_, id)| id),
            pad_id: id_of("pad_token", &PAD_NAMES).map(|(_, id)| id),
            unk_id: id_of("unk_token", &UNK_NAMES).map(|(_, id)| id),
            mask: id_of("mask_token", &MASK_NAMES),
            model_max_length,
            padding_left: config.get("padding_side").and_then(Value::as_str) == Some("left"),
            clean_up_tokenization_spaces: cleans_up_tokenization_spaces(&config),
            tokenizer: Arc::new(plain),
        })
    }

    /// The longest sequence the pipelines truncate to: the tokenizer's `model_max_length`, within
    /// what the served model takes.
    pub(crate) fn max_length(&self, max_sequence_tokens: usize) -> usize {
        self.model_max_length.map_or(max_sequence_tokens, |length| {
            length.min(max_sequence_tokens)
        })
    }

    /// `model_max_length` from tokenizer_config.json, if it names one.
    pub(crate) fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Whether the tokenizer pads on the left (question answering then puts the context first).
    pub(crate) fn padding_left(&self) -> bool {
        self.padding_left
    }

    /// The id of the classifier token (`[CLS]`).
    pub(crate) fn cls_id(&self) -> Option<u32> {
        self.cls_id
    }

    /// The id of the padding token.
    pub(crate) fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The id of the unknown token.
    pub(crate) fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// The mask token and its id.
    pub(crate) fn mask(&self) -> Option<(&str, u32)> {
        self.mask.as_ref().map(|(token, id)| (token.as_str(), *id))
    }

    /// Special tokens the post-processor adds to one sequence or to a pair.
    pub(crate) fn added_tokens(&self, pair: bool) -> usize {
        self.tokenizer
            .get_post_processor()
            .map_or(0, |processor| processor.added_tokens(pair))
    }

    /// Encodes a text or a pair with character offsets and special tokens, truncated as
    /// `truncation` says (its `max_length` counting the special tokens); the windows beyond the
    /// first are in the encoding's overflowing list.
    ///
    /// Truncation runs as transformers' fast tokenizers run it (truncate the bare sequences, then
    /// add the special tokens), but step by step: tokenizers 0.23 stops tokenizing a sequence at
    /// `max_length` tokens when truncation is set on the tokenizer, which loses the overflowing
    /// windows a stride asks for.
    pub(crate) fn encode(
        &self,
        text: &str,
        pair: Option<&str>,
        truncation: Option<TruncationParams>,
    ) -> Result<Encoding, ApiError> {
        let failed =
            |e: tokenizers::Error| ApiError::invalid("inputs", format!("cannot tokenize: {e}"));
        let Some(params) = truncation else {
            let encoded = match pair {
                Some(pair) => self.tokenizer.encode_char_offsets((text, pair), true),
                None => self.tokenizer.encode_char_offsets(text, true),
            };
            return encoded.map_err(failed);
        };
        let first = self
            .tokenizer
            .encode_char_offsets(text, false)
            .map_err(failed)?;
        let second = pair
            .map(|pair| {
                // The windows of the second text keep these type ids, as the tokenizer gives
                // them when it encodes a pair.
                self.tokenizer
                    .encode_char_offsets(pair, false)
                    .map(|mut encoding| {
                        encoding.set_type_ids(vec![1; encoding.len()]);
                        encoding
                    })
            })
            .transpose()
            .map_err(failed)?;
        let added = self.added_tokens(second.is_some());
        let max_length = params.max_length.checked_sub(added).filter(|&m| m > 0).ok_or_else(|| {
            ApiError::invalid(
                "inputs",
                format!("a limit of {} tokens leaves no room for text next to the {added} special tokens", params.max_length),
            )
        })?;
        let (first, second) = truncate_encodings(
            first,
            second,
            &TruncationParams {
                max_length,
                ..params
            },
        )
        .map_err(failed)?;
        self.tokenizer
            .post_process(first, second, true)
            .map_err(failed)
    }

    /// Token ids of `text` without special tokens.
    pub(crate) fn ids_without_specials(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| ApiError::invalid("inputs", format!("cannot tokenize: {e}")))
    }

    /// The vocabulary's token for `id` (`convert_ids_to_tokens`).
    pub(crate) fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The token id of `token` in the vocabulary, added tokens included.
    pub(crate) fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Size of the vocabulary, added tokens included.
    pub(crate) fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Whether the model marks word continuations (`##` for WordPiece): then a token is part of
    /// the previous word exactly when its text is not the text it covers.
    pub(crate) fn has_continuing_subword_prefix(&self) -> bool {
        match self.tokenizer.get_model() {
            ModelWrapper::WordPiece(model) => !model.continuing_subword_prefix.is_empty(),
            ModelWrapper::BPE(model) => model
                .continuing_subword_prefix
                .as_ref()
                .is_some_and(|prefix| !prefix.is_empty()),
            ModelWrapper::WordLevel(_) | ModelWrapper::Unigram(_) => false,
        }
    }

    /// Joins tokens into text with the tokenizer's decoder (`convert_tokens_to_string`).
    pub(crate) fn tokens_to_string(&self, tokens: Vec<String>) -> Result<String, ApiError> {
        match self.tokenizer.get_decoder() {
            Some(decoder) => decode_tokens(decoder, tokens),
            None => Ok(tokens.join(" ")),
        }
    }

    /// The text of `ids` as transformers' `decode` gives it: the tokenizer's decoder, then the
    /// clean-up of spaces before punctuation when tokenizer_config.json asks for it.
    pub(crate) fn decode(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<String, ApiError> {
        let text = self
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| ApiError::Internal(format!("cannot decode: {e}")))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }
}

fn decode_tokens(decoder: &DecoderWrapper, tokens: Vec<String>) -> Result<String, ApiError> {
    decoder
        .decode(tokens)
        .map_err(|e| ApiError::Internal(format!("cannot decode: {e}")))
}

/// A special token given either as a string or as an AddedToken object `{"content": ...}`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(token) => Some(token.clone()),
        Value::Object(token) => token.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A WordPiece tokenizer like the fixtures' (lowercasing BERT normalizer, `[CLS] A [SEP] B
    /// [SEP]`), over a small vocabulary.
    pub(crate) fn bert_tokenizer(words: &[&str]) -> PipelineTokenizer {
        let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        vocab.extend(words.iter().map(|s| s.to_string()));
        let vocab_json: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, token)| (token.clone(), Value::from(i)))
            .collect();
        let added: Vec<Value> = (0..5)
            .map(|i| {
                serde_json::json!({"id": i, "content": vocab[i], "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": {"direction": "Right", "max_length": 7, "strategy": "LongestFirst", "stride": 0},
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                "strip_accents": null, "lowercase": true},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                    {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
                "special_tokens": {
                    "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                    "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                "max_input_chars_per_word": 100, "vocab": vocab_json}
        });
        let tokenizer = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes()).unwrap();
        PipelineTokenizer::new(
            &tokenizer,
            Some(r#"{"model_max_length": 512, "mask_token": "[MASK]"}"#),
        )
        .unwrap()
    }

    #[test]
    fn special_tokens_limits_and_offsets_follow_the_config() {
        let tokenizer = bert_tokenizer(&["naive", "cafe", "un", "##believ", "##ably"]);
        assert_eq!(tokenizer.cls_id(), Some(2));
        assert_eq!(tokenizer.pad_id(), Some(0));
        assert_eq!(tokenizer.unk_id(), Some(1));
        assert_eq!(tokenizer.mask(), Some(("[MASK]", 4)));
        assert_eq!(tokenizer.max_length(128), 128);
        assert_eq!(tokenizer.max_length(1024), 512);
        assert_eq!(
            (tokenizer.added_tokens(false), tokenizer.added_tokens(true)),
            (2, 3)
        );
        assert!(tokenizer.has_continuing_subword_prefix());
        // tokenizer.json's own truncation (7 tokens) is off; offsets count characters.
        let encoding = tokenizer
            .encode("Naïve café unbelievably naive naive", None, None)
            .unwrap();
        assert_eq!(encoding.get_ids(), &[2, 5, 6, 7, 8, 9, 5, 5, 3]);
        assert_eq!(encoding.get_offsets()[2], (6, 10));
        assert_eq!(encoding.get_offsets()[5], (19, 23));
        assert_eq!(
            tokenizer.decode(encoding.get_ids(), true).unwrap(),
            "naive cafe unbelievably naive naive"
        );
        assert_eq!(
            tokenizer
                .tokens_to_string(vec!["un".into(), "##believ".into(), "##ably".into()])
                .unwrap(),
            "unbelievably"
        );
    }
}
