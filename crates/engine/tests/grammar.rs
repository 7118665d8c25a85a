//! Constrained decoding over real vocabularies (the SentencePiece byte-fallback tokenizer of
//! Mistral and GPT-2's byte-level BPE, from tests/fixtures/detokenize): whatever the logits,
//! here random ones, every output sampled under a grammar's mask matches it, and a JSON output
//! parses and validates against its schema.

mod common;

use candlewick_engine::grammar::{Grammar, GrammarCompiler, GrammarError};
use candlewick_engine::sampling::{Sampler, SamplingParams};
use candlewick_engine::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use common::fixture_dir;

/// The model's logits are wider than some tokenizers (padding of the head).
const HEAD_PADDING: usize = 7;

fn tokenizer(family: &str, eos: u32) -> Tokenizer {
    let dir = fixture_dir("detokenize").join(family);
    let config = json!({ "eos_token_id": eos }).to_string();
    Tokenizer::from_model_files(
        &std::fs::read(dir.join("tokenizer.json")).unwrap(),
        std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .as_deref(),
        None,
        &config,
    )
    .unwrap()
}

struct Vocab {
    tokenizer: Tokenizer,
    compiler: GrammarCompiler,
    vocab_size: usize,
}

fn vocab(family: &str, eos: u32) -> Vocab {
    let tokenizer = tokenizer(family, eos);
    let vocab_size = tokenizer.shared().get_vocab_size(true) + HEAD_PADDING;
    let compiler = GrammarCompiler::new(&tokenizer, vocab_size).unwrap();
    Vocab {
        tokenizer,
        compiler,
        vocab_size,
    }
}

fn families() -> Vec<(&'static str, Vocab)> {
    vec![
        ("sentencepiece", vocab("sentencepiece", 2)),
        ("byte-level", vocab("byte-level", 50256)),
    ]
}

/// Samples under `grammar` from random logits until the grammar ends (or `limit` tokens);
/// the text, and whether it ended by itself.
fn generate(vocab: &Vocab, grammar: &Grammar, seed: u64, limit: usize) -> (String, bool) {
    let mut constraint = vocab.compiler.compile(grammar).unwrap();
    let mut sampler = Sampler::new(
        SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        },
        &[],
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let eos = vocab.tokenizer.eos_token_ids().to_vec();
    let mut tokens = Vec::new();
    for _ in 0..limit {
        let logits: Vec<f32> = (0..vocab.vocab_size)
            .map(|_| rng.random_range(-4.0f32..4.0))
            .collect();
        let mask = constraint.mask().unwrap();
        let token = sampler.sample_allowed(&logits, Some(mask)).unwrap().token;
        constraint.consume(token).unwrap();
        if eos.contains(&token) {
            assert!(constraint.is_finished());
            return (vocab.tokenizer.decode(&tokens, false).unwrap(), true);
        }
        tokens.push(token);
        if constraint.is_finished() {
            return (vocab.tokenizer.decode(&tokens, false).unwrap(), true);
        }
    }
    (vocab.tokenizer.decode(&tokens, false).unwrap(), false)
}

fn validator(schema: &Value) -> (boon::Schemas, boon::SchemaIndex) {
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource("schema.json", schema.clone())
        .unwrap();
    let index = compiler.compile("schema.json", &mut schemas).unwrap();
    (schemas, index)
}

#[test]
fn json_schema_outputs_parse_and_validate() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "admin": {"type": "boolean"},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "a \"quoted\" one"]},
                     "maxItems": 3},
            "home": {"$ref": "#/$defs/place"},
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]}
        },
        "required": ["name", "age", "admin", "home"],
        "additionalProperties": false,
        "$defs": {
            "place": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": false
            }
        }
    });
    let (schemas, index) = validator(&schema);
    for (family, vocab) in families() {
        for seed in 0..6 {
            let (text, ended) = generate(&vocab, &Grammar::JsonSchema(schema.clone()), seed, 600);
            assert!(ended, "{family} seed {seed}: did not end: {text}");
            let value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{family} seed {seed}: {e}: {text}"));
            if let Err(error) = schemas.validate(&value, index) {
                panic!("{family} seed {seed}: {text} breaks the schema: {error}");
            }
            // The layout is json.dumps's: separators ", " and ": ", no other whitespace.
            let object = value.as_object().unwrap();
            assert!(text.starts_with("{\"") && text.ends_with('}'), "{text}");
            assert!(text.contains("\"name\": "), "{text}");
            // No raw newline: not inside a JSON string, and not between tokens either.
            assert!(!text.contains('\n'), "{text}");
            assert!(object.contains_key("home"));
        }
    }
}

