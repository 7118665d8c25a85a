//! MobileBERT and MegatronBERT against transformers 4.37.2, on every fixture that
//! tests/fixtures/make_encoder_fixtures.py wrote under tests/fixtures/encoders/<variant>/<head>/.
//!
//! Each fixture's reference.safetensors holds a right-padded batch (input_ids, attention_mask,
//! token_type_ids; `[batch, choices, len]` for multiple choice) and the head's outputs for it,
//! and a second batch of text pairs under `pair_`-prefixed names for some heads, and under
//! `alone_`-prefixed names the same outputs with each row run alone by transformers. We unpad
//! every row by its attention mask, run all rows in one forward, and compare every output at
//! every unmasked position: |ours - transformers| <= 1e-4. Every row is also run alone and must
//! give what it gave in the batch (|difference| <= 1e-5) and, where the fixture has `alone_`
//! references, what transformers gave for it alone (<= 1e-4). Every fixture directory must be
//! checked: a new fixture cannot go untested, and an output the test does not know fails it.
//!
//! One deviation from transformers is deliberate. With MobileBERT's `trigram_input`, each token
//! reads its right neighbour's embedding, and in transformers a padded sequence's last token
//! reads the embedding of the `[PAD]` after it, so its outputs change with the batch it is padded
//! in (by up to 0.5 on these fixtures). We give every sequence the result it has alone, as the
//! pipelines (one sequence per forward) do. For such rows the batch reference is not the
//! sequence's own result: they are compared with the `alone_` references instead, and a fixture
//! without them for such a row fails (the row would be checked against our own run alone only).
//!
//! The causal-LM fixture (MegatronBertForCausalLM) is checked through the Generator: logits of
//! the batch and of each prompt alone at every real position, and greedy generations alone and
//! batched.
//!
//! CANDLEWICK_ENCODER_FIXTURES points the test at another fixtures tree.

mod common;
use common::{argmax, prefill_new};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candlewick_engine::{
    load_encoder, load_generator, EncoderInput, EncoderModel, EncoderOutput, EncoderTask,
    GeneratorConfig, LoadOptions, LoadedGenerator, LogitsMode, ModelSource, Pooling, Requested,
    StepRow,
};
use serde::Deserialize;

/// Largest absolute difference allowed between our f32 outputs and transformers'.
const TOLERANCE: f32 = 1e-4;
/// Largest absolute difference allowed between a row run in a batch and the row run alone.
const BATCH_INVARIANCE_TOLERANCE: f32 = 1e-5;
/// The reference's input tensors; every other tensor is an output the test must compare.
const INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

fn fixtures_root() -> PathBuf {
    match std::env::var_os("CANDLEWICK_ENCODER_FIXTURES") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/encoders"),
    }
}

/// Every `<variant>/<head>` directory under the root, sorted.
fn fixture_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for variant in std::fs::read_dir(root).expect("the encoder fixtures directory") {
        let variant = variant.unwrap().path();
        if !variant.is_dir() || is_hidden(&variant) {
            continue;
        }
        for head in std::fs::read_dir(&variant).unwrap() {
            let head = head.unwrap().path();
            if head.is_dir() && !is_hidden(&head) {
                dirs.push(head);
            }
        }
    }
    dirs.sort();
    dirs
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.starts_with('.'))
}

fn fixture_name(dir: &Path) -> String {
    let parts: Vec<_> = dir.iter().rev().take(2).collect();
    format!(
        "{}/{}",
        parts[1].to_string_lossy(),
        parts[0].to_string_lossy()
    )
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn architecture(config: &serde_json::Value) -> String {
    config["architectures"][0].as_str().unwrap().to_string()
}

/// Whether transformers' result for a padded row depends on the padding (see the module doc).
fn padding_leaks_into_real_tokens(config: &serde_json::Value) -> bool {
    config["model_type"] == "mobilebert"
        && config
            .get("trigram_input")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true)
}

/// One output of one fixture group compared with transformers.
struct Comparison {
    name: String,
    largest: f32,
    values: usize,
}

/// What a fixture's check found.
#[derive(Default)]
struct Report {
    comparisons: Vec<Comparison>,
    /// Largest |batch - alone| over every row and output.
    batch_invariance: f32,
    rows: usize,
    /// Rows also checked through a narrower request (selected tokens, pooled on the device).
    narrower_requests: usize,
}

