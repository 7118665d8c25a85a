//! `candlewick`: serve and run Hugging Face checkpoints.

mod cli;

use std::io::IsTerminal;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use candlewick_engine::{ModelSource, QuantizeOptions};
use clap::{Parser, Subcommand};

use cli::{bench, classify, convert, generate, serve};

#[derive(Debug, Parser)]
#[command(
    name = "candlewick",
    version,
    about = "An inference server for Hugging Face checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(candlewick_server::config::ServeArgs),
    /// Continue a prompt and print the completion as it is generated.
    Generate(generate::GenerateArgs),
    /// Score texts with a sequence classifier and print each label's score.
    Classify(classify::ClassifyArgs),
    /// Measure prefill and decode throughput on a model.
    Bench(bench::BenchArgs),
    /// Convert a checkpoint of another format (Megatron-LM) into a Hugging Face folder.
    Convert(convert::ConvertArgs),
}

/// Which model to load and where to run it.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A model folder or a Hugging Face hub id (owner/name[@revision]); without it, the tiny
    /// model bundled in the binary.
    #[arg(long, env = "CANDLEWICK_MODEL")]
    pub model: Option<String>,
    /// cpu, or cuda[:N] when built with the `cuda` feature.
    #[arg(long, default_value = "cpu", env = "CANDLEWICK_DEVICE")]
    pub device: String,
    /// f32, bf16 or f16; default f32 on CPU and bf16 on CUDA.
    #[arg(long, env = "CANDLEWICK_DTYPE")]
    pub dtype: Option<String>,
    /// Quantize a generator's linear weights at load: q8_0 or q4k; default exact.
    #[arg(long, env = "CANDLEWICK_QUANTIZE")]
    pub quantize: Option<String>,
    /// With --quantize, whether the output head is quantized too.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "CANDLEWICK_QUANTIZE_LM_HEAD")]
    pub quantize_lm_head: bool,
}

impl ModelArgs {
    pub fn source(&self) -> Result<ModelSource> {
        Ok(match &self.model {
            Some(spec) => ModelSource::parse(spec)?,
            None => ModelSource::Bundled,
        })
    }

    pub fn device(&self) -> Result<Device> {
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            spec if spec == "cuda" || spec.starts_with("cuda:") => {
                let ordinal = match spec.strip_prefix("cuda:") {
                    Some(n) => n.parse()?,
                    None => 0,
                };
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device {spec}: this candlewick was built without the `cuda` feature");
                }
                Ok(Device::new_cuda(ordinal)?)
            }
            other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
        }
    }

    pub fn quantize(&self) -> Result<Option<QuantizeOptions>> {
        match self.quantize.as_deref() {
            None => Ok(None),
            Some(name) => QuantizeOptions::parse(name, self.quantize_lm_head)
                .map_err(|message| anyhow::anyhow!("--quantize: {message}")),
        }
    }

    pub fn dtype(&self) -> Result<Option<DType>> {
        Ok(match self.dtype.as_deref() {
            None => None,
            Some("f32") | Some("float32") => Some(DType::F32),
            Some("bf16") | Some("bfloat16") => Some(DType::BF16),
            Some("f16") | Some("float16") => Some(DType::F16),
            Some(other) => bail!("--dtype {other}: expected f32, bf16 or f16"),
        })
    }
}

/// Keeps tensor-sized buffers in the reusable heap. glibc serves allocations above its mmap
/// threshold (128 KiB to start) with fresh pages and unmaps them on free, so every step's
/// activations and logits would fault in newly zeroed pages; that cost a fifth of a decode step.
fn keep_large_allocations_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only adjusts allocator parameters, before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// candle runs its element-wise operations on a pool of its own whose workers spin for a while
/// after each operation, while the matmuls run on the rayon pool: on a machine with few cores
/// the spinning workers take cores from the matmuls (a sixth of an encoder batch's time on two
/// cores). Element-wise work is a small part of a step, so by default it stays on the calling
/// thread; CANDLE_NUM_THREADS set in the environment still decides.
fn keep_elementwise_work_on_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Safety (of the environment): this runs first in main, before any other thread starts.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() -> Result<()> {
    keep_elementwise_work_on_the_calling_thread();
    keep_large_allocations_in_the_heap();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in log files and collectors.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Classify(args) => classify::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Convert(args) => convert::run(args),
    }
}