#[test]
fn json_object_regex_choice_and_lark_outputs_match() {
    let regex = regex_lite_match;
    for (family, vocab) in families() {
        for seed in 0..4 {
            let (text, ended) = generate(&vocab, &Grammar::JsonObject, seed, 1500);
            if ended {
                // Random logits write numbers of any length, some past f64's range, which
                // serde_json refuses though the JSON grammar allows them.
                match serde_json::from_str::<Value>(&text) {
                    Ok(value) => assert!(value.is_object(), "{text}"),
                    Err(e) => assert!(e.to_string().contains("number out of range"), "{e}: {text}"),
                }
            } else {
                assert!(text.starts_with('{'), "{text}");
            }

            let (text, ended) = generate(
                &vocab,
                &Grammar::Regex(r"(yes|no), [0-9]{3}-[a-z]{2}".into()),
                seed,
                100,
            );
            assert!(ended && regex(&text), "{family}: {text:?}");

            let choices = vec![
                "positive".to_string(),
                "negative".to_string(),
                "ne\"utral\" \u{e9}t\u{e9}".to_string(),
            ];
            let (text, ended) = generate(&vocab, &Grammar::Choice(choices.clone()), seed, 100);
            assert!(ended && choices.contains(&text), "{family}: {text:?}");

            let lark = r#"start: "sum(" num ("+" num)* ")"
num: /[1-9][0-9]?/"#;
            let (text, ended) = generate(&vocab, &Grammar::Lark(lark.into()), seed, 200);
            if ended {
                let inner = text
                    .strip_prefix("sum(")
                    .and_then(|t| t.strip_suffix(')'))
                    .unwrap_or_else(|| panic!("{family}: {text:?}"));
                for number in inner.split('+') {
                    let n: u32 = number.parse().unwrap_or_else(|_| panic!("{text:?}"));
                    assert!((1..100).contains(&n), "{text:?}");
                }
            }
        }
    }
}

/// `(yes|no), [0-9]{3}-[a-z]{2}`, whole.
fn regex_lite_match(text: &str) -> bool {
    let Some(rest) = text
        .strip_prefix("yes, ")
        .or_else(|| text.strip_prefix("no, "))
    else {
        return false;
    };
    let bytes = rest.as_bytes();
    bytes.len() == 6
        && bytes[..3].iter().all(u8::is_ascii_digit)
        && bytes[3] == b'-'
        && bytes[4..].iter().all(u8::is_ascii_lowercase)
}

#[test]
fn invalid_grammars_are_refused_with_llguidances_message() {
    let (_, vocab) = families().remove(0);
    let cases = [
        Grammar::JsonSchema(json!({"type": "strnig"})),
        Grammar::JsonSchema(json!(false)),
        Grammar::JsonSchema(json!(3)),
        Grammar::Regex("(unclosed".into()),
        Grammar::Lark("start: missing_rule".into()),
        Grammar::Choice(Vec::new()),
    ];
    for grammar in cases {
        match vocab.compiler.compile(&grammar) {
            Err(GrammarError::Invalid(message)) => assert!(!message.is_empty(), "{grammar:?}"),
            other => panic!("{grammar:?}: {other:?}"),
        }
    }
}

#[test]
fn a_wordpiece_vocabulary_is_unsupported() {
    let tokenizer = tokenizer("wordpiece", 102);
    let vocab_size = tokenizer.shared().get_vocab_size(true);
    match GrammarCompiler::new(&tokenizer, vocab_size) {
        Err(GrammarError::Unsupported(message)) => assert!(!message.is_empty()),
        other => panic!("{other:?}"),
    }
}