/// Compares `actual` with `expected` element by element, failing at the first difference over
/// `tolerance` with its place and both values. Returns the largest difference.
fn compare(what: &str, expected: &[f32], actual: &[f32], tolerance: f32) -> Result<f32, String> {
    if expected.len() != actual.len() {
        return Err(format!(
            "{what}: {} values expected, {} produced",
            expected.len(),
            actual.len()
        ));
    }
    let mut largest = 0f32;
    for (i, (&e, &a)) in expected.iter().zip(actual).enumerate() {
        let diff = (e - a).abs();
        // NaN fails too.
        if diff > tolerance || diff.is_nan() {
            return Err(format!(
                "{what}: first difference over {tolerance:e} at index {i}: ours {a}, expected {e}"
            ));
        }
        largest = largest.max(diff);
    }
    Ok(largest)
}

/// A reference tensor as f32 values, `[rows, ...]` flattened per row.
fn rows_of(tensor: &Tensor) -> Vec<Vec<f32>> {
    let rows = tensor.dim(0).unwrap();
    (0..rows)
        .map(|r| {
            tensor
                .get(r)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect()
}

fn ids_rows(tensor: &Tensor) -> Vec<Vec<u32>> {
    let dims = tensor.dims().to_vec();
    let len = *dims.last().unwrap();
    let values: Vec<i64> = tensor.flatten_all().unwrap().to_vec1().unwrap();
    values
        .chunks(len)
        .map(|row| row.iter().map(|&v| v as u32).collect())
        .collect()
}

/// One output of one row, flattened, with the real positions of per-token outputs only.
fn output_values(output: &EncoderOutput, key: &str) -> Result<Vec<f32>, String> {
    let flat = |rows: &[Vec<f32>]| rows.concat();
    match (output, key) {
        (EncoderOutput::Sequence(row), "logits") => Ok(row.clone()),
        (EncoderOutput::Tokens(rows), "logits") => Ok(flat(rows)),
        (EncoderOutput::Span { start, .. }, "start_logits") => Ok(start.clone()),
        (EncoderOutput::Span { end, .. }, "end_logits") => Ok(end.clone()),
        (EncoderOutput::Hidden { last, .. }, "last_hidden_state") => Ok(flat(last)),
        (EncoderOutput::Hidden { last, .. }, "mean_pooled") => {
            let mut mean = vec![0f32; last[0].len()];
            for token in last {
                for (m, v) in mean.iter_mut().zip(token) {
                    *m += v;
                }
            }
            Ok(mean.iter().map(|m| m / last.len() as f32).collect())
        }
        (
            EncoderOutput::Hidden {
                pooled: Some(pooled),
                ..
            },
            "pooler_output",
        ) => Ok(pooled.clone()),
        (EncoderOutput::Pooled(pooled), "mean_pooled" | "pooler_output") => Ok(pooled.clone()),
        _ => Err(format!("the model produces no {key:?} in {output:?}")),
    }
}

/// The narrower request that `key` is also checked through: a per-token output at a few tokens
/// only (every other token, last first), a pooled output pooled on the device.
fn narrower_request(key: &str, task: EncoderTask, len: usize) -> Option<Requested> {
    match key {
        "mean_pooled" => Some(Requested::Pooled(Pooling::Mean)),
        "pooler_output" => Some(Requested::Pooled(Pooling::Pooler)),
        _ if is_per_token(key, task) && key != "start_logits" && key != "end_logits" => Some(
            Requested::Tokens((0..len as u32).rev().step_by(2).collect()),
        ),
        _ => None,
    }
}

/// The rows of a flattened per-token reference `[len * width]` at `tokens`, flattened.
fn select_tokens(expected: &[f32], len: usize, tokens: &[u32]) -> Vec<f32> {
    let width = expected.len() / len;
    tokens
        .iter()
        .flat_map(|&t| expected[t as usize * width..(t as usize + 1) * width].to_vec())
        .collect()
}

/// The reference of one output for one row at its real positions: `[len, ...]` outputs are cut
/// to the row's length; multiple-choice logits `[batch, choices]` give one value per row.
fn expected_of_row(
    reference: &Tensor,
    row: usize,
    len: usize,
    per_token: bool,
    multiple_choice: bool,
) -> Vec<f32> {
    if multiple_choice {
        let flat: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
        return vec![flat[row]];
    }
    let row_tensor = reference.get(row).unwrap();
    let row_tensor = if per_token {
        row_tensor.narrow(0, 0, len).unwrap()
    } else {
        row_tensor
    };
    row_tensor.flatten_all().unwrap().to_vec1().unwrap()
}

fn is_per_token(key: &str, task: EncoderTask) -> bool {
    match key {
        "last_hidden_state" | "start_logits" | "end_logits" => true,
        "logits" => matches!(
            task,
            EncoderTask::TokenClassification | EncoderTask::MaskedLm
        ),
        _ => false,
    }
}

fn check_encoder(dir: &Path) -> Result<Report, String> {
    let name = fixture_name(dir);
    let config = config(dir);
    let leaky = padding_leaks_into_real_tokens(&config);
    let loaded = load_encoder(
        &ModelSource::Dir(dir.to_path_buf()),
        &LoadOptions::default(),
    )
    .map_err(|e| format!("{name}: loading: {e}"))?;
    let model = loaded.model;
    let task = model.task();
    let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .map_err(|e| format!("{name}: reading reference.safetensors: {e}"))?;
    let mut unchecked: BTreeSet<&String> = reference.keys().collect();
    let mut report = Report::default();
    for group in ["", "pair_"] {
        let Some(input_ids) = reference.get(&format!("{group}input_ids")) else {
            continue;
        };
        let multiple_choice = input_ids.rank() == 3;
        let mask = &reference[&format!("{group}attention_mask")];
        let ids = ids_rows(input_ids);
        let masks = ids_rows(mask);
        let types = match reference.get(&format!("{group}token_type_ids")) {
            Some(types) => ids_rows(types),
            None => masks.iter().map(|m| vec![0; m.len()]).collect(),
        };
        for input in INPUTS {
            unchecked.remove(&format!("{group}{input}"));
        }
        let width = ids[0].len();
        let inputs: Vec<EncoderInput> = ids
            .iter()
            .zip(&masks)
            .zip(&types)
            .map(|((ids, mask), types)| {
                let len = mask.iter().filter(|&&m| m == 1).count();
                assert!(
                    mask[..len].iter().all(|&m| m == 1),
                    "{name}: rows must be right-padded"
                );
                EncoderInput::new(ids[..len].to_vec(), types[..len].to_vec())
            })
            .collect();
        let output = model
            .forward(&inputs)
            .map_err(|e| format!("{name}: forward: {e}"))?;
        let alone: Vec<EncoderOutput> = inputs
            .iter()
            .map(|input| Ok(model.forward(std::slice::from_ref(input))?.remove(0)))
            .collect::<Result<_, candlewick_engine::EngineError>>()
            .map_err(|e| format!("{name}: forward alone: {e}"))?;
        report.rows += inputs.len();

        let outputs: Vec<&String> = reference
            .keys()
            .filter(|key| {
                key.starts_with(group)
                    && !key.starts_with("alone_")
                    && !key.starts_with("positioned_")
            })
            .filter(|key| {
                let key = &key[group.len()..];
                let other_group = group.is_empty() && key.starts_with("pair_");
                !INPUTS.contains(&key) && !other_group
            })
            .collect();
        for full_key in outputs {
            let key = &full_key[group.len()..];
            let what = format!("{name}: {full_key}");
            let expected = &reference[full_key];
            let alone_reference = reference.get(&format!("alone_{full_key}"));
            let per_token = is_per_token(key, task);
            let mut largest = 0f32;
            let mut values = 0;
            let mut alone_largest = 0f32;
            // The same batch once more, each row asking for the narrower output.
            let narrower: Option<Vec<EncoderInput>> = inputs
                .iter()
                .map(|input| {
                    narrower_request(key, task, input.ids.len())
                        .map(|request| input.clone().requesting(request))
                })
                .collect();
            let narrower_output = match &narrower {
                Some(narrower) => Some(
                    model
                        .forward(narrower)
                        .map_err(|e| format!("{what}: forward, narrower request: {e}"))?,
                ),
                None => None,
            };
            for (row, input) in inputs.iter().enumerate() {
                let len = input.ids.len();
                let actual =
                    output_values(&output[row], key).map_err(|e| format!("{what}: {e}"))?;
                let alone_actual =
                    output_values(&alone[row], key).map_err(|e| format!("{what}: {e}"))?;
                report.batch_invariance = report.batch_invariance.max(compare(
                    &format!("{what}, row {row} in the batch vs alone"),
                    &alone_actual,
                    &actual,
                    BATCH_INVARIANCE_TOLERANCE,
                )?);
                let padded = len < width;
                let expected_row = if leaky && padded {
                    let alone_reference = alone_reference.ok_or_else(|| {
                        format!(
                            "{what}, row {row}: padded trigram row without an alone_{full_key} \
                             reference, so it would be checked against our own run alone only"
                        )
                    })?;
                    expected_of_row(alone_reference, row, len, per_token, multiple_choice)
                } else {
                    expected_of_row(expected, row, len, per_token, multiple_choice)
                };
                largest = largest.max(compare(
                    &format!("{what}, row {row}"),
                    &expected_row,
                    &actual,
                    TOLERANCE,
                )?);
                if let (Some(narrower), Some(narrower_output)) = (&narrower, &narrower_output) {
                    let narrow_actual = output_values(&narrower_output[row], key)
                        .map_err(|e| format!("{what}, narrower request: {e}"))?;
                    let narrow_expected = match &narrower[row].output {
                        Requested::Tokens(tokens) => select_tokens(&expected_row, len, tokens),
                        _ => expected_row.clone(),
                    };
                    largest = largest.max(compare(
                        &format!("{what}, row {row}, requested {:?}", narrower[row].output),
                        &narrow_expected,
                        &narrow_actual,
                        TOLERANCE,
                    )?);
                    report.narrower_requests += 1;
                }
                values += expected_row.len();
                if let Some(alone_reference) = alone_reference {
                    alone_largest = alone_largest.max(compare(
                        &format!("{name}: alone_{full_key}, row {row} run alone"),
                        &expected_of_row(alone_reference, row, len, per_token, multiple_choice),
                        &alone_actual,
                        TOLERANCE,
                    )?);
                }
            }
            unchecked.remove(full_key);
            report.comparisons.push(Comparison {
                name: full_key.clone(),
                largest,
                values,
            });
            if unchecked.remove(&format!("alone_{full_key}")) {
                report.comparisons.push(Comparison {
                    name: format!("alone_{full_key}"),
                    largest: alone_largest,
                    values,
                });
            }
        }
        if group.is_empty() {
            check_positioned(
                model.as_ref(),
                &reference,
                &inputs,
                &mut unchecked,
                &mut report,
            )
            .map_err(|e| format!("{name}: {e}"))?;
        }
    }
    if !unchecked.is_empty() {
        return Err(format!(
            "{name}: reference tensors the test does not compare: {unchecked:?}"
        ));
    }
    if report.comparisons.is_empty() {
        return Err(format!("{name}: no outputs compared"));
    }
    Ok(report)
}

/// The batch once more with the position ids of `positioned_position_ids` given (each row's
/// numbering shifted), against transformers' rows run alone with the same ids.
fn check_positioned(
    model: &dyn EncoderModel,
    reference: &std::collections::HashMap<String, Tensor>,
    inputs: &[EncoderInput],
    unchecked: &mut BTreeSet<&String>,
    report: &mut Report,
) -> Result<(), String> {
    let Some(positions) = reference.get("positioned_position_ids") else {
        return Ok(());
    };
    unchecked.retain(|key| key.as_str() != "positioned_position_ids");
    let positions = ids_rows(positions);
    let positioned: Vec<EncoderInput> = inputs
        .iter()
        .zip(&positions)
        .map(|(input, positions)| {
            let mut input = input.clone();
            input.position_ids = Some(positions[..input.ids.len()].to_vec());
            input
        })
        .collect();
    let output = model
        .forward(&positioned)
        .map_err(|e| format!("forward with position ids: {e}"))?;
    let task = model.task();
    let keys: Vec<&String> = reference
        .keys()
        .filter(|key| key.starts_with("positioned_") && key.as_str() != "positioned_position_ids")
        .collect();
    for full_key in keys {
        let key = &full_key["positioned_".len()..];
        let (mut largest, mut values) = (0f32, 0);
        for (row, input) in positioned.iter().enumerate() {
            let len = input.ids.len();
            let expected = expected_of_row(
                &reference[full_key],
                row,
                len,
                is_per_token(key, task),
                false,
            );
            let actual =
                output_values(&output[row], key).map_err(|e| format!("{full_key}: {e}"))?;
            largest = largest.max(compare(
                &format!("{full_key}, row {row}"),
                &expected,
                &actual,
                TOLERANCE,
            )?);
            values += expected.len();
        }
        unchecked.remove(full_key);
        report.comparisons.push(Comparison {
            name: full_key.clone(),
            largest,
            values,
        });
    }
    Ok(())
}

#[derive(Deserialize)]
struct Generation {
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
}

/// Greedy generation of exactly `new_tokens` tokens for all `prompts` together.
fn greedy(loaded: &mut LoadedGenerator, prompts: &[Vec<u32>], new_tokens: usize) -> Vec<Vec<u32>> {
    let generator = &mut loaded.generator;
    let (slots, mut logits) = prefill_new(generator, prompts);
    let mut outputs = vec![Vec::new(); prompts.len()];
    loop {
        let tokens: Vec<u32> = logits.iter().map(|row| argmax(row)).collect();
        for (output, &token) in outputs.iter_mut().zip(&tokens) {
            output.push(token);
        }
        if outputs[0].len() == new_tokens {
            break;
        }
        let next: Vec<(usize, u32)> = slots.iter().copied().zip(tokens).collect();
        logits = generator.decode(&next).unwrap();
    }
    for slot in slots {
        generator.release(slot);
    }
    outputs
}

fn check_causal_lm(dir: &Path) -> Result<Report, String> {
    let name = fixture_name(dir);
    let options = LoadOptions {
        generator: GeneratorConfig {
            max_sequences: 4,
            max_context: None,
            prefill_chunk: 512,
            prefix_cache_bytes: 0,
        },
        ..LoadOptions::default()
    };
    let mut loaded = load_generator(&ModelSource::Dir(dir.to_path_buf()), &options)
        .map_err(|e| format!("{name}: loading: {e}"))?;
    let reference = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .map_err(|e| format!("{name}: reading reference.safetensors: {e}"))?;
    let known: BTreeSet<&str> = ["input_ids", "attention_mask", "logits", "alone_logits"].into();
    let unknown: Vec<&String> = reference
        .keys()
        .filter(|key| !known.contains(key.as_str()))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "{name}: reference tensors the test does not compare: {unknown:?}"
        ));
    }
    let masks = ids_rows(&reference["attention_mask"]);
    let prompts: Vec<Vec<u32>> = ids_rows(&reference["input_ids"])
        .into_iter()
        .zip(&masks)
        .map(|(ids, mask)| {
            let len = mask.iter().filter(|&&m| m == 1).count();
            ids[..len].to_vec()
        })
        .collect();
    let expected = rows_of(&reference["logits"]);
    let generator = &mut loaded.generator;
    let slots: Vec<usize> = prompts
        .iter()
        .map(|_| generator.allocate().unwrap())
        .collect();
    let rows: Vec<StepRow> = slots
        .iter()
        .zip(&prompts)
        .map(|(&slot, tokens)| StepRow { slot, tokens })
        .collect();
    // The Generator pads on the left: a row's real tokens are its last columns.
    let logits = generator
        .step(&rows, LogitsMode::All)
        .map_err(|e| format!("{name}: step: {e}"))?;
    let seq = logits.dim(1).unwrap();
    let vocab = generator.vocab_size();
    let mut largest = 0f32;
    let mut values = 0;
    for (row, prompt) in prompts.iter().enumerate() {
        let ours: Vec<Vec<f32>> = logits.get(row).unwrap().to_vec2().unwrap();
        let ours = ours[seq - prompt.len()..].concat();
        let theirs = &expected[row][..prompt.len() * vocab];
        largest = largest.max(compare(
            &format!("{name}: logits, row {row}"),
            theirs,
            &ours,
            TOLERANCE,
        )?);
        values += theirs.len();
    }
    for slot in slots {
        generator.release(slot);
    }
    let mut alone_largest = 0f32;
    let mut alone_values = 0;
    if let Some(alone_reference) = reference.get("alone_logits") {
        let alone_expected = rows_of(alone_reference);
        for (row, prompt) in prompts.iter().enumerate() {
            let slot = generator.allocate().unwrap();
            let logits = generator
                .step(
                    &[StepRow {
                        slot,
                        tokens: prompt,
                    }],
                    LogitsMode::All,
                )
                .map_err(|e| format!("{name}: step alone: {e}"))?;
            generator.release(slot);
            let ours: Vec<Vec<f32>> = logits.get(0).unwrap().to_vec2().unwrap();
            let ours = ours[logits.dim(1).unwrap() - prompt.len()..].concat();
            alone_largest = alone_largest.max(compare(
                &format!("{name}: alone_logits, row {row} run alone"),
                &alone_expected[row][..prompt.len() * vocab],
                &ours,
                TOLERANCE,
            )?);
            alone_values += prompt.len() * vocab;
        }
    }

    let generations: Vec<Generation> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generations.json")).unwrap())
            .unwrap();
    let prompts: Vec<Vec<u32>> = generations.iter().map(|g| g.prompt_ids.clone()).collect();
    let new_tokens = generations[0].generated_ids.len();
    let batched = greedy(&mut loaded, &prompts, new_tokens);
    for (i, generation) in generations.iter().enumerate() {
        let alone = greedy(&mut loaded, std::slice::from_ref(&prompts[i]), new_tokens);
        if alone[0] != generation.generated_ids || batched[i] != generation.generated_ids {
            return Err(format!(
                "{name}: greedy tokens of prompt {i}: transformers {:?}, ours alone {:?}, ours batched {:?}",
                generation.generated_ids, alone[0], batched[i]
            ));
        }
    }
    Ok(Report {
        comparisons: vec![
            Comparison {
                name: "logits".into(),
                largest,
                values,
            },
            Comparison {
                name: "alone_logits".into(),
                largest: alone_largest,
                values: alone_values,
            },
            Comparison {
                name: format!("greedy tokens ({} prompts x {new_tokens})", prompts.len()),
                largest: 0.0,
                values: prompts.len() * new_tokens,
            },
        ],
        rows: prompts.len(),
        ..Report::default()
    })
}

