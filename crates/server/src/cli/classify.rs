//! `candlewick classify`: any sequence classifier (an encoder's or a decoder's head) from the
//! command line.

use anyhow::{bail, Result};
use candlewick_engine::encoder::labels::ScoreFunction;
use candlewick_engine::encoder::{EncoderInput, EncoderOutput, EncoderTask};
use candlewick_engine::{load_encoder, LoadOptions};

use crate::ModelArgs;

/// Arguments of `candlewick classify`.
#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A text to classify; repeat for several, scored in one batch.
    #[arg(long, required = true)]
    pub text: Vec<String>,
    /// softmax, sigmoid or none; default from the model's problem_type, as the pipeline does.
    #[arg(long)]
    pub function_to_apply: Option<String>,
    /// Labels to print per text, highest score first; all of them by default.
    #[arg(long)]
    pub top_k: Option<usize>,
}

pub fn run(args: ClassifyArgs) -> Result<()> {
    let Some(_) = args.model.model else {
        bail!("--model is required: the bundled model is a generator, not a classifier");
    };
    let options = LoadOptions {
        device: args.model.device()?,
        dtype: args.model.dtype()?,
        quantize: args.model.quantize()?,
        ..LoadOptions::default()
    };
    let loaded = load_encoder(&args.model.source()?, &options)?;
    let (task, labels) = (loaded.model.task(), loaded.model.labels());
    let Some(labels) = labels.filter(|_| task == EncoderTask::SequenceClassification) else {
        bail!(
            "{} is a {} model, not a sequence classifier",
            loaded.architecture,
            task.name()
        );
    };
    let function = match &args.function_to_apply {
        Some(name) => ScoreFunction::parse(name)?,
        None => labels.default_function,
    };
    let sequences = args
        .text
        .iter()
        .map(|text| loaded.tokenizer.encode(text, true))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(empty) = args
        .text
        .iter()
        .zip(&sequences)
        .find(|(_, ids)| ids.is_empty())
    {
        bail!("{:?} has no tokens", empty.0);
    }
    let inputs: Vec<EncoderInput> = sequences.into_iter().map(EncoderInput::single).collect();
    let logits: Vec<Vec<f32>> = loaded
        .model
        .forward(&inputs)?
        .into_iter()
        .map(|output| match output {
            EncoderOutput::Sequence(row) => Ok(row),
            _ => Err(anyhow::anyhow!(
                "{} did not answer one row of logits per text",
                loaded.architecture
            )),
        })
        .collect::<anyhow::Result<_>>()?;
    for (text, row) in args.text.iter().zip(&logits) {
        let mut scored: Vec<(&String, f32)> =
            labels.names.iter().zip(function.apply(row)).collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!("{text}");
        for (label, score) in scored.iter().take(args.top_k.unwrap_or(usize::MAX)) {
            println!("  {label:<24} {score:.6}");
        }
    }
    Ok(())
}
