//! Automatic prefix caching on the Mistral and Mixtral fixtures: a prompt that starts from a
//! cached prefix gets the logits and greedy tokens of a full prefill, alone and batched; with a
//! sliding window whose ring has wrapped only a whole cached prompt is reused; an evicted prefix
//! is recomputed, correctly.

mod common;
use common::{argmax, fixture_dir, prefill_new};

use candlewick_engine::{load_generator, Generator, GeneratorConfig, LoadOptions, ModelSource};

/// Prefix-restored and full prefills compute the same tokens' keys and values in other steps
/// (and batches): their logits agree to float rounding, measured up to 6.9e-6 on the CPU kernels
/// and 1.5e-5 on the device-generic path. Bound: the parity tolerance.
const TOLERANCE: f32 = 1e-4;

fn generator(name: &str, prefix_cache_bytes: usize) -> Generator {
    let options = LoadOptions {
        generator: GeneratorConfig {
            max_sequences: 3,
            prefix_cache_bytes,
            ..GeneratorConfig::default()
        },
        ..LoadOptions::default()
    };
    load_generator(&ModelSource::Dir(fixture_dir(name)), &options)
        .unwrap()
        .generator
}

/// Greedy decoding of `steps` tokens after each prompt, all together; every logits row seen
/// and the tokens chosen, per prompt.
fn greedy(
    generator: &mut Generator,
    prompts: &[&[u32]],
    steps: usize,
) -> Vec<(Vec<Vec<f32>>, Vec<u32>)> {
    let (slots, logits) = prefill_new(generator, prompts);
    let mut seen: Vec<(Vec<Vec<f32>>, Vec<u32>)> = logits
        .into_iter()
        .map(|row| (vec![row], Vec::new()))
        .collect();
    for _ in 0..steps {
        let next: Vec<(usize, u32)> = slots
            .iter()
            .zip(&mut seen)
            .map(|(&slot, (logits, tokens))| {
                let token = argmax(logits.last().unwrap());
                tokens.push(token);
                (slot, token)
            })
            .collect();
        for ((logits, _), row) in seen.iter_mut().zip(generator.decode(&next).unwrap()) {
            logits.push(row);
        }
    }
    for slot in slots {
        generator.release(slot);
    }
    seen
}

fn assert_same(
    what: &str,
    expected: &[(Vec<Vec<f32>>, Vec<u32>)],
    actual: &[(Vec<Vec<f32>>, Vec<u32>)],
) {
    for (row, ((e_logits, e_tokens), (a_logits, a_tokens))) in
        expected.iter().zip(actual).enumerate()
    {
        assert_eq!(e_tokens, a_tokens, "{what}, row {row}: greedy tokens");
        let largest = e_logits
            .iter()
            .flatten()
            .zip(a_logits.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{what}, row {row}: largest |logit difference| {largest:.1e}");
        assert!(
            largest <= TOLERANCE,
            "{what}, row {row}: logits {largest} apart"
        );
    }
}

fn tokens(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (seed * 7919 + i * 104_729) % 1000)
        .collect()
}

#[test]
fn a_shared_prefix_is_reused_and_gives_the_full_prefill_result() {
    // nowin-gqa4 attends to everything: any shared prefix of a cached prompt is reused. w8 keeps
    // a ring of 8 entries that these prompts wrap: only a whole cached prompt is.
    for (fixture, truncatable) in [
        ("mistral/nowin-gqa4", true),
        ("mixtral/e8-nowin-gqa4", true),
        ("mistral/w8-gqa2", false),
        ("mixtral/e4-w8-gqa2", false),
    ] {
        let system = tokens(1, 20);
        let first = [system.clone(), tokens(2, 5)].concat();
        let second = [system.clone(), tokens(3, 6)].concat();
        let follow_up = [first.clone(), tokens(4, 4)].concat();
        let other = tokens(5, 9);

        let mut cached = generator(fixture, 64 << 20);
        let mut fresh = generator(fixture, 0);
        let reference = |fresh: &mut Generator, prompts: &[&[u32]]| greedy(fresh, prompts, 6);

        assert_same(
            fixture,
            &reference(&mut fresh, &[&first]),
            &greedy(&mut cached, &[&first], 6),
        );
        let stats = cached.prefix_cache_stats().unwrap();
        assert_eq!(
            (stats.hits, stats.misses, stats.entries),
            (0, 1, 1),
            "{fixture}"
        );

        // The second prompt shares the system prompt with the first, alone and beside another.
        let reused = cached.prefix_cache_stats().unwrap().reused_tokens;
        let expected = reference(&mut fresh, &[&second, &other]);
        assert_same(
            fixture,
            &expected,
            &greedy(&mut cached, &[&second, &other], 6),
        );
        let reused = cached.prefix_cache_stats().unwrap().reused_tokens - reused;
        assert_eq!(
            reused,
            if truncatable { 20 } else { 0 },
            "{fixture}: second prompt"
        );

        // A follow-up that extends the first prompt reuses all of it, wrapped ring or not.
        let before = cached.prefix_cache_stats().unwrap().reused_tokens;
        assert_same(
            fixture,
            &reference(&mut fresh, &[&follow_up]),
            &greedy(&mut cached, &[&follow_up], 6),
        );
        let reused = cached.prefix_cache_stats().unwrap().reused_tokens - before;
        assert_eq!(reused, first.len() as u64, "{fixture}: follow-up");
    }
}

#[test]
fn an_evicted_prefix_is_recomputed_correctly() {
    let fixture = "mistral/nowin-gqa4";
    // Learn one entry's size, then allow exactly one entry.
    let mut probe = generator(fixture, 64 << 20);
    let first = [tokens(1, 20), tokens(2, 5)].concat();
    greedy(&mut probe, &[&first], 1);
    let one_entry = probe.prefix_cache_stats().unwrap().bytes;
    assert!(one_entry > 0);

    let mut cached = generator(fixture, one_entry + one_entry / 2);
    let mut fresh = generator(fixture, 0);
    greedy(&mut cached, &[&first], 1);
    // An unrelated prompt of the same length takes the only place.
    let unrelated = tokens(9, 25);
    greedy(&mut cached, &[&unrelated], 1);
    let stats = cached.prefix_cache_stats().unwrap();
    assert_eq!((stats.entries, stats.bytes), (1, one_entry));
    // The first prompt's prefix is gone: a miss, computed in full, with the right result.
    let second = [tokens(1, 20), tokens(3, 6)].concat();
    let misses = stats.misses;
    assert_same(
        fixture,
        &greedy(&mut fresh, &[&second], 6),
        &greedy(&mut cached, &[&second], 6),
    );
    assert_eq!(cached.prefix_cache_stats().unwrap().misses, misses + 1);
}
