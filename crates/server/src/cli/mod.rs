//! The `candlewick` subcommands: `serve` starts the HTTP server; `generate`, `classify` and
//! `bench` run the engine from the command line; `convert` turns other checkpoint formats into
//! Hugging Face folders.

pub mod bench;
pub mod classify;
pub mod convert;
pub mod generate;
pub mod serve;

use anyhow::Result;
use candlewick_engine::{LoadOptions, ModelFiles, ModelSource};

/// Bytes of the model's weights as loaded (`per_step`: false), or of those one decode step reads
/// (`per_step`: true): every tensor once, except the input embedding (a gather of a few rows)
/// when the output head has weights of its own.
pub fn weight_bytes(source: &ModelSource, options: &LoadOptions, per_step: bool) -> Result<usize> {
    let files = ModelFiles::resolve(source)?;
    let inventory = files.tensor_inventory()?;
    let has_own_head = inventory
        .iter()
        .any(|(name, _, _)| name == "lm_head.weight");
    let dtype = options
        .dtype
        .unwrap_or_else(|| candlewick_engine::models::default_dtype(&options.device));
    // With in-situ quantization, the linear weights (every matrix but the embeddings, and the
    // tied embeddings as the head when the head is quantized) are read in their blocks.
    let quantized_bytes = |name: &str, shape: &[usize]| -> Option<f64> {
        let quantize = options.quantize?;
        let matrix = shape.len() == 2 && quantize.format.fits(shape[1]);
        let head =
            name == "lm_head.weight" || (!has_own_head && name.ends_with("embed_tokens.weight"));
        let linear = matrix && !name.ends_with("embed_tokens.weight") && !name.contains(".gate.");
        ((head && quantize.lm_head && matrix) || (linear && !head))
            .then(|| shape.iter().product::<usize>() as f64 * quantize.format.bytes_per_weight())
    };
    Ok(inventory
        .iter()
        .filter(|(name, _, _)| !(per_step && has_own_head && name.ends_with("embed_tokens.weight")))
        .map(|(name, shape, _)| {
            quantized_bytes(name, shape).map_or_else(
                || shape.iter().product::<usize>() * dtype.size_in_bytes(),
                |bytes| bytes as usize,
            )
        })
        .sum())
}
