//! Constrained decoding: the tokens a grammar (a JSON schema, a regex, a choice list, a Lark
//! grammar) allows next, computed by llguidance over the model's vocabulary.
//!
//! A [`GrammarCompiler`] is built once per model from its tokenizer.json: every token's bytes go
//! into llguidance's token trie. [`GrammarCompiler::compile`] turns a [`Grammar`] into a
//! [`Constraint`], one per sequence, which gives the mask of allowed tokens before each step and
//! follows the sampled token after it.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::tokenizer::Tokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON document valid against this JSON schema.
    JsonSchema(Value),
    /// Any JSON object.
    JsonObject,
    /// Text matching this regular expression (Rust regex syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text in the language of this Lark grammar (llguidance's dialect).
    Lark(String),
}

/// Why a grammar cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    /// The model's tokenizer cannot be described to the grammar engine.
    #[error("structured outputs are unavailable for this model: {0}")]
    Unsupported(String),
    /// The grammar itself is invalid or unsatisfiable; llguidance's message.
    #[error("{0}")]
    Invalid(String),
    /// The grammar engine failed mid-generation.
    #[error("constrained decoding failed: {0}")]
    Failed(String),
}

/// The key of a schema under which llguidance reads its layout options.
const JSON_LAYOUT: &str = "x-guidance";

/// Compiles grammars against one model's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field(
                "vocab_size",
                &self.factory.tok_env().tok_trie().vocab_size(),
            )
            .finish()
    }
}

impl GrammarCompiler {
    /// Reads every token's bytes from `tokenizer` (byte-level BPE as GPT-2's, or byte-fallback
    /// as Mistral's); `vocab_size` is the width of the model's logits, which may exceed the
    /// tokenizer's.
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self, GrammarError> {
        let json = tokenizer.shared().to_string(false).map_err(|e| {
            GrammarError::Unsupported(format!("cannot serialize the tokenizer: {e}"))
        })?;
        let json: Value = serde_json::from_str(&json)
            .map_err(|e| GrammarError::Unsupported(format!("cannot read the tokenizer: {e}")))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| GrammarError::Unsupported(e.to_string()))?;
        if words.len() > vocab_size {
            return Err(GrammarError::Unsupported(format!(
                "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
                words.len()
            )));
        }
        // Ids without bytes (holes in the vocabulary, the head's padding) become special tokens
        // no grammar ever allows.
        words.resize(vocab_size, Vec::new());
        for (id, word) in words.iter_mut().enumerate() {
            if word.is_empty() {
                let mut name = format!(".<[{id}]>").into_bytes();
                name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
                *word = name;
            }
        }
        let eos = tokenizer.eos_token_ids();
        let Some(&first_eos) = eos.first() else {
            return Err(GrammarError::Unsupported(
                "the model has no end-of-sequence token to end a structured output with".into(),
            ));
        };
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let mut trie = TokTrie::from(&info, &words);
        if eos.len() > 1 {
            trie = trie.with_eos_tokens(eos);
        }
        let env: TokEnv = Arc::new(TrieEnv { trie });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| GrammarError::Unsupported(e.to_string()))?;
        // Warnings go to the request's error, not to the server's stderr.
        factory.quiet();
        Ok(Self { factory })
    }

    /// A fresh constraint for one sequence; an invalid grammar is [`GrammarError::Invalid`]
    /// with llguidance's message.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        let top = match grammar {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(json_layout(schema)?),
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(json_layout(&json!({"type": "object"}))?)
            }
            Grammar::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Grammar::Choice(choices) => {
                if choices.is_empty() {
                    return Err(GrammarError::Invalid("the choice list is empty".into()));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| lark_literal(c)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| GrammarError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(GrammarError::Invalid(error));
        }
        Ok(Constraint {
            matcher,
            mask: None,
        })
    }
}

/// `schema` laid out as json.dumps writes JSON by default (`", "` and `": "`, no other
/// whitespace): what models have read most, and no room for a model to wander off into endless
/// whitespace. Options the schema's own `x-guidance` gives win.
fn json_layout(schema: &Value) -> Result<Value, GrammarError> {
    let mut schema = match schema {
        Value::Object(_) => schema.clone(),
        // JSON Schema's boolean schemas: `true` allows anything, `false` nothing.
        Value::Bool(true) => json!({}),
        Value::Bool(false) => {
            return Err(GrammarError::Invalid(
                "the schema `false` allows no document".into(),
            ))
        }
        other => {
            return Err(GrammarError::Invalid(format!(
                "a JSON schema is an object or a boolean, not {other}"
            )))
        }
    };
    let layout = json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    });
    if let Some(object) = schema.as_object_mut() {
        match object.get_mut(JSON_LAYOUT) {
            // The client's own options win.
            Some(Value::Object(own)) => {
                for (key, value) in layout.as_object().into_iter().flatten() {
                    own.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
            _ => {
                object.insert(JSON_LAYOUT.into(), layout);
            }
        }
    }
    Ok(schema)
}

/// `text` as a Lark string literal (JSON string syntax, DEL escaped too).
fn lark_literal(text: &str) -> String {
    let quoted = serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into());
    quoted.replace('\u{7f}', "\\u007f")
}

/// The vocabulary as llguidance sees it. Tokenizing only serves the grammar's forced bytes,
/// which the token trie's greedy split covers.
struct TrieEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// The mask for the next token, once computed.
    mask: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl Constraint {
    /// Computes the mask of the next token ahead of time (while the model runs its step).
    pub fn prepare(&mut self) -> Result<(), GrammarError> {
        if self.mask.is_none() {
            let mask = self
                .matcher
                .compute_mask()
                .map_err(|e| GrammarError::Failed(e.to_string()))?;
            self.mask = Some(mask);
        }
        Ok(())
    }

    /// The allowed next tokens as bit words (bit `t % 32` of word `t / 32` set for token `t`).
    pub fn mask(&mut self) -> Result<&[u32], GrammarError> {
        self.prepare()?;
        Ok(self.mask.as_ref().map_or(&[], |mask| mask.as_slice()))
    }

    /// Follows the sampled `token`.
    pub fn consume(&mut self, token: u32) -> Result<(), GrammarError> {
        self.mask = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Failed(e.to_string()))
    }

    /// Whether the grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
