//! The encoder pipelines against transformers 4.37.2, on every case of every pipeline.json that
//! tests/fixtures/make_encoder_fixtures.py wrote under tests/fixtures/encoders/<variant>/<head>/.
//!
//! Each case holds a task, its inputs and parameters, and what `pipeline(task)(inputs,
//! **parameters)` returned. We load the fixture's model, run `prepare`, the model's forward on the
//! prepared sequences (one forward per sequence, as the pipelines run them) and `finish`, and
//! compare the answer with the pipeline's: the same shape, keys and order; labels, entities,
//! words, tokens, sequences, answers and character offsets identical; every score within
//! |ours - transformers| <= 1e-4 and within 1e-3 of it relatively (question-answering scores are
//! products of probabilities near 1e-4, where an absolute tolerance alone would check nothing).
//!
//! CANDLEWICK_ENCODER_FIXTURES points the test at another fixtures tree.

use std::path::{Path, PathBuf};

use candlewick_engine::EncoderOutput;
use candlewick_engine::{load_encoder, EncoderModel, LoadOptions, LoadedEncoder, ModelSource};
use candlewick_scheduler::EncoderInfo;
use candlewick_server::pipelines::{
    fill_mask, question_answering, text_classification, token_classification, PipelineTokenizer,
};
use serde::Deserialize;
use serde_json::Value;

/// Largest absolute difference allowed between a score and transformers'.
const ABSOLUTE_TOLERANCE: f64 = 1e-4;
/// Largest difference allowed relative to transformers' score.
const RELATIVE_TOLERANCE: f64 = 1e-3;

/// One call of a pipeline and what it returned.
#[derive(Debug, Deserialize)]
struct Case {
    task: String,
    inputs: Value,
    parameters: Value,
    output: Value,
}

fn fixtures_root() -> PathBuf {
    match std::env::var_os("CANDLEWICK_ENCODER_FIXTURES") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/encoders"),
    }
}

/// Every `<variant>/<head>` directory holding a pipeline.json, sorted.
fn pipeline_fixtures() -> Vec<PathBuf> {
    let root = fixtures_root();
    let mut dirs = Vec::new();
    for variant in std::fs::read_dir(&root).expect("the encoder fixtures directory") {
        let variant = variant.unwrap().path();
        if !variant.is_dir() {
            continue;
        }
        for head in std::fs::read_dir(&variant).unwrap() {
            let head = head.unwrap().path();
            if head.join("pipeline.json").is_file() {
                dirs.push(head);
            }
        }
    }
    dirs.sort();
    dirs
}

fn fixture_name(dir: &Path) -> String {
    let parts: Vec<_> = dir.iter().rev().take(2).collect();
    format!(
        "{}/{}",
        parts[1].to_string_lossy(),
        parts[0].to_string_lossy()
    )
}

/// The fixture's model, its pipeline tokenizer and what the scheduler would report about it.
struct Fixture {
    model: Box<dyn EncoderModel>,
    tokenizer: PipelineTokenizer,
    info: EncoderInfo,
}

