//! The continuous-batching scheduler on the Mistral fixtures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candlewick_engine::sampling::SamplingParams;
use candlewick_engine::{load_generator, GeneratorConfig, LoadOptions, ModelSource};
use candlewick_scheduler::{
    Event, FinishReason, GenerationRequest, Scheduler, SchedulerConfig, SchedulerError,
    StopConditions,
};
use serde::Deserialize;
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Deserialize)]
struct Reference {
    greedy: Greedy,
}

#[derive(Deserialize)]
struct Greedy {
    prompts: Vec<Vec<u32>>,
    alone: Vec<Vec<u32>>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/mistral")
        .join(name)
}

fn reference(name: &str) -> Greedy {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str::<Reference>(&text).unwrap().greedy
}

fn scheduler(
    name: &str,
    slots: usize,
    config: SchedulerConfig,
) -> (Scheduler, Arc<candlewick_engine::Tokenizer>) {
    scheduler_with_cache(name, slots, config, 0)
}

fn scheduler_with_cache(
    name: &str,
    slots: usize,
    config: SchedulerConfig,
    prefix_cache_bytes: usize,
) -> (Scheduler, Arc<candlewick_engine::Tokenizer>) {
    let options = LoadOptions {
        generator: GeneratorConfig {
            max_sequences: slots,
            prefix_cache_bytes,
            ..GeneratorConfig::default()
        },
        ..LoadOptions::default()
    };
    let loaded = load_generator(&ModelSource::Dir(fixture(name)), &options).unwrap();
    let tokenizer = Arc::new(loaded.tokenizer);
    (
        Scheduler::start(loaded.generator, Arc::clone(&tokenizer), config).unwrap(),
        tokenizer,
    )
}

fn limits() -> SchedulerConfig {
    SchedulerConfig {
        max_waiting: 64,
        max_batch_tokens: 256,
        max_input_tokens: 256,
        max_total_tokens: 512,
        request_timeout: Some(Duration::from_secs(60)),
    }
}

fn greedy(prompt: &[u32], max_new_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        stop: StopConditions {
            max_new_tokens,
            ..StopConditions::default()
        },
        constraint: None,
    }
}

/// Tokens and text of a request, and its finish reason.
fn collect(mut events: UnboundedReceiver<Event>) -> (Vec<u32>, String, FinishReason) {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token(token) => {
                tokens.push(token.sampled.token);
                text.push_str(&token.text);
                if let Some(reason) = token.finish {
                    return (tokens, text, reason);
                }
            }
            Event::Failed(message) => panic!("request failed: {message}"),
        }
    }
    panic!("the stream ended without a finish reason");
}

#[test]
fn concurrent_requests_each_get_their_greedy_reference() {
    let reference = reference("w8-gqa2");
    let (scheduler, _) = scheduler("w8-gqa2", 4, limits());
    // Three rounds of every prompt: more requests than slots, so some wait and join running
    // batches between decode steps.
    let receivers: Vec<(usize, UnboundedReceiver<Event>)> = (0..3)
        .flat_map(|_| 0..reference.prompts.len())
        .map(|i| {
            (
                i,
                scheduler.submit(greedy(&reference.prompts[i], 24)).unwrap(),
            )
        })
        .collect();
    for (i, receiver) in receivers {
        let (tokens, _, _) = collect(receiver);
        assert_eq!(tokens, reference.alone[i], "prompt {i}");
    }
}

