//! Attention of a step's queries over the rolling ring of earlier keys and this step's own keys:
//! one contract, two backends.
//!
//! A model describes its attention once, in an [`AttentionSpec`]: heads, key and value widths,
//! the [`AttentionPattern`] that says which earlier positions a query sees, the scale and the
//! [`ScoreActivation`]. The same spec declares what the layer keeps per sequence
//! ([`AttentionSpec::entries`]), and [`Attention::forward`] builds the masks from the pattern and
//! the rows' positions (see [`mask`]), so no caller ever builds one. The backends:
//! - [`crate::kernels::cpu::attention`], for f32 on CPU: reads the ring in place, skips hidden
//!   keys;
//! - [`generic`], tensor operations on any device and dtype (what CUDA runs), reading each run of
//!   consecutive slots as a view of the ring, never a copy.
//!
//! `CANDLEWICK_GENERIC_KERNELS=1` sends CPU f32 through the generic backend too, so that the code
//! CUDA runs is tested on every machine (see [`crate::kernels::generic_only`]).

mod cpu;
pub mod generic;
pub mod mask;

use candle_core::{DType, Tensor};

use crate::decoder::state::AttentionEntries;
use crate::decoder::step::Step;
use crate::error::{EngineError, Result};

/// Which earlier positions a query at position `p` sees (itself always included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionPattern {
    /// Every earlier position: causal attention.
    Full,
    /// The last W positions, `p - W + 1 ..= p`, as transformers 4.37.2's eager Mistral.
    SlidingWindow(usize),
    /// The earlier positions of the same chunk of C: `C * (p / C) ..= p`.
    Chunked(usize),
}

impl AttentionPattern {
    /// Whether a query at `query` sees the key at `key` (`key <= query`).
    pub fn sees(self, query: usize, key: usize) -> bool {
        match self {
            Self::Full => true,
            Self::SlidingWindow(window) => key + window > query,
            Self::Chunked(chunk) => key / chunk == query / chunk,
        }
    }
}

/// How scores become attention weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreActivation {
    /// Softmax over the visible keys, computed in f32 whatever the model's dtype, as
    /// transformers does.
    Softmax,
}

/// Everything that defines one attention layer's computation over the ring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; query head `i` reads kv head `i / (heads / kv_heads)`, as transformers'
    /// `repeat_kv`.
    pub kv_heads: usize,
    /// Width of a query and key head.
    pub key_width: usize,
    /// Width of a value head.
    pub value_width: usize,
    /// Which earlier positions a query sees.
    pub pattern: AttentionPattern,
    /// Factor of the query-key products.
    pub scale: f64,
    /// How scores become weights.
    pub activation: ScoreActivation,
}

impl AttentionSpec {
    /// Softmax attention with the usual `1 / sqrt(head_dim)` scale and equal key and value widths.
    pub fn softmax(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        pattern: AttentionPattern,
    ) -> Self {
        Self {
            heads,
            kv_heads,
            key_width: head_dim,
            value_width: head_dim,
            pattern,
            scale: 1.0 / (head_dim as f64).sqrt(),
            activation: ScoreActivation::Softmax,
        }
    }

    /// What the layer keeps per sequence.
    pub fn entries(&self) -> AttentionEntries {
        AttentionEntries {
            kv_heads: self.kv_heads,
            key_width: self.key_width,
            value_width: self.value_width,
            pattern: self.pattern,
        }
    }
}

/// An attention layer over the rolling ring.
#[derive(Debug, Clone)]
pub struct Attention {
    spec: AttentionSpec,
}

impl Attention {
    /// The layer `spec` describes.
    pub fn new(spec: AttentionSpec) -> Self {
        Self { spec }
    }

    /// The layer's spec.
    pub fn spec(&self) -> &AttentionSpec {
        &self.spec
    }