fn load(dir: &Path) -> Fixture {
    let LoadedEncoder {
        model,
        tokenizer,
        tokenizer_config,
        ..
    } = load_encoder(
        &ModelSource::Dir(dir.to_path_buf()),
        &LoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let tokenizer = PipelineTokenizer::new(&tokenizer.shared(), tokenizer_config.as_deref())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let info = EncoderInfo::of(model.as_ref(), usize::MAX);
    Fixture {
        model,
        tokenizer,
        info,
    }
}

impl Fixture {
    /// Runs each sequence alone, as the pipelines do.
    fn forward(&self, inputs: &[candlewick_engine::EncoderInput]) -> Vec<EncoderOutput> {
        inputs
            .iter()
            .flat_map(|input| {
                self.model
                    .forward(std::slice::from_ref(input))
                    .expect("the forward pass")
            })
            .collect()
    }

    /// prepare, forward, finish: the answer as JSON, or the refusal's message.
    fn run(&self, case: &Case) -> Result<Value, String> {
        let parameters = Some(&case.parameters);
        let (tokenizer, info, inputs) = (&self.tokenizer, &self.info, &case.inputs);
        let refused = |e: candlewick_server::error::ApiError| e.to_string();
        let answer = match case.task.as_str() {
            "text-classification" => {
                let parameters =
                    text_classification::Parameters::parse(parameters).map_err(refused)?;
                let prepared = text_classification::prepare(tokenizer, info, inputs, &parameters)
                    .map_err(refused)?;
                let outputs = self.forward(&prepared.inputs);
                serde_json::to_value(
                    text_classification::finish(prepared.plan, outputs).map_err(refused)?,
                )
            }
            "token-classification" => {
                let parameters =
                    token_classification::Parameters::parse(parameters).map_err(refused)?;
                let prepared = token_classification::prepare(tokenizer, info, inputs, &parameters)
                    .map_err(refused)?;
                let outputs = self.forward(&prepared.inputs);
                serde_json::to_value(
                    token_classification::finish(prepared.plan, outputs).map_err(refused)?,
                )
            }
            "question-answering" => {
                let parameters =
                    question_answering::Parameters::parse(parameters).map_err(refused)?;
                let prepared = question_answering::prepare(tokenizer, info, inputs, &parameters)
                    .map_err(refused)?;
                let outputs = self.forward(&prepared.inputs);
                serde_json::to_value(
                    question_answering::finish(prepared.plan, outputs).map_err(refused)?,
                )
            }
            "fill-mask" => {
                let parameters = fill_mask::Parameters::parse(parameters).map_err(refused)?;
                let prepared =
                    fill_mask::prepare(tokenizer, info, inputs, &parameters).map_err(refused)?;
                let outputs = self.forward(&prepared.inputs);
                serde_json::to_value(fill_mask::finish(prepared.plan, outputs).map_err(refused)?)
            }
            other => return Err(format!("no pipeline for the task {other:?}")),
        };
        answer.map_err(|e| e.to_string())
    }
}

/// The first difference between our answer and the pipeline's, with its path in the answer.
fn first_difference(path: &str, ours: &Value, theirs: &Value) -> Option<String> {
    match (ours, theirs) {
        (Value::Number(a), Value::Number(b)) if a.is_f64() || b.is_f64() => {
            let (a, b) = (a.as_f64()?, b.as_f64()?);
            let difference = (a - b).abs();
            (difference > ABSOLUTE_TOLERANCE || difference > RELATIVE_TOLERANCE * b.abs())
                .then(|| format!("{path}: {a} vs transformers' {b} (difference {difference:e})"))
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Some(format!(
                    "{path}: {} items vs transformers' {}",
                    a.len(),
                    b.len()
                ));
            }
            a.iter()
                .zip(b)
                .enumerate()
                .find_map(|(i, (a, b))| first_difference(&format!("{path}[{i}]"), a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            let keys = |map: &serde_json::Map<String, Value>| {
                let mut keys: Vec<String> = map.keys().cloned().collect();
                keys.sort();
                keys
            };
            if keys(a) != keys(b) {
                return Some(format!(
                    "{path}: keys {:?} vs transformers' {:?}",
                    keys(a),
                    keys(b)
                ));
            }
            b.iter()
                .find_map(|(key, b)| first_difference(&format!("{path}.{key}"), &a[key], b))
        }
        _ => (ours != theirs).then(|| format!("{path}: {ours} vs transformers' {theirs}")),
    }
}

/// Runs every case of every fixture of `task`'s head and fails with the first difference of each
/// failing case. Returns the number of cases checked.
fn check_task(task: &str) -> usize {
    let mut checked = 0;
    let mut failures = Vec::new();
    for dir in pipeline_fixtures() {
        let text = std::fs::read_to_string(dir.join("pipeline.json")).unwrap();
        let cases: Vec<Case> = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: pipeline.json: {e}", dir.display()));
        if !cases.iter().any(|case| case.task == task) {
            continue;
        }
        let fixture = load(&dir);
        for (i, case) in cases.iter().enumerate().filter(|(_, c)| c.task == task) {
            let name = format!(
                "{} case {i} ({} {})",
                fixture_name(&dir),
                case.inputs,
                case.parameters
            );
            checked += 1;
            match fixture.run(case) {
                Err(refusal) => failures.push(format!("{name}: refused: {refusal}")),
                Ok(answer) => {
                    if let Some(difference) = first_difference("answer", &answer, &case.output) {
                        failures.push(format!("{name}: {difference}"));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} {task} cases differ from transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    checked
}

#[test]
fn every_fixture_case_is_checked() {
    let mut tasks = std::collections::BTreeMap::<String, usize>::new();
    for dir in pipeline_fixtures() {
        let text = std::fs::read_to_string(dir.join("pipeline.json")).unwrap();
        let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
        for case in cases {
            *tasks.entry(case.task).or_default() += 1;
        }
    }
    let known = [
        "fill-mask",
        "question-answering",
        "text-classification",
        "token-classification",
    ];
    assert!(
        tasks.keys().all(|task| known.contains(&task.as_str())),
        "a pipeline.json has a task this test does not run: {tasks:?}"
    );
    assert!(
        known.iter().all(|task| tasks.contains_key(*task)),
        "no fixture case for some task: {tasks:?}"
    );
}

/// Asserts that the default fixtures tree still holds all its cases of a task (another tree, from
/// CANDLEWICK_ENCODER_FIXTURES, may hold any number).
fn assert_all_cases(task: &str, checked: usize, expected: usize) {
    if std::env::var_os("CANDLEWICK_ENCODER_FIXTURES").is_none() {
        assert!(
            checked >= expected,
            "only {checked} {task} cases, expected {expected}"
        );
    }
}

#[test]
fn text_classification_matches_the_pipeline_on_every_fixture() {
    assert_all_cases("text-classification", check_task("text-classification"), 20);
}

#[test]
fn token_classification_matches_the_pipeline_on_every_fixture() {
    assert_all_cases(
        "token-classification",
        check_task("token-classification"),
        21,
    );
}

#[test]
fn question_answering_matches_the_pipeline_on_every_fixture() {
    assert_all_cases("question-answering", check_task("question-answering"), 18);
}

#[test]
fn fill_mask_matches_the_pipeline_on_every_fixture() {
    assert_all_cases("fill-mask", check_task("fill-mask"), 12);
}
