//! Sigmoid-gated activations in f32 over whole buffers: GELU's tanh approximation
//! (`gelu_new`, `gelu_fast`, ...: `0.5 v (1 + tanh(u)) = v σ(2u)`) and SiLU (`v σ(v)`).
//!
//! candle computes them one `tanhf` / `expf` call per element on one thread; at a GPT-2
//! prefill's sizes (`[2048, 4096]` a layer) that is seconds. Here one loop body with an inlined
//! exp (Cody-Waite reduction by ln 2, a degree-6 polynomial, the exponent set by bits: within a
//! few ulp of `expf`) is compiled for AVX-512 and for AVX2 + FMA, chosen at run time, so that the
//! compiler vectorizes it, and large buffers are split across threads. Results differ from
//! candle's by float rounding only.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

/// Elements per task: large enough that a task outweighs its hand-off.
const CHUNK: usize = 1 << 15;

/// Which activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gated {
    /// `v σ(2u)`, `u = √(2/π) (v + 0.044715 v³)`: GELU's tanh approximation.
    GeluTanh,
    /// `v σ(v)`.
    Silu,
}

/// `e^x`, infinite above 88 and zero below -87 (past those the activations' `v / (1 + e^x)`
/// is `-0` or `v` in floats anyway), computed in between, where it stays a normal float.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n * LN2_HI is exact for the n used here.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let input = x;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| <= ln 2 / 2: Taylor to degree 6 (relative error below 3e-7 there).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if input > 88.0 {
        f32::INFINITY
    } else if input < -87.0 {
        0.0
    } else {
        p * scale
    }
}

#[inline(always)]
fn gated(kind: Gated, v: f32) -> f32 {
    let z = match kind {
        Gated::GeluTanh => {
            const SQRT_2_OVER_PI: f32 = 0.797_884_6;
            2.0 * SQRT_2_OVER_PI * v * (1.0 + 0.044715 * v * v)
        }
        Gated::Silu => v,
    };
    v / (1.0 + exp(-z))
}

#[inline(always)]
fn run(kind: Gated, xs: &[f32], ys: &mut [f32]) {
    for (y, &x) in ys.iter_mut().zip(xs) {
        *y = gated(kind, x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn run_avx512(kind: Gated, xs: &[f32], ys: &mut [f32]) {
    run(kind, xs, ys)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(kind: Gated, xs: &[f32], ys: &mut [f32]) {
    run(kind, xs, ys)
}

fn run_best(kind: Gated, xs: &[f32], ys: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { run_avx512(kind, xs, ys) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { run_avx2(kind, xs, ys) };
        }
    }
    run(kind, xs, ys)
}

/// The activation of every element of `xs`.
pub fn apply(kind: Gated, xs: &[f32]) -> Vec<f32> {
    let mut ys = vec![0f32; xs.len()];
    if xs.len() <= CHUNK {
        run_best(kind, xs, &mut ys);
    } else {
        ys.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(ys, xs)| run_best(kind, xs, ys));
    }
    ys
}

impl CustomOp1 for Gated {
    fn name(&self) -> &'static str {
        match self {
            Self::GeluTanh => "candlewick-gelu-tanh",
            Self::Silu => "candlewick-silu",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{} takes f32", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{} takes a contiguous tensor", self.name());
        };
        Ok((
            CpuStorage::F32(apply(*self, &data[start..end])),
            layout.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(kind: Gated, v: f64) -> f64 {
        match kind {
            // 0.5 v (1 + tanh(u)) in the form that keeps its tiny negative values in f64 too.
            Gated::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v);
                v / (1.0 + (-2.0 * u).exp())
            }
            Gated::Silu => v / (1.0 + (-v).exp()),
        }
    }

    #[test]
    fn the_activations_are_within_a_few_ulp_of_the_exact_values() {
        // Every 1/64 from -100 to 100, and the small and huge values in between.
        let mut xs: Vec<f32> = (-6400..=6400).map(|i| i as f32 / 64.0).collect();
        xs.extend([1e-30, -1e-30, 1e-7, -1e-7, 3e4, -3e4, 1e30, -1e30]);
        xs.extend(xs.clone().iter().map(|x| x * 1.37));
        for kind in [Gated::GeluTanh, Gated::Silu] {
            // Large enough to take the threaded path too.
            let repeated: Vec<f32> = xs.iter().cycle().take(5 * CHUNK + 7).copied().collect();
            let ours = apply(kind, &repeated);
            for (&x, &y) in repeated.iter().zip(&ours) {
                let exact = reference(kind, x as f64);
                // exp(-z) turns z's own f32 rounding (relative 2^-24, as in any f32
                // implementation) into a relative error of |z| 2^-24 in the result.
                let z = match kind {
                    Gated::GeluTanh => {
                        1.6 * (x as f64).abs() * (1.0 + 0.044715 * (x as f64).powi(2))
                    }
                    Gated::Silu => (x as f64).abs(),
                };
                if y as f64 == exact || (y.is_nan() && exact.is_nan()) {
                    continue; // infinities and -inf * 0 included
                }
                let error = (y as f64 - exact).abs();
                assert!(
                    error <= 2e-7 * (4.0 + z) * exact.abs() + 1e-36,
                    "{kind:?}({x}) = {y}, exactly {exact}"
                );
            }
            // The dispatched loop and the plain one agree to rounding.
            let mut plain = vec![0f32; xs.len()];
            run(kind, &xs, &mut plain);
            for ((&x, &a), &b) in xs.iter().zip(&apply(kind, &xs)).zip(&plain) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs() + 1e-37,
                    "{kind:?}({x}): {a} vs {b}"
                );
            }
        }
    }
}
