//! Mistral and Mixtral against transformers 4.37.2 (eager attention): logits of a left-padded batch
//! and greedy generations, on the fixtures made by tests/fixtures/make_mistral_fixtures.py and
//! make_mixtral_fixtures.py.

mod common;
use common::{argmax, fixture_dir, prefill_new};

use candle_core::{Device, Tensor};
use candlewick_engine::{
    load_generator, GeneratorConfig, LoadOptions, LoadedGenerator, LogitsMode, ModelSource, StepRow,
};
use serde::Deserialize;

/// Largest absolute difference allowed between our f32 logits and transformers'.
const LOGITS_TOLERANCE: f32 = 1e-4;
const FIXTURES: [&str; 10] = [
    "mistral/w4-gqa1",
    "mistral/w8-gqa2",
    "mistral/nowin-gqa4",
    "mixtral/e4-w8-gqa2",
    "mixtral/e8-nowin-gqa4",
    "gpt2/gelu-new-tied",
    "gpt2/relu-inverse-untied",
    "gpt2/gelu-unscaled-reorder",
    "gpt2/bpe-files",
    "gpt2/quick-gelu-double-heads",
];

#[derive(Deserialize)]
struct Reference {
    tokenizer_check: Vec<TokenizerCheck>,
    logits: LogitsReference,
    greedy: GreedyReference,
}

