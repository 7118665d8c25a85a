//! Building blocks shared by the models: linear layers with fused or packed weights, norms,
//! activations, rotary embeddings, the gated MLP and the mixture-of-experts dispatch.

mod activations;
mod linear;
mod mlp;
pub mod moe;
mod norms;
mod rotary;

pub use activations::HiddenAct;
pub use linear::{Linear, Quantize, QuantizeOptions, QuantizeReport, WeightQuantization};
pub use mlp::GatedMlp;
pub use moe::SparseMoe;
pub use norms::{Norm, NormKind, RmsNorm};
pub use rotary::{RotaryEmbedding, RotaryTables};
