//! Sparse mixture of experts (Mixtral's `block_sparse_moe`): a router picks `top_k` experts per
//! token, and each expert runs once on just the tokens routed to it.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Activation, VarBuilder};

use crate::error::Result;
use crate::layers::{GatedMlp, Linear, Quantize, QuantizeReport, WeightQuantization};

/// The tokens one expert processes, with the weight of its output for each.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpertBatch {
    /// Row indexes into the flattened tokens.
    pub tokens: Vec<u32>,
    /// The renormalised routing weight of each of those tokens.
    pub weights: Vec<f32>,
}

/// Routes `tokens` tokens given their router logits (`[tokens, experts]`, row-major), as
/// transformers 4.37.2 does: softmax over the experts in f32, the `top_k` most probable, their
/// probabilities renormalised to sum to one. Every token appears in exactly `top_k` batches, so
/// the experts' work is proportional to `tokens * top_k`, not `tokens * experts`.
pub fn route(router_logits: &[f32], experts: usize, top_k: usize) -> Vec<ExpertBatch> {
    let mut batches = vec![ExpertBatch::default(); experts];
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for (token, logits) in router_logits.chunks_exact(experts).enumerate() {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
        let total: f32 = exp.iter().sum();
        order.clear();
        order.extend(0..experts);
        // Most probable first; equal probabilities keep the lower expert first.
        order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
        let chosen = &order[..top_k.min(experts)];
        let chosen_total: f32 = chosen.iter().map(|&e| exp[e] / total).sum();
        for &expert in chosen {
            batches[expert].tokens.push(token as u32);
            batches[expert]
                .weights
                .push(exp[expert] / total / chosen_total);
        }
    }
    batches
}

/// `MixtralSparseMoeBlock`: the router (`gate`) and the experts (`experts.N.{w1,w3,w2}`, a
/// SiLU-gated MLP each).
#[derive(Debug, Clone)]
pub struct SparseMoe {
    gate: Linear,
    experts: Vec<GatedMlp>,
    top_k: usize,
    span: tracing::Span,
}

impl SparseMoe {
    /// Loads the router and `num_experts` experts.
    pub fn load(
        vb: VarBuilder,
        hidden_size: usize,
        intermediate_size: usize,
        num_experts: usize,
        top_k: usize,
        activation: Activation,
    ) -> Result<Self> {
        let gate = Linear::load(vb.pp("gate"), hidden_size, num_experts, false)?;
        let experts = (0..num_experts)
            .map(|e| {
                GatedMlp::load_named(
                    vb.pp("experts").pp(e),
                    ["w1", "w3", "w2"],
                    hidden_size,
                    intermediate_size,
                    activation,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gate,
            experts,
            top_k,
            span: tracing::span!(tracing::Level::TRACE, "moe"),
        })
    }

    /// Routes every token of `x` (`[..., hidden]`) and sums its experts' weighted outputs.
    ///
    /// On the CPU kernels, and for steps of more than [`DEVICE_ROUTING_MAX_TOKENS`] tokens, the
    /// router's logits go to the host and each expert runs on its own tokens only (one copy per
    /// layer, amortised over the step's tokens). Decode-sized steps on the device-generic path
    /// keep the choices on the device: every expert runs on every token, weighted by a routing
    /// matrix that is zero off the top k, so no layer waits for a copy to the host; the step is
    /// bound by reading the experts' weights either way.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let dims = x.dims().to_vec();
        let hidden = dims[dims.len() - 1];
        let tokens = x.elem_count() / hidden;
        let x = x.reshape((tokens, hidden))?;
        let router_logits = self.gate.forward(&x)?.to_dtype(DType::F32)?;
        let on_device = !x.device().is_cpu() || crate::kernels::generic_only();
        if on_device && tokens <= DEVICE_ROUTING_MAX_TOKENS {
            return self
                .forward_dense(&x, &router_logits)?
                .reshape(dims)
                .map_err(Into::into);
        }
        let router_logits: Vec<f32> = router_logits.flatten_all()?.to_vec1()?;
        let batches = route(&router_logits, self.experts.len(), self.top_k);

        let mut outputs = Vec::with_capacity(self.experts.len());
        let mut destinations = Vec::with_capacity(tokens * self.top_k);
        for (expert, batch) in self.experts.iter().zip(&batches) {
            if batch.tokens.is_empty() {
                continue;
            }
            let rows = Tensor::new(batch.tokens.as_slice(), x.device())?;
            let weights = Tensor::new(batch.weights.as_slice(), x.device())?
                .to_dtype(x.dtype())?
                .unsqueeze(1)?;
            let output = expert.forward(&x.index_select(&rows, 0)?)?;
            outputs.push(output.broadcast_mul(&weights)?);
            destinations.extend_from_slice(&batch.tokens);
        }
        let outputs = Tensor::cat(&outputs, 0)?;
        let destinations = Tensor::new(destinations.as_slice(), x.device())?;
        Ok(x.zeros_like()?
            .index_add(&destinations, &outputs, 0)?
            .reshape(dims)?)
    }