#[derive(Deserialize)]
struct TokenizerCheck {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct LogitsReference {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u32>>,
    file: String,
}

#[derive(Deserialize)]
struct GreedyReference {
    max_new_tokens: usize,
    prompts: Vec<Vec<u32>>,
    alone: Vec<Vec<u32>>,
    batched: Vec<Vec<u32>>,
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str, max_sequences: usize, prefill_chunk: usize) -> LoadedGenerator {
    let options = LoadOptions {
        generator: GeneratorConfig {
            max_sequences,
            max_context: None,
            prefill_chunk,
            prefix_cache_bytes: 0,
        },
        ..LoadOptions::default()
    };
    load_generator(&ModelSource::Dir(fixture_dir(name)), &options).unwrap()
}

/// The real (unpadded) tokens of each row of a left-padded batch.
fn unpadded(reference: &LogitsReference) -> Vec<Vec<u32>> {
    reference
        .input_ids
        .iter()
        .zip(&reference.attention_mask)
        .map(|(ids, mask)| {
            ids.iter()
                .zip(mask)
                .filter(|(_, &m)| m == 1)
                .map(|(&id, _)| id)
                .collect()
        })
        .collect()
}

/// Compares the logits of the real positions of row `row` (its last `count` columns in
/// `expected`) with `actual` (`[count, vocab]`), failing at the first difference over tolerance.
/// Returns the largest difference seen.
fn assert_row_close(fixture: &str, row: usize, expected: &Tensor, actual: &[Vec<f32>]) -> f32 {
    let expected: Vec<Vec<f32>> = expected.get(row).unwrap().to_vec2().unwrap();
    let count = actual.len();
    let offset = expected.len() - count;
    let mut largest = 0f32;
    for (t, actual_row) in actual.iter().enumerate() {
        assert_eq!(
            actual_row.len(),
            expected[offset + t].len(),
            "{fixture}: vocabulary size"
        );
        for (v, (&a, &e)) in actual_row.iter().zip(&expected[offset + t]).enumerate() {
            assert!(
                (a - e).abs() <= LOGITS_TOLERANCE,
                "{fixture}: logits differ at row {row}, position {t}, token {v}: ours {a}, transformers {e}"
            );
            largest = largest.max((a - e).abs());
        }
    }
    largest
}

fn expected_logits(name: &str, reference: &Reference) -> Tensor {
    let path = fixture_dir(name).join(&reference.logits.file);
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .remove("logits")
        .unwrap()
}

#[test]
fn logits_match_transformers_at_every_unmasked_position_of_a_left_padded_batch() {
    for fixture in FIXTURES {
        let reference = reference(fixture);
        let expected = expected_logits(fixture, &reference);
        let prompts = unpadded(&reference.logits);
        let LoadedGenerator { mut generator, .. } = load(fixture, prompts.len(), 512);
        let slots: Vec<usize> = prompts
            .iter()
            .map(|_| generator.allocate().unwrap())
            .collect();
        let rows: Vec<StepRow> = slots
            .iter()
            .zip(&prompts)
            .map(|(&slot, p)| StepRow { slot, tokens: p })
            .collect();
        let logits = generator.step(&rows, LogitsMode::All).unwrap();
        let seq = logits.dim(1).unwrap();
        let mut largest = 0f32;
        for (row, prompt) in prompts.iter().enumerate() {
            let all: Vec<Vec<f32>> = logits.get(row).unwrap().to_vec2().unwrap();
            largest = largest.max(assert_row_close(
                fixture,
                row,
                &expected,
                &all[seq - prompt.len()..],
            ));
        }
        eprintln!(
            "{fixture}: largest |logit difference| {largest:e} over {} rows",
            prompts.len()
        );
    }
}

#[test]
fn logits_match_when_prompts_are_fed_in_chunks_through_the_ring() {
    // Chunks of 1 (pure decode steps), 3 (chunks that straddle ring wrap-arounds) and 5.
    for fixture in FIXTURES {
        let reference = reference(fixture);
        let expected = expected_logits(fixture, &reference);
        let prompts = unpadded(&reference.logits);
        for chunk in [1, 3, 5] {
            let LoadedGenerator { mut generator, .. } = load(fixture, prompts.len(), 512);
            let actual = logits_in_chunks(&mut generator, &prompts, chunk);
            for (row, logits) in actual.iter().enumerate() {
                assert_row_close(
                    &format!("{fixture} (chunks of {chunk})"),
                    row,
                    &expected,
                    logits,
                );
            }
        }
    }
}

/// Every position's logits of `prompts` run through `generator` in steps of `chunk` tokens
/// (rows whose prompt has ended leave the step).
fn logits_in_chunks(
    generator: &mut candlewick_engine::Generator,
    prompts: &[Vec<u32>],
    chunk: usize,
) -> Vec<Vec<Vec<f32>>> {
    let slots: Vec<usize> = prompts
        .iter()
        .map(|_| generator.allocate().unwrap())
        .collect();
    let mut actual: Vec<Vec<Vec<f32>>> = vec![vec![]; prompts.len()];
    let mut offset = 0;
    while prompts.iter().any(|p| offset < p.len()) {
        let (rows, indexes): (Vec<StepRow>, Vec<usize>) = prompts
            .iter()
            .enumerate()
            .filter(|(_, p)| offset < p.len())
            .map(|(i, p)| {
                let end = (offset + chunk).min(p.len());
                let row = StepRow {
                    slot: slots[i],
                    tokens: &p[offset..end],
                };
                (row, i)
            })
            .unzip();
        let logits = generator.step(&rows, LogitsMode::All).unwrap();
        let seq = logits.dim(1).unwrap();
        for (b, (row, &i)) in rows.iter().zip(&indexes).enumerate() {
            let all: Vec<Vec<f32>> = logits.get(b).unwrap().to_vec2().unwrap();
            actual[i].extend_from_slice(&all[seq - row.tokens.len()..]);
        }
        offset += chunk;
    }
    for slot in slots {
        generator.release(slot);
    }
    actual
}

/// A long batch prefilled at once (180 rows in every product, where decode steps have 3, and
/// attention over whole prompts) gives the logits of the same tokens fed one at a time, at every
/// position.
#[test]
fn a_long_batch_prefilled_at_once_matches_it_fed_token_by_token() {
    for fixture in ["mistral/nowin-gqa4", "mixtral/e8-nowin-gqa4"] {
        // 3 x 60 = 180 rows in each projection of the one-step prefill.
        let prompts: Vec<Vec<u32>> = (0..3u32)
            .map(|r| (0..60).map(|t| 3 + (r * 331 + t * 17) % 1000).collect())
            .collect();
        let LoadedGenerator { mut generator, .. } = load(fixture, prompts.len(), 512);
        let at_once = logits_in_chunks(&mut generator, &prompts, 60);
        let one_by_one = logits_in_chunks(&mut generator, &prompts, 1);
        let mut largest = 0f32;
        for (a, b) in at_once.iter().flatten().zip(one_by_one.iter().flatten()) {
            for (x, y) in a.iter().zip(b) {
                largest = largest.max((x - y).abs());
            }
        }
        eprintln!("{fixture}: prefill vs token by token, largest |difference| {largest:.2e}");
        assert!(largest <= LOGITS_TOLERANCE, "{fixture}: {largest}");
        assert_eq!(at_once.iter().flatten().count(), 180);
    }
}

/// Greedy generation of all `prompts` together, each stopping at EOS or `max_new_tokens`.
fn greedy(
    loaded: &mut LoadedGenerator,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
) -> Vec<Vec<u32>> {
    let eos = loaded.tokenizer.eos_token_ids().to_vec();
    let generator = &mut loaded.generator;
    let (slots, mut logits) = prefill_new(generator, prompts);
    let mut outputs = vec![Vec::new(); prompts.len()];
    let mut running: Vec<usize> = (0..prompts.len()).collect();
    while !running.is_empty() {
        let mut next = Vec::new();
        let mut still_running = Vec::new();
        for (&i, row_logits) in running.iter().zip(&logits) {
            let token = argmax(row_logits);
            outputs[i].push(token);
            if eos.contains(&token) || outputs[i].len() == max_new_tokens {
                generator.release(slots[i]);
            } else {
                next.push((slots[i], token));
                still_running.push(i);
            }
        }
        running = still_running;
        if !next.is_empty() {
            logits = generator.decode(&next).unwrap();
        }
    }
    outputs
}

#[test]
fn greedy_generation_matches_transformers_alone_and_batched() {
    for fixture in FIXTURES {
        let reference = reference(fixture).greedy;
        let mut loaded = load(fixture, reference.prompts.len(), 4);
        for (i, prompt) in reference.prompts.iter().enumerate() {
            let alone = greedy(
                &mut loaded,
                std::slice::from_ref(prompt),
                reference.max_new_tokens,
            );
            assert_eq!(alone[0], reference.alone[i], "{fixture}: prompt {i} alone");
        }
        let batched = greedy(&mut loaded, &reference.prompts, reference.max_new_tokens);
        for (i, tokens) in batched.iter().enumerate() {
            assert_eq!(
                tokens, &reference.batched[i],
                "{fixture}: prompt {i} in the batch"
            );
            assert_eq!(
                tokens, &reference.alone[i],
                "{fixture}: prompt {i} batched vs alone"
            );
        }
        assert_eq!(loaded.generator.free_slots(), reference.prompts.len());
    }
}

#[test]
fn tokenizer_matches_transformers_ids() {
    for fixture in FIXTURES {
        let loaded = load(fixture, 1, 512);
        for check in reference(fixture).tokenizer_check {
            let ids = loaded.tokenizer.encode(&check.text, true).unwrap();
            assert_eq!(ids, check.ids, "{fixture}: {:?}", check.text);
        }
    }
}

#[test]
fn a_sequence_generating_ten_windows_holds_at_most_a_window_and_matches_a_full_recompute() {
    let fixture = "mistral/w4-gqa1";
    let window = 4;
    let mut loaded = load(fixture, 2, 512);
    let prompt = reference(fixture).greedy.prompts[0].clone();
    let generator = &mut loaded.generator;
    let slot = generator.allocate().unwrap();
    let mut logits = generator
        .prefill(&[StepRow {
            slot,
            tokens: &prompt,
        }])
        .unwrap()
        .remove(0);
    let mut sequence = prompt.clone();
    let mut decoded_logits = vec![logits.clone()];
    for _ in 0..10 * window {
        let token = argmax(&logits);
        sequence.push(token);
        logits = generator.decode(&[(slot, token)]).unwrap().remove(0);
        decoded_logits.push(logits.clone());
        assert!(generator.state().held_positions(0, slot).unwrap() <= window);
        let ring = generator.state().ring(0).unwrap();
        assert_eq!(ring.keys.dims()[2], window, "ring capacity");
        assert_eq!(ring.values.dims()[2], window, "ring capacity");
    }
    assert_eq!(
        generator.state().len(slot).unwrap(),
        prompt.len() + 10 * window
    );

    // The same sequence in one step, with no cache history: every query sees its window among
    // the step's own keys. The decoded logits must agree position by position.
    let other = generator.allocate().unwrap();
    let full = generator
        .step(
            &[StepRow {
                slot: other,
                tokens: &sequence,
            }],
            LogitsMode::All,
        )
        .unwrap();
    let full: Vec<Vec<f32>> = full.get(0).unwrap().to_vec2().unwrap();
    for (k, decoded) in decoded_logits.iter().enumerate() {
        let position = prompt.len() - 1 + k;
        let max_diff = decoded
            .iter()
            .zip(&full[position])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff <= LOGITS_TOLERANCE,
            "position {position}: max difference {max_diff}"
        );
    }
}
