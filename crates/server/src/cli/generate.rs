//! `candlewick generate`: the engine from the command line, before any server.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candlewick_engine::grammar::{Grammar, GrammarCompiler};
use candlewick_engine::sampling::SamplingParams;
use candlewick_engine::{load_generator, GeneratorConfig, LoadOptions};
use candlewick_scheduler::{run_batch, GenerationRequest, StopConditions};

use crate::ModelArgs;

/// Arguments of `candlewick generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// TOKEN_ID=BIAS, repeatable.
    #[arg(long, value_parser = parse_bias)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Seed of the sampler; the same seed gives the same text.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Extra token ids that end generation, repeatable.
    #[arg(long)]
    pub stop_token_id: Vec<u32>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print each token's log-probability and this many alternatives after the text.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Constrain the output to JSON valid against the JSON schema in this file.
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to match this regular expression (whole).
    #[arg(long, value_name = "REGEX", group = "constraint")]
    pub regex: Option<String>,
    /// Constrain the output to one of these texts, repeatable.
    #[arg(long, value_name = "TEXT", group = "constraint")]
    pub choice: Vec<String>,
    /// Constrain the output to the Lark grammar in this file (llguidance's dialect).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub grammar: Option<std::path::PathBuf>,
}

/// The grammar the flags ask for, if any.
fn grammar(args: &GenerateArgs) -> Result<Option<Grammar>> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    Ok(if let Some(path) = &args.json_schema {
        let schema = serde_json::from_str(&read(path)?)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Some(Grammar::JsonSchema(schema))
    } else if let Some(regex) = &args.regex {
        Some(Grammar::Regex(regex.clone()))
    } else if !args.choice.is_empty() {
        Some(Grammar::Choice(args.choice.clone()))
    } else if let Some(path) = &args.grammar {
        Some(Grammar::Lark(read(path)?))
    } else {
        None
    })
}

fn parse_bias(spec: &str) -> Result<(u32, f32), String> {
    let (token, bias) = spec
        .split_once('=')
        .ok_or_else(|| format!("expected TOKEN_ID=BIAS, got {spec:?}"))?;
    Ok((
        token
            .trim()
            .parse()
            .map_err(|e| format!("token id {token:?}: {e}"))?,
        bias.trim()
            .parse()
            .map_err(|e| format!("bias {bias:?}: {e}"))?,
    ))
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let source = args.model.source()?;
    let options = LoadOptions {
        device: args.model.device()?,
        dtype: args.model.dtype()?,
        quantize: args.model.quantize()?,
        generator: GeneratorConfig {
            max_sequences: 1,
            ..GeneratorConfig::default()
        },
    };
    let mut loaded = load_generator(&source, &options)?;
    let prompt = loaded.tokenizer.encode(&args.prompt, true)?;
    let constraint = match grammar(&args)? {
        None => None,
        Some(grammar) => {
            let compiler = GrammarCompiler::new(&loaded.tokenizer, loaded.generator.vocab_size())?;
            Some(compiler.compile(&grammar)?)
        }
    };
    let request = GenerationRequest {
        prompt: prompt.clone(),
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            logit_bias: args.logit_bias.iter().copied().collect::<BTreeMap<_, _>>(),
            seed: args.seed,
            logprobs: args.logprobs,
        },
        stop: StopConditions {
            max_new_tokens: args.max_tokens,
            stop_token_ids: args.stop_token_id.clone(),
            ignore_eos: args.ignore_eos,
            stop_strings: Vec::new(),
        },
        constraint,
    };

    let start = Instant::now();
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    stdout.flush()?;
    let mut first_token = None;
    let outputs = run_batch(
        &mut loaded.generator,
        &loaded.tokenizer,
        std::slice::from_ref(&request),
        |_, event| {
            first_token.get_or_insert_with(|| start.elapsed());
            // A closed stdout (e.g. `| head`) should not stop generation with a panic.
            let _ = write!(stdout, "{}", event.text).and_then(|_| stdout.flush());
        },
    )?;
    writeln!(stdout)?;
    let elapsed = start.elapsed();
    let output = &outputs[0];

    if args.logprobs.is_some() {
        for sampled in &output.logprobs {
            let alternatives: Vec<String> = sampled
                .top_logprobs
                .iter()
                .map(|&(token, logprob)| format!("{:?} {logprob:.4}", token_text(&loaded, token)))
                .collect();
            writeln!(
                stdout,
                "{:>8} {:<16} {:>9.4}  [{}]",
                sampled.token,
                format!("{:?}", token_text(&loaded, sampled.token)),
                sampled.logprob,
                alternatives.join(", ")
            )?;
        }
    }
    let decode_time = elapsed - first_token.unwrap_or_default();
    tracing::info!(
        prompt_tokens = prompt.len(),
        generated_tokens = output.tokens.len(),
        finish_reason = output.finish_reason.as_str(),
        time_to_first_token_ms = first_token.unwrap_or_default().as_secs_f64() * 1e3,
        decode_tokens_per_s =
            (output.tokens.len().saturating_sub(1)) as f64 / decode_time.as_secs_f64().max(1e-9),
        "done"
    );
    Ok(())
}

fn token_text(loaded: &candlewick_engine::LoadedGenerator, token: u32) -> String {
    loaded
        .tokenizer
        .decode(&[token], false)
        .unwrap_or_else(|_| format!("<{token}>"))
}
