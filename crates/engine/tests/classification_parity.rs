//! Mistral and Mixtral sequence classifiers against transformers 4.37.2, on the fixtures made by
//! tests/fixtures/make_mixtral_fixtures.py.

use std::path::{Path, PathBuf};

use candlewick_engine::encoder::labels::ScoreFunction;
use candlewick_engine::encoder::{EncoderInput, EncoderOutput, EncoderTask};
use candlewick_engine::{load_encoder, LoadOptions, ModelSource};
use serde::Deserialize;

/// Largest absolute difference allowed in logits and scores (f32).
const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Reference {
    problem_type: String,
    labels: Vec<String>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    logits: Vec<f32>,
    scores: Vec<f32>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/classifiers")
        .join(name)
}

fn assert_close(what: &str, actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= TOLERANCE,
            "{what}: index {i}: ours {a}, transformers {e}"
        );
    }
}

#[test]
fn classifiers_match_transformers_alone_and_in_a_batch() {
    for (name, expected_function) in [
        ("mistral-cls2", ScoreFunction::Softmax),
        ("mixtral-cls5", ScoreFunction::Sigmoid),
    ] {
        let text = std::fs::read_to_string(fixture(name).join("classification.json")).unwrap();
        let reference: Reference = serde_json::from_str(&text).unwrap();
        let loaded =
            load_encoder(&ModelSource::Dir(fixture(name)), &LoadOptions::default()).unwrap();
        assert_eq!(loaded.model.task(), EncoderTask::SequenceClassification);
        let labels = loaded.model.labels().expect("a classifier has labels");
        let classify = |sequences: &[Vec<u32>]| -> Vec<Vec<f32>> {
            let inputs: Vec<EncoderInput> = sequences
                .iter()
                .map(|ids| EncoderInput::single(ids.clone()))
                .collect();
            loaded
                .model
                .forward(&inputs)
                .unwrap()
                .into_iter()
                .map(|output| match output {
                    EncoderOutput::Sequence(logits) => logits,
                    other => panic!("{name}: a classifier answered {other:?}"),
                })
                .collect()
        };
        assert_eq!(labels.names, reference.labels, "{name}");
        assert_eq!(
            labels.default_function, expected_function,
            "{name} ({})",
            reference.problem_type
        );

        for case in &reference.cases {
            assert_eq!(
                loaded.tokenizer.encode(&case.text, true).unwrap(),
                case.ids,
                "{name}: {:?}",
                case.text
            );
            let logits = classify(std::slice::from_ref(&case.ids));
            assert_close(
                &format!("{name} {:?} logits", case.text),
                &logits[0],
                &case.logits,
            );
            let scores = labels.default_function.apply(&logits[0]);
            assert_close(
                &format!("{name} {:?} scores", case.text),
                &scores,
                &case.scores,
            );
        }
        let all: Vec<Vec<u32>> = reference.cases.iter().map(|c| c.ids.clone()).collect();
        let batch = classify(&all);
        for (case, logits) in reference.cases.iter().zip(&batch) {
            assert_close(
                &format!("{name} {:?} in a batch", case.text),
                logits,
                &case.logits,
            );
        }
    }
}

#[test]
fn a_generator_checkpoint_is_not_a_classifier() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mistral/w4-gqa1");
    let error = load_encoder(&ModelSource::Dir(dir), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("MistralForCausalLM") && error.contains("MistralForSequenceClassification"),
        "{error}"
    );
}
