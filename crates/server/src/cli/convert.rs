//! `candlewick convert`: checkpoints of other formats to Hugging Face folders that `serve` loads.
//!
//! `candlewick convert megatron-gpt2 --checkpoint FILE --vocab vocab.json --merges merges.txt
//! --out DIR` and `candlewick convert megatron-bert --checkpoint FILE --vocab vocab.txt --out DIR`
//! read a Megatron-LM checkpoint (a `.pt` saved by torch >= 1.6, or a release `.zip` holding
//! `release/mp_rank_00/model_optim_rng.pt`) without Python and write what transformers'
//! `convert_megatron_gpt2_checkpoint.py` and `convert_megatron_bert_checkpoint.py` write: the same
//! config values and the same tensors, as safetensors, with the tokenizer files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candlewick_engine::convert::megatron::{self, ConfigFile, Converted};
use candlewick_engine::convert::torch::Checkpoint;
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `candlewick convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    #[command(subcommand)]
    pub format: Format,
}

/// What every Megatron conversion takes.
#[derive(Debug, clap::Args)]
pub struct MegatronArgs {
    /// The checkpoint: model_optim_rng.pt, or a .zip holding
    /// release/mp_rank_00/model_optim_rng.pt.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The folder to write.
    #[arg(long)]
    out: PathBuf,
    /// A config.json for the model (transformers' `--config_file`), for checkpoints saved without
    /// `args`; the checkpoint's args still set the sizes when it has them.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The formats `convert` reads.
#[derive(Debug, clap::Subcommand)]
pub enum Format {
    /// A Megatron-LM GPT-2 checkpoint (checkpoint_version 0, 1.0 or >= 2.0).
    MegatronGpt2 {
        #[command(flatten)]
        megatron: MegatronArgs,
        /// GPT-2's vocab.json.
        #[arg(long)]
        vocab: PathBuf,
        /// GPT-2's merges.txt.
        #[arg(long)]
        merges: PathBuf,
    },
    /// A Megatron-LM BERT checkpoint (checkpoint_version 0, 1.0 or >= 2.0), written as
    /// MegatronBertForPreTraining (fill-mask and next-sentence prediction).
    MegatronBert {
        #[command(flatten)]
        megatron: MegatronArgs,
        /// BERT's vocab.txt.
        #[arg(long)]
        vocab: PathBuf,
        /// Whether the tokenizer lowercases; by default what the checkpoint's tokenizer_type says.
        #[arg(long)]
        lowercase: Option<bool>,
    },
}

type Converter = fn(
    &mut Checkpoint,
    Option<ConfigFile>,
    &mut dyn FnMut(usize, usize),
) -> Result<Converted, megatron::ConvertError>;

/// Opens the checkpoint and config file and runs `converter` with a progress bar.
fn convert(args: &MegatronArgs, converter: Converter) -> Result<Converted> {
    let mut file = Checkpoint::open(&args.checkpoint)?;
    let config = args.config.as_deref().map(read_json).transpose()?;
    let path = args.config.as_ref().map(|p| p.display().to_string());
    let config_file = config
        .as_ref()
        .zip(path.as_deref())
        .map(|(values, path)| ConfigFile { path, values });
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("converting layer {pos}/{len} {bar:40} {elapsed}")
            .context("the progress bar's template")?,
    );
    let converted = converter(&mut file, config_file, &mut |layer, layers| {
        bar.set_length(layers as u64);
        bar.set_position(layer as u64 + 1);
    })?;
    bar.finish_and_clear();
    Ok(converted)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let (converted, out) = match args.format {
        Format::MegatronGpt2 {
            megatron: args,
            vocab,
            merges,
        } => {
            let converted = convert(&args, |c, f, p| megatron::gpt2(c, f, p))?;
            megatron::write_gpt2_folder(&converted, &vocab, &merges, &args.out)?;
            (converted, args.out)
        }
        Format::MegatronBert {
            megatron: args,
            vocab,
            lowercase,
        } => {
            let converted = convert(&args, |c, f, p| megatron::bert(c, f, p))?;
            let lowercase = megatron::bert_lowercases(&converted, lowercase)?;
            megatron::write_bert_folder(&converted, &vocab, lowercase, &args.out)?;
            (converted, args.out)
        }
    };
    eprintln!(
        "wrote {} tensors, config.json and the tokenizer to {}",
        converted.tensors.len(),
        out.display()
    );
    Ok(())
}
