//! Generated text against transformers 4.37.2's decode, `clean_up_tokenization_spaces` included,
//! for each tokenizer family: SentencePiece (Mistral, with and without cleanup), byte-level BPE
//! (GPT-2) and WordPiece (BERT uncased). The token sequences of tests/fixtures/detokenize are rich in
//! punctuation and contractions (made by make_detokenize_fixtures.py).

mod common;

use candlewick_engine::Tokenizer;
use serde::Deserialize;

use common::fixture_dir;

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    /// What the generated tokens add to the prompt's text, cleaned up when the tokenizer does.
    text: String,
    /// `tokenizer.decode(generated_ids, skip_special_tokens=True)`.
    decode: String,
}

fn load(family: &str) -> (Tokenizer, Vec<Case>) {
    let dir = fixture_dir("detokenize").join(family);
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let tokenizer = Tokenizer::from_model_files(
        &std::fs::read(dir.join("tokenizer.json")).unwrap(),
        read("tokenizer_config.json").ok().as_deref(),
        None,
        "{}",
    )
    .unwrap();
    let cases = serde_json::from_str(&read("cases.json").unwrap()).unwrap();
    (tokenizer, cases)
}

/// The deltas of `generated` after `prompt`, the flushed rest last.
fn deltas(tokenizer: &Tokenizer, prompt: &[u32], generated: &[u32]) -> Vec<String> {
    let mut decoder = tokenizer.incremental_decoder(prompt).unwrap();
    let mut deltas: Vec<String> = generated
        .iter()
        .filter_map(|&token| decoder.push(token).unwrap())
        .collect();
    deltas.push(decoder.flush().unwrap());
    deltas
}

fn check_family(family: &str, cleans_up: bool) {
    let (tokenizer, cases) = load(family);
    assert_eq!(tokenizer.cleans_up_spaces(), cleans_up, "{family}");
    let mut cleaned = 0;
    for case in &cases {
        let streamed = deltas(&tokenizer, &case.prompt_ids, &case.generated_ids).concat();
        assert_eq!(
            streamed, case.text,
            "{family}: prompt {:?}, generated {:?}",
            case.prompt_ids, case.generated_ids
        );
        // transformers' own call on the generated ids: what a generation without prompt text
        // shows, and what the whole-text decode gives.
        assert_eq!(
            tokenizer.decode(&case.generated_ids, true).unwrap(),
            case.decode,
            "{family}: {:?}",
            case.generated_ids
        );
        // Each prefix of the stream is already final: the deltas of a shorter generation are a
        // prefix of these (nothing emitted is taken back), once the held-back rest is left out.
        let cut = case.generated_ids.len() / 2;
        let shorter = deltas(&tokenizer, &case.prompt_ids, &case.generated_ids[..cut]);
        let settled = shorter[..shorter.len() - 1].concat();
        assert!(
            case.text.starts_with(&settled),
            "{family}: {settled:?} is not a prefix of {:?}",
            case.text
        );
        let raw = tokenizer
            .shared()
            .decode(&case.generated_ids, true)
            .unwrap();
        cleaned += usize::from(raw != case.decode);
    }
    if cleans_up {
        assert!(
            cleaned >= cases.len() / 5,
            "{family}: only {cleaned} of {} cases exercise the cleanup",
            cases.len()
        );
    } else {
        assert_eq!(cleaned, 0, "{family}");
    }
}

#[test]
fn sentencepiece_text_is_transformers_decode() {
    check_family("sentencepiece", false);
}

#[test]
fn sentencepiece_with_cleanup_text_is_transformers_decode() {
    check_family("sentencepiece-cleanup", true);
}

#[test]
fn byte_level_text_is_transformers_decode() {
    check_family("byte-level", true);
}

#[test]
fn wordpiece_text_is_transformers_decode() {
    check_family("wordpiece", true);
}
