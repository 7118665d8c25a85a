//! The gated feed-forward block of Llama-style decoders.

use candle_core::{Module, Tensor, D};
use candle_nn::{Activation, VarBuilder};

use crate::error::Result;
use crate::layers::{Linear, Quantize, QuantizeReport, WeightQuantization};

/// `down(act(gate(x)) * up(x))`, with gate and up fused into one projection at load.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate_up: Linear,
    down: Linear,
    activation: Activation,
    intermediate_size: usize,
    span: tracing::Span,
}

impl GatedMlp {
    /// Loads `gate_proj`, `up_proj` and `down_proj` (the Llama/Mistral names).
    pub fn load(
        vb: VarBuilder,
        hidden_size: usize,
        intermediate_size: usize,
        activation: Activation,
    ) -> Result<Self> {
        Self::load_named(
            vb,
            ["gate_proj", "up_proj", "down_proj"],
            hidden_size,
            intermediate_size,
            activation,
        )
    }

    /// Loads the three projections under other names (Mixtral's experts call them w1, w3, w2).
    pub fn load_named(
        vb: VarBuilder,
        [gate, up, down]: [&str; 3],
        hidden_size: usize,
        intermediate_size: usize,
        activation: Activation,
    ) -> Result<Self> {
        let gate = Linear::load(vb.pp(gate), hidden_size, intermediate_size, false)?;
        let up = Linear::load(vb.pp(up), hidden_size, intermediate_size, false)?;
        // Packed panels on CPU: the same GEMM serves decode steps (a row at a time, reading each
        // weight once) and prefill (thousands of rows), with no packing per call.
        Ok(Self {
            gate_up: Linear::fused(&[gate, up])?.into_batched_layout()?,
            down: Linear::load(vb.pp(down), intermediate_size, hidden_size, false)?
                .into_batched_layout()?,
            activation,
            intermediate_size,
            span: tracing::span!(tracing::Level::TRACE, "mlp"),
        })
    }
}

impl Module for GatedMlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let gate_up = self.gate_up.forward(x)?;
        let gate = gate_up.narrow(D::Minus1, 0, self.intermediate_size)?;
        let up = gate_up.narrow(D::Minus1, self.intermediate_size, self.intermediate_size)?;
        let hidden = (self.activation.forward(&gate)? * up)?;
        self.down.forward(&hidden)
    }
}

impl Quantize for GatedMlp {
    fn quantize(&mut self, format: WeightQuantization, report: &mut QuantizeReport) -> Result<()> {
        self.gate_up.quantize(format, report)?;
        self.down.quantize(format, report)
    }
}