    /// Attends `queries` (`[batch, heads, seq, key_width]`) to layer `layer`'s ring entries of
    /// each row's slot followed by this step's `keys` / `values` (`[batch, kv_heads, seq,
    /// width]`), with `bias` (`[batch or 1, heads or 1, seq, ring_len + seq]`, f32) added to the
    /// scaled scores when given. Hands this step's keys and values to `step`, to be stored once
    /// the step succeeds. Returns `[batch, seq, heads * value_width]`.
    pub fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        bias: Option<&Tensor>,
        step: &Step,
        layer: usize,
    ) -> Result<Tensor> {
        let ring = step.ring(layer)?;
        if ring.entries() != self.spec.entries() {
            return Err(EngineError::Internal(format!(
                "layer {layer} attends with {:?} over a ring of {:?}",
                self.spec.entries(),
                ring.entries()
            )));
        }
        let batch = step.batch();
        let capacity = ring.capacity();
        let mask = batch.mask(self.spec.pattern, capacity)?;
        let bias = match bias {
            Some(bias) => {
                let (rows, seq) = (batch.batch_size(), batch.seq_len);
                let key_len = batch.ring_len(capacity) + seq;
                Some(bias.to_dtype(DType::F32)?.broadcast_as((
                    rows,
                    self.spec.heads,
                    seq,
                    key_len,
                ))?)
            }
            None => None,
        };
        let attend = if queries.device().is_cpu()
            && queries.dtype() == DType::F32
            && !crate::kernels::generic_only()
        {
            cpu::attend
        } else {
            generic::attend
        };
        let output = attend(
            &self.spec,
            queries,
            keys,
            values,
            bias.as_ref(),
            &mask,
            ring,
            batch,
        )?;
        step.write_entries(layer, keys.clone(), values.clone())?;
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::state::{SequenceState, StateSpec};
    use crate::decoder::step::{StepBatch, StepRow};
    use candle_core::Device;

    /// Runs the same steps through both backends on twin states; they must agree at every real
    /// position, through ring wrap-arounds, padding, gaps between slots, grouped heads, a bias and
    /// every pattern.
    #[test]
    fn cpu_kernel_and_generic_path_agree() {
        let device = Device::Cpu;
        let (heads, kv_heads, key_width, value_width) = (4, 2, 8, 6);
        for pattern in [
            AttentionPattern::SlidingWindow(5),
            AttentionPattern::Chunked(4),
            AttentionPattern::Full,
        ] {
            for with_bias in [false, true] {
                let spec = AttentionSpec {
                    value_width,
                    ..AttentionSpec::softmax(heads, kv_heads, key_width, pattern)
                };
                let state_spec = StateSpec::uniform_attention(1, spec.entries());
                let mut states = [0, 1].map(|_| {
                    let mut state =
                        SequenceState::new(state_spec.clone(), 4, 64, DType::F32, &device).unwrap();
                    for _ in 0..4 {
                        state.allocate().unwrap();
                    }
                    state
                });
                // Steps of (slot, new tokens): prefills of different lengths, slots out of order
                // and with gaps, then decode-like steps.
                let steps: [&[(usize, usize)]; 5] = [
                    &[(0, 7), (2, 3)],
                    &[(2, 4), (0, 1), (1, 2)],
                    &[(1, 6), (3, 2)],
                    &[(0, 1), (1, 1), (2, 1), (3, 1)],
                    &[(3, 1), (0, 1)],
                ];
                for step_rows in steps {
                    let tokens: Vec<Vec<u32>> =
                        step_rows.iter().map(|&(_, n)| vec![1; n]).collect();
                    let rows: Vec<StepRow> = step_rows
                        .iter()
                        .zip(&tokens)
                        .map(|(&(slot, _), t)| StepRow { slot, tokens: t })
                        .collect();
                    let batch = StepBatch::new(&rows, &states[0], 10, &device).unwrap();
                    let seq = batch.seq_len;
                    let n = rows.len();
                    let q = Tensor::randn(0f32, 1., (n, heads, seq, key_width), &device).unwrap();
                    let k =
                        Tensor::randn(0f32, 1., (n, kv_heads, seq, key_width), &device).unwrap();
                    let v =
                        Tensor::randn(0f32, 1., (n, kv_heads, seq, value_width), &device).unwrap();
                    let key_len = batch.ring_len(states[0].ring(0).unwrap().capacity()) + seq;
                    let bias = with_bias.then(|| {
                        Tensor::randn(0f32, 1., (n, heads, seq, key_len), &device).unwrap()
                    });
                    let mut outputs = Vec::new();
                    for (state, generic) in states.iter_mut().zip([false, true]) {
                        let ring = state.ring(0).unwrap();
                        let mask = batch.mask(pattern, ring.capacity()).unwrap();
                        let attend = if generic {
                            generic::attend
                        } else {
                            cpu::attend
                        };
                        let output =
                            attend(&spec, &q, &k, &v, bias.as_ref(), &mask, ring, &batch).unwrap();
                        outputs.push(output.to_vec3::<f32>().unwrap());
                        let step = Step::new(&batch, state);
                        step.write_entries(0, k.clone(), v.clone()).unwrap();
                        let writes = step.into_writes();
                        state.commit(&batch, writes).unwrap();
                    }
                    let (cpu_rows, generic_rows) = (&outputs[0], &outputs[1]);
                    for (row, &(_, count)) in step_rows.iter().enumerate() {
                        let columns = cpu_rows[row].iter().zip(&generic_rows[row]);
                        for (t, (cpu_column, generic_column)) in
                            columns.enumerate().skip(seq - count)
                        {
                            for (a, b) in cpu_column.iter().zip(generic_column) {
                                assert!(
                                    (a - b).abs() < 1e-5,
                                    "{pattern:?} bias {with_bias} row {row} column {t}: {a} vs {b}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn patterns_say_which_keys_a_query_sees() {
        assert!(AttentionPattern::Full.sees(100, 0));
        assert!(AttentionPattern::SlidingWindow(3).sees(7, 5));
        assert!(!AttentionPattern::SlidingWindow(3).sees(7, 4));
        assert!(AttentionPattern::Chunked(4).sees(7, 4));
        assert!(!AttentionPattern::Chunked(4).sees(8, 7));
    }
}