    /// Every expert on every token of `x` (`[tokens, hidden]`), summed with the weights of
    /// [`routing_weights`]: the same result as the sparse path, all on the device.
    fn forward_dense(&self, x: &Tensor, router_logits: &Tensor) -> Result<Tensor> {
        let weights = routing_weights(router_logits, self.top_k)?.to_dtype(x.dtype())?;
        let mut sum: Option<Tensor> = None;
        for (expert, mlp) in self.experts.iter().enumerate() {
            let output = mlp
                .forward(x)?
                .broadcast_mul(&weights.narrow(1, expert, 1)?)?;
            sum = Some(match sum {
                Some(sum) => (sum + output)?,
                None => output,
            });
        }
        Ok(sum.expect("a mixture has at least one expert"))
    }
}

/// The experts are quantized; the router stays in the model's dtype (it is small, and its
/// choices decide which experts run at all).
impl Quantize for SparseMoe {
    fn quantize(&mut self, format: WeightQuantization, report: &mut QuantizeReport) -> Result<()> {
        for expert in &mut self.experts {
            expert.quantize(format, report)?;
        }
        Ok(())
    }
}

/// Steps of at most this many tokens route on the device when the model runs the device-generic
/// code: a decode step of a full batch, not a long prefill chunk.
pub const DEVICE_ROUTING_MAX_TOKENS: usize = 64;

/// `[tokens, experts]` f32 routing weights from the router's f32 logits, on their device:
/// softmax over the experts, the `top_k` most probable kept and renormalised to sum to one,
/// zero elsewhere. What [`route`] computes, as a dense matrix.
pub fn routing_weights(router_logits: &Tensor, top_k: usize) -> Result<Tensor> {
    let probabilities = candle_nn::ops::softmax_last_dim(router_logits)?;
    let experts = probabilities.dim(1)?;
    let chosen = probabilities
        .arg_sort_last_dim(false)?
        .narrow(1, 0, top_k.min(experts))?
        .contiguous()?;
    let chosen_probabilities = probabilities.gather(&chosen, 1)?;
    let renormalised = chosen_probabilities.broadcast_div(&chosen_probabilities.sum_keepdim(1)?)?;
    Ok(probabilities
        .zeros_like()?
        .scatter_add(&chosen, &renormalised, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_picks_the_top_k_and_renormalises_their_probabilities() {
        // Token 0 prefers experts 2 then 0; token 1 prefers 1 then 3.
        let logits = [1.0, -1.0, 2.0, 0.0, 0.0, 3.0, -2.0, 1.0];
        let batches = route(&logits, 4, 2);
        assert_eq!(batches[0].tokens, vec![0]);
        assert_eq!(batches[1].tokens, vec![1]);
        assert_eq!(batches[2].tokens, vec![0]);
        assert_eq!(batches[3].tokens, vec![1]);
        // exp(2) / (exp(2) + exp(1)) for token 0's first expert.
        let expected = 2f32.exp() / (2f32.exp() + 1f32.exp());
        assert!((batches[2].weights[0] - expected).abs() < 1e-6);
        assert!((batches[2].weights[0] + batches[0].weights[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn device_routing_weights_are_the_host_routes_as_a_matrix() {
        let (tokens, experts, top_k) = (37, 8, 2);
        let logits: Vec<f32> = (0..tokens * experts)
            .map(|i| ((i * 7919) % 101) as f32 / 17.0 - 3.0)
            .collect();
        let batches = route(&logits, experts, top_k);
        let mut expected = vec![vec![0f32; experts]; tokens];
        for (expert, batch) in batches.iter().enumerate() {
            for (&token, &weight) in batch.tokens.iter().zip(&batch.weights) {
                expected[token as usize][expert] = weight;
            }
        }
        let device = candle_core::Device::Cpu;
        let logits = Tensor::from_vec(logits, (tokens, experts), &device).unwrap();
        let weights: Vec<Vec<f32>> = routing_weights(&logits, top_k).unwrap().to_vec2().unwrap();
        for (token, (row, expected_row)) in weights.iter().zip(&expected).enumerate() {
            for (expert, (a, b)) in row.iter().zip(expected_row).enumerate() {
                assert!(
                    (a - b).abs() < 1e-6,
                    "token {token} expert {expert}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn expert_work_is_tokens_times_top_k_not_tokens_times_experts() {
        let (tokens, experts, top_k) = (1000, 8, 2);
        let logits: Vec<f32> = (0..tokens * experts)
            .map(|i| ((i * 7919) % 101) as f32 / 17.0)
            .collect();
        let batches = route(&logits, experts, top_k);
        let rows: usize = batches.iter().map(|b| b.tokens.len()).sum();
        assert_eq!(rows, tokens * top_k);
        for token in 0..tokens as u32 {
            let total: f32 = batches
                .iter()
                .flat_map(|b| b.tokens.iter().zip(&b.weights))
                .filter(|(&t, _)| t == token)
                .map(|(_, &w)| w)
                .sum();
            assert!(
                (total - 1.0).abs() < 1e-5,
                "token {token}: weights sum to {total}"
            );
        }
    }
}