#[test]
fn every_encoder_fixture_matches_transformers_at_every_unmasked_position() {
    let root = fixtures_root();
    let dirs = fixture_dirs(&root);
    assert!(!dirs.is_empty(), "no fixtures under {}", root.display());
    let mut failures = Vec::new();
    let mut narrower_requests = 0;
    for dir in &dirs {
        let name = fixture_name(dir);
        let architecture = architecture(&config(dir));
        let result = if architecture.ends_with("ForCausalLM") {
            check_causal_lm(dir)
        } else {
            check_encoder(dir)
        };
        match result {
            Ok(report) => {
                for comparison in &report.comparisons {
                    eprintln!(
                        "{name:<46} {:<28} max |diff| {:.2e} over {} values",
                        comparison.name, comparison.largest, comparison.values
                    );
                }
                eprintln!(
                    "{name:<46} {:<28} max |diff| {:.2e} over {} rows",
                    "batch vs alone", report.batch_invariance, report.rows,
                );
                narrower_requests += report.narrower_requests;
            }
            Err(failure) => failures.push(failure),
        }
    }
    eprintln!(
        "{} fixtures checked, {narrower_requests} rows through narrower requests too",
        dirs.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        dirs.len(),
        failures.join("\n")
    );
    assert!(
        narrower_requests > 0,
        "no row went through a narrower request"
    );
}

/// The models reject what they cannot run instead of failing inside a tensor operation.
#[test]
fn out_of_range_inputs_are_refused_with_the_limit() {
    let dir = fixtures_root().join("mobilebert-nonorm-trigram/sequence-classification");
    let loaded = load_encoder(&ModelSource::Dir(dir), &LoadOptions::default()).unwrap();
    let model: &dyn EncoderModel = loaded.model.as_ref();
    let too_long = EncoderInput::single(vec![1; model.max_positions() + 1]);
    let error = model.forward(&[too_long]).unwrap_err().to_string();
    assert!(
        error.contains(&model.max_positions().to_string()),
        "{error}"
    );
    let bad_token = EncoderInput::single(vec![1, 100_000]);
    let error = model.forward(&[bad_token]).unwrap_err().to_string();
    assert!(error.contains("100000"), "{error}");
    assert_eq!(
        model.labels().unwrap().names,
        ["negative", "neutral", "positive"]
    );
    let empty = model.forward(&[]).unwrap();
    assert_eq!(empty, vec![]);
}
