//! Helpers the engine's integration tests share.

// Every test crate compiles this module and uses some of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candlewick_engine::{Generator, StepRow};

/// The committed fixture `name` (a path under tests/fixtures, e.g. "mistral/w8-gqa2").
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The index of the largest logit, the lowest index among equals (greedy decoding).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Allocates a slot for each prompt and prefills them together: the slots, and each prompt's
/// logits after its last token.
pub fn prefill_new<P: AsRef<[u32]>>(
    generator: &mut Generator,
    prompts: &[P],
) -> (Vec<usize>, Vec<Vec<f32>>) {
    let slots: Vec<usize> = prompts
        .iter()
        .map(|_| generator.allocate().unwrap())
        .collect();
    let rows: Vec<StepRow> = slots
        .iter()
        .zip(prompts)
        .map(|(&slot, prompt)| StepRow {
            slot,
            tokens: prompt.as_ref(),
        })
        .collect();
    let logits = generator.prefill(&rows).unwrap();
    (slots, logits)
}
