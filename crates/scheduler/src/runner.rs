//! A fixed batch of requests run to completion: prefilled together, decoded together, each
//! sequence leaving the batch (and freeing its slot) as soon as it stops.

use candlewick_engine::sampling::Sampled;
use candlewick_engine::{Generator, StepRow, Tokenizer};

use crate::sequence::{FinishReason, GenerationRequest, Sequence, TokenEvent};
use crate::{Result, SchedulerError};

/// A finished sequence.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// Generated token ids, the stop token included.
    pub tokens: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Each token's log-probabilities.
    pub logprobs: Vec<Sampled>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
}

/// Generates all `requests` in one batch. `on_token(i, event)` sees every token of request `i`
/// as it is produced. Fails if there are more requests than free slots.
pub fn run_batch(
    generator: &mut Generator,
    tokenizer: &Tokenizer,
    requests: &[GenerationRequest],
    mut on_token: impl FnMut(usize, &TokenEvent),
) -> Result<Vec<GenerationOutput>> {
    let free = generator.free_slots();
    if requests.len() > free {
        return Err(SchedulerError::InvalidRequest(format!(
            "{} requests for {free} free sequence slots",
            requests.len()
        )));
    }
    let mut slots = Vec::with_capacity(requests.len());
    let result = run_in_slots(generator, tokenizer, requests, &mut slots, &mut on_token);
    // Whatever happened, every slot this batch took is given back (releasing a slot that a
    // finished sequence already gave back is a no-op).
    for slot in slots {
        generator.release(slot);
    }
    result
}

fn run_in_slots(
    generator: &mut Generator,
    tokenizer: &Tokenizer,
    requests: &[GenerationRequest],
    slots: &mut Vec<usize>,
    on_token: &mut impl FnMut(usize, &TokenEvent),
) -> Result<Vec<GenerationOutput>> {
    let max_context = generator.max_context();
    let vocab_size = generator.vocab_size();
    let mut sequences = Vec::with_capacity(requests.len());
    for request in requests {
        let slot = generator.allocate()?;
        slots.push(slot);
        sequences.push(Sequence::new(
            slot,
            request,
            tokenizer,
            vocab_size,
            max_context,
        )?);
    }
    let mut outputs: Vec<GenerationOutput> = requests
        .iter()
        .map(|_| GenerationOutput {
            tokens: vec![],
            text: String::new(),
            logprobs: vec![],
            finish_reason: FinishReason::Length,
        })
        .collect();

    let rows: Vec<StepRow> = sequences
        .iter()
        .zip(requests)
        .map(|(sequence, request)| StepRow {
            slot: sequence.slot,
            tokens: &request.prompt,
        })
        .collect();
    let mut logits = generator.prefill(&rows)?;
    let mut running: Vec<usize> = (0..requests.len()).collect();
    while !running.is_empty() {
        let mut still_running = Vec::with_capacity(running.len());
        for (&index, row) in running.iter().zip(&logits) {
            let event = sequences[index].accept(row)?;
            on_token(index, &event);
            let output = &mut outputs[index];
            output.tokens.push(event.sampled.token);
            output.text.push_str(&event.text);
            output.logprobs.push(event.sampled);
            match event.finish {
                Some(reason) => {
                    output.finish_reason = reason;
                    generator.release(sequences[index].slot);
                }
                None => still_running.push(index),
            }
        }
        running = still_running;
        if running.is_empty() {
            break;
        }
        let next: Vec<(usize, u32)> = running
            .iter()
            .filter_map(|&i| Some((sequences[i].slot, sequences[i].last_token()?)))
            .collect();
        logits = generator.decode(&next)?;
    }
    Ok(outputs)
}