#[test]
fn requests_sharing_a_prefix_start_from_it_and_get_their_greedy_reference() {
    // Full attention: any shared prefix of a cached prompt is reused. Every prompt is sent three
    // times, concurrently and then one at a time, beside prompts that share a system prompt.
    let name = "nowin-gqa4";
    let reference = reference(name);
    let system: Vec<u32> = (0..24).map(|i| 3 + (i * 37) % 1000).collect();
    let mut prompts: Vec<Vec<u32>> = reference.prompts.clone();
    for tail in [[5u32, 9, 11], [6, 2, 40]] {
        prompts.push([system.clone(), tail.to_vec()].concat());
    }
    let (plain, _) = scheduler(name, 4, limits());
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| collect(plain.submit(greedy(p, 12)).unwrap()).0)
        .collect();
    for (i, alone) in reference.alone.iter().enumerate() {
        assert_eq!(
            &expected[i][..],
            &alone[..12],
            "prompt {i} without the cache"
        );
    }
    let (cached, _) = scheduler_with_cache(name, 4, limits(), 16 << 20);
    let concurrent: Vec<_> = (0..3)
        .flat_map(|_| 0..prompts.len())
        .map(|i| (i, cached.submit(greedy(&prompts[i], 12)).unwrap()))
        .collect();
    for (i, receiver) in concurrent {
        assert_eq!(collect(receiver).0, expected[i], "prompt {i}, concurrent");
    }
    for (i, prompt) in prompts.iter().enumerate() {
        let tokens = collect(cached.submit(greedy(prompt, 12)).unwrap()).0;
        assert_eq!(tokens, expected[i], "prompt {i}, one at a time");
    }
    let stats = cached.stats();
    // At least the one-at-a-time round hits on every prompt.
    assert!(
        stats.prefix_cache_hits() >= prompts.len(),
        "{}",
        stats.prefix_cache_hits()
    );
    assert!(
        stats.prefix_cache_reused_tokens() >= 24,
        "the system prompt is reused"
    );
    assert_eq!(plain.stats().prefix_cache_hits(), 0);
}

#[test]
fn a_burst_sharing_a_system_prompt_waits_for_its_state_and_reuses_it() {
    // Six chats with one 80-token system prompt arrive together: the first computes it, the
    // others wait for its state instead of computing it beside it, then reuse it.
    let name = "nowin-gqa4";
    let system: Vec<u32> = (0..80).map(|i| 3 + (i * 53) % 1000).collect();
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|r| [system.clone(), vec![7 + r, 20 + r, 400 + r]].concat())
        .collect();
    let (plain, _) = scheduler(name, 4, limits());
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| collect(plain.submit(greedy(p, 8)).unwrap()).0)
        .collect();
    let (cached, _) = scheduler_with_cache(name, 4, limits(), 16 << 20);
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| cached.submit(greedy(p, 8)).unwrap())
        .collect();
    for (i, receiver) in receivers.into_iter().enumerate() {
        assert_eq!(collect(receiver).0, expected[i], "chat {i}");
    }
    assert_eq!(cached.stats().prefix_cache_hits(), 5);
    assert!(cached.stats().prefix_cache_reused_tokens() >= 5 * 80);
}

#[test]
fn long_prompts_are_prefilled_in_chunks_within_the_token_budget() {
    let reference = reference("w4-gqa1");
    let config = SchedulerConfig {
        max_batch_tokens: 3,
        ..limits()
    };
    let (scheduler, _) = scheduler("w4-gqa1", 5, config);
    let receivers: Vec<_> = reference
        .prompts
        .iter()
        .map(|p| scheduler.submit(greedy(p, 24)).unwrap())
        .collect();
    for (i, receiver) in receivers.into_iter().enumerate() {
        assert_eq!(collect(receiver).0, reference.alone[i], "prompt {i}");
    }
}

