//! `candlewick bench`: prefill and decode throughput of the engine on a model, at several batch
//! sizes, with the memory read bandwidth of the machine for the decode floor.

use std::time::Instant;

use anyhow::Result;
use candlewick_engine::{load_generator, GeneratorConfig, LoadOptions, ModelSource, StepRow};
use serde_json::json;

use crate::ModelArgs;

/// Arguments of `candlewick bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub batch_sizes: Vec<usize>,
    /// Prompt length in tokens (random ids).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Decode steps per batch.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let source = args.model.source()?;
    let max_batch = args.batch_sizes.iter().copied().max().unwrap_or(1);
    let options = LoadOptions {
        device: args.model.device()?,
        dtype: args.model.dtype()?,
        quantize: args.model.quantize()?,
        generator: GeneratorConfig {
            max_sequences: max_batch,
            max_context: Some(args.prompt_len + args.new_tokens + 1),
            ..GeneratorConfig::default()
        },
    };
    let weight_bytes = super::weight_bytes(&source, &options, true)?;
    let mut loaded = load_generator(&source, &options)?;
    let generator = &mut loaded.generator;
    let vocab = generator.vocab_size() as u64;

    // A fixed pseudo-random stream of prompt ids, the same in every run.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_id = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (3 + state % (vocab - 3)) as u32
    };

    // Warm-up: one short prefill and decode, so that allocations and thread pools are ready.
    {
        let slot = generator.allocate()?;
        let prompt: Vec<u32> = (0..8).map(|_| next_id()).collect();
        let logits = generator.prefill(&[StepRow {
            slot,
            tokens: &prompt,
        }])?;
        generator.decode(&[(slot, argmax(&logits[0]))])?;
        generator.release(slot);
    }

    let mut results = Vec::new();
    for &batch in &args.batch_sizes {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| (0..args.prompt_len).map(|_| next_id()).collect())
            .collect();
        let slots = (0..batch)
            .map(|_| generator.allocate())
            .collect::<Result<Vec<_>, _>>()?;
        let rows: Vec<StepRow> = slots
            .iter()
            .zip(&prompts)
            .map(|(&slot, prompt)| StepRow {
                slot,
                tokens: prompt,
            })
            .collect();
        let start = Instant::now();
        let mut logits = generator.prefill(&rows)?;
        let prefill = start.elapsed().as_secs_f64();

        let start = Instant::now();
        for _ in 0..args.new_tokens {
            let next: Vec<(usize, u32)> = slots
                .iter()
                .zip(&logits)
                .map(|(&slot, row)| (slot, argmax(row)))
                .collect();
            logits = generator.decode(&next)?;
        }
        let decode = start.elapsed().as_secs_f64();
        for slot in slots {
            generator.release(slot);
        }
        results.push(json!({
            "batch": batch,
            "prefill_tokens_per_s": (batch * args.prompt_len) as f64 / prefill,
            "decode_tokens_per_s": (batch * args.new_tokens) as f64 / decode,
            "decode_step_ms": decode * 1e3 / args.new_tokens as f64,
        }));
    }

    // What quantization costs: the quantized model's logits against the exact model's along the
    // exact model's greedy continuation of one prompt.
    let quality = match options.quantize {
        Some(_) => {
            let prompt: Vec<u32> = (0..args.prompt_len).map(|_| next_id()).collect();
            let (largest, agreement) =
                quantization_cost(&source, &options, generator, &prompt, args.new_tokens)?;
            Some(json!({
                "max_logit_difference": largest,
                "greedy_agreement": agreement,
                "steps": args.new_tokens,
            }))
        }
        None => None,
    };

    let bandwidth = memory_read_bandwidth();
    let report = json!({
        "model": source.display_name(),
        "architecture": loaded.architecture,
        "threads": threads(),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "quantize": options.quantize.map(|q| q.format.name()),
        "decode_weight_bytes": weight_bytes,
        "memory_read_gb_per_s": bandwidth / 1e9,
        "results": results,
        "quantization_cost": quality,
    });
    if args.json {
        println!("{report}");
    } else {
        let floor = bandwidth / weight_bytes as f64;
        println!(
            "{} ({}), {} threads, prompt {} tokens, {} decode steps",
            source.display_name(),
            loaded.architecture,
            threads(),
            args.prompt_len,
            args.new_tokens
        );
        println!(
            "weights read per decode step: {:.1} MB; memory read bandwidth {:.1} GB/s; batch-1 decode floor {:.1} tokens/s",
            weight_bytes as f64 / 1e6,
            bandwidth / 1e9,
            floor
        );
        println!(
            "{:>5}  {:>14}  {:>14}  {:>10}",
            "batch", "prefill tok/s", "decode tok/s", "step ms"
        );
        for r in report["results"].as_array().into_iter().flatten() {
            println!(
                "{:>5}  {:>14.1}  {:>14.1}  {:>10.2}",
                r["batch"],
                r["prefill_tokens_per_s"].as_f64().unwrap_or(0.),
                r["decode_tokens_per_s"].as_f64().unwrap_or(0.),
                r["decode_step_ms"].as_f64().unwrap_or(0.)
            );
        }
        if let Some(quality) = &report["quantization_cost"].as_object() {
            println!(
                "against f32 over {} greedy steps: max |logit difference| {:.4}, greedy agreement {:.3}",
                quality["steps"], quality["max_logit_difference"], quality["greedy_agreement"]
            );
        }
    }
    Ok(())
}

/// The largest |logit - exact logit| and the share of equal greedy choices of `quantized`
/// against the exact model (loaded here), both reading the exact model's greedy continuation
/// of `prompt` for `steps` steps.
fn quantization_cost(
    source: &ModelSource,
    options: &LoadOptions,
    quantized: &mut candlewick_engine::Generator,
    prompt: &[u32],
    steps: usize,
) -> Result<(f32, f64)> {
    let exact_options = LoadOptions {
        quantize: None,
        generator: GeneratorConfig {
            max_sequences: 1,
            ..options.generator.clone()
        },
        ..options.clone()
    };
    let mut exact = load_generator(source, &exact_options)?.generator;
    let (exact_slot, quantized_slot) = (exact.allocate()?, quantized.allocate()?);
    let row = |slot| StepRow {
        slot,
        tokens: prompt,
    };
    let mut expected = exact.prefill(&[row(exact_slot)])?.remove(0);
    let mut actual = quantized.prefill(&[row(quantized_slot)])?.remove(0);
    let (mut largest, mut agree) = (0f32, 0usize);
    for _ in 0..steps {
        for (e, a) in expected.iter().zip(&actual) {
            largest = largest.max((e - a).abs());
        }
        let token = argmax(&expected);
        agree += usize::from(argmax(&actual) == token);
        expected = exact.decode(&[(exact_slot, token)])?.remove(0);
        actual = quantized.decode(&[(quantized_slot, token)])?.remove(0);
    }
    quantized.release(quantized_slot);
    Ok((largest, agree as f64 / steps.max(1) as f64))
}

fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0 as u32
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn memory_read_bandwidth() -> f64 {
    const BYTES: usize = 1 << 30;
    let buffer = vec![1.0f32; BYTES / 4];
    let threads = threads().max(1);
    let chunk = buffer.len().div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let total: f32 = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        // Independent lanes let the compiler vectorise the reduction.
                        let mut lanes = [0f32; 16];
                        for block in part.chunks_exact(16) {
                            for (lane, value) in lanes.iter_mut().zip(block) {
                                *lane += value;
                            }
                        }
                        lanes.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max(BYTES as f64 / seconds);
    }
    best
}
