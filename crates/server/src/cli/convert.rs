//! `candlewick convert`: checkpoints of other formats to Hugging Face folders that `serve` loads.
//!
//! `candlewick convert megatron-gpt2 --checkpoint FILE --vocab vocab.json --merges merges.txt
//! --out DIR` reads a Megatron-LM GPT-2 checkpoint (a `.pt` saved by torch >= 1.6, or a release
//! `.zip` holding `release/mp_rank_00/model_optim_rng.pt`) without Python and writes what
//! transformers' `convert_megatron_gpt2_checkpoint.py` writes: the same config values and the same
//! tensors, as safetensors, with the tokenizer files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candlewick_engine::convert::megatron;
use candlewick_engine::convert::torch::Checkpoint;
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `candlewick convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    #[command(subcommand)]
    pub format: Format,
}

/// The formats `convert` reads.
#[derive(Debug, clap::Subcommand)]
pub enum Format {
    /// A Megatron-LM GPT-2 checkpoint (checkpoint_version 0, 1.0 or >= 2.0).
    MegatronGpt2 {
        /// The checkpoint: model_optim_rng.pt, or a .zip holding
        /// release/mp_rank_00/model_optim_rng.pt.
        #[arg(long)]
        checkpoint: PathBuf,
        /// GPT-2's vocab.json.
        #[arg(long)]
        vocab: PathBuf,
        /// GPT-2's merges.txt.
        #[arg(long)]
        merges: PathBuf,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: ConvertArgs) -> Result<()> {
    match args.format {
        Format::MegatronGpt2 {
            checkpoint,
            vocab,
            merges,
            out,
        } => {
            let mut file = Checkpoint::open(&checkpoint)?;
            let bar = ProgressBar::new(0).with_style(
                ProgressStyle::with_template("converting layer {pos}/{len} {bar:40} {elapsed}")
                    .context("the progress bar's template")?,
            );
            let converted = megatron::gpt2(&mut file, |layer, layers| {
                bar.set_length(layers as u64);
                bar.set_position(layer as u64 + 1);
            })?;
            bar.finish_and_clear();
            megatron::write_gpt2_folder(&converted, &vocab, &merges, &out)?;
            eprintln!(
                "wrote {} tensors, config.json and the tokenizer to {}",
                converted.tensors.len(),
                out.display()
            );
            Ok(())
        }
    }
}