#[test]
fn a_dropped_receiver_frees_its_slot_and_serving_goes_on() {
    let reference = reference("nowin-gqa4");
    let (scheduler, _) = scheduler("nowin-gqa4", 1, limits());
    let max_new_tokens = 470;
    let mut request = greedy(&reference.prompts[0], max_new_tokens);
    request.stop.ignore_eos = true;
    let mut events = scheduler.submit(request).unwrap();
    for _ in 0..2 {
        assert!(matches!(events.blocking_recv(), Some(Event::Token(_))));
    }
    drop(events);
    let deadline = Instant::now() + Duration::from_secs(5);
    while scheduler.stats().running() > 0 {
        assert!(
            Instant::now() < deadline,
            "the cancelled sequence still holds its slot"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The sequence stopped early rather than running to its end.
    let generated = scheduler.stats().generated_tokens();
    assert!(
        generated < max_new_tokens,
        "{generated} tokens generated for a cancelled request"
    );
    let (tokens, _, _) = collect(scheduler.submit(greedy(&reference.prompts[1], 24)).unwrap());
    assert_eq!(tokens, reference.alone[1]);
}

#[test]
fn a_full_queue_is_refused_at_once() {
    let reference = reference("w4-gqa1");
    let config = SchedulerConfig {
        max_waiting: 1,
        ..limits()
    };
    let (scheduler, _) = scheduler("w4-gqa1", 1, config);
    let long = || {
        let mut request = greedy(&reference.prompts[0], 300);
        request.stop.ignore_eos = true;
        request
    };
    let started = Instant::now();
    let results: Vec<_> = (0..4).map(|_| scheduler.submit(long())).collect();
    assert!(started.elapsed() < Duration::from_secs(1));
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(SchedulerError::QueueFull { max_waiting: 1 })))
        .count();
    assert!(
        refused >= 2,
        "one runs, one waits, the rest are refused ({refused} refused)"
    );
    for receiver in results.into_iter().flatten() {
        assert_eq!(collect(receiver).0.len(), 300);
    }
}

#[test]
fn limits_are_refused_with_both_numbers() {
    let (scheduler, _) = scheduler(
        "w4-gqa1",
        1,
        SchedulerConfig {
            max_input_tokens: 10,
            max_total_tokens: 20,
            ..limits()
        },
    );
    let error = scheduler
        .submit(greedy(&[1; 11], 4))
        .unwrap_err()
        .to_string();
    assert!(error.contains("11") && error.contains("10"), "{error}");
    let error = scheduler
        .submit(greedy(&[1; 10], 11))
        .unwrap_err()
        .to_string();
    assert!(error.contains("21") && error.contains("20"), "{error}");
    let error = scheduler
        .submit(greedy(&[5000], 4))
        .unwrap_err()
        .to_string();
    assert!(error.contains("5000"), "{error}");
}

#[test]
fn stop_strings_cut_the_text_and_are_never_streamed() {
    let reference = reference("w8-gqa2");
    let (scheduler, _) = scheduler("w8-gqa2", 2, limits());
    // A stop string taken from a greedy continuation, inside the plain text before any invalid
    // byte run (which random weights produce).
    let (index, full, clean) = (0..reference.prompts.len())
        .map(|i| {
            (
                i,
                collect(scheduler.submit(greedy(&reference.prompts[i], 24)).unwrap()).1,
            )
        })
        .map(|(i, text)| {
            let clean: Vec<char> = text.chars().take_while(|&c| c != '\u{FFFD}').collect();
            (i, text, clean)
        })
        .max_by_key(|(_, _, clean)| clean.len())
        .unwrap();
    assert!(
        clean.len() >= 8,
        "no continuation has enough plain text: {full:?}"
    );
    let stop: String = clean[clean.len() / 2..clean.len() / 2 + 3].iter().collect();
    let expected = &full[..full.find(&stop).unwrap()];
    let mut request = greedy(&reference.prompts[index], 24);
    request.stop.stop_strings = vec!["never appears \u{1F600}".into(), stop.clone()];
    let mut events = scheduler.submit(request).unwrap();
    let mut streamed = String::new();
    while let Some(Event::Token(token)) = events.blocking_recv() {
        streamed.push_str(&token.text);
        assert!(!streamed.contains(&stop));
        if let Some(reason) = token.finish {
            assert_eq!(reason, FinishReason::Stop);
            break;
        }
    }
    assert_eq!(streamed, expected, "stop {stop:?}");
}
