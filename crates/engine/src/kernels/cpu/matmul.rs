//! `y = x W^T` for a few rows of `x` on CPU, in f32, against a weight kept as rows `[out, in]`:
//! the layers not packed into panels for [`crate::kernels::cpu::gemm`] (routers, classifier
//! heads) in decode-sized steps.
//!
//! With one to a few rows, a decode step is bound by reading the weights from memory. A general
//! GEMM packs its operands into blocks first, which for a single row means copying every weight
//! once more per step. Here each weight row is read once, straight from the (memory-mapped)
//! matrix, and dotted with a few rows of `x` at a time from registers (a tile of weight rows by
//! rows of `x`, so that each load feeds several FMAs once a batch decodes together), while the
//! next weight rows are already being fetched; weight rows are split across the rayon pool and
//! results written in place. Each output is the same dot product in the same order whatever the
//! number of rows, so a sequence's logits do not depend on which other sequences share its decode
//! batch.

use rayon::prelude::*;

use crate::kernels::cpu::output::SharedOutput;

/// Up to this many rows of `x` take this path; more go to the GEMM, which wins once the
/// arithmetic per weight byte grows (measured by `candlewick bench` on the ~100M Mistral: at 48
/// rows this path decodes 1.7x faster than the GEMM, at 64 rows 1.1x).
pub const MAX_ROWS: usize = 64;

/// Output rows of `W` per parallel task: enough work to amortise scheduling, and enough tasks to
/// balance the pool on small matrices.
const ROWS_PER_TASK: usize = 32;

/// `x` is `[rows, k]`, `w` is `[n, k]`, both row-major; returns `[rows, n]`.
pub fn matmul_transposed(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k);
    assert_eq!(w.len(), n * k);
    let kernel = kernel();
    let mut y = vec![0f32; rows * n];
    let out = SharedOutput::new(&mut y, n);
    (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let first = task * ROWS_PER_TASK;
            let count = ROWS_PER_TASK.min(n - first);
            // Safety: the sizes were checked above; each task writes only its own columns
            // `first..first + count` of the `rows` rows of `y`.
            unsafe {
                kernel(
                    x,
                    rows,
                    &w[first * k..(first + count) * k],
                    k,
                    out.at(0, first),
                )
            };
        });
    y
}

/// Writes `dot(x[i], w[j])` at row `i`, column `j` of `out` for every row of `x` and weight row
/// of `w`.
///
/// # Safety
/// `out` must hold `rows` rows of at least as many columns as `w` has weight rows, and the CPU
/// must support the kernel's instructions.
type Kernel = unsafe fn(&[f32], usize, &[f32], usize, SharedOutput);

fn kernel() -> Kernel {
    static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return x86::dot_rows_avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return x86::dot_rows_avx2;
            }
        }
        dot_rows
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::SharedOutput;
    use std::arch::x86_64::*;

    /// Defines `$name`, a [`super::Kernel`] that covers every weight row of `w` and row of `x`
    /// with `$tile` tiles: weight rows `$weights` at a time (the rest one by one), rows of `x` in
    /// the listed heights, largest first.
    macro_rules! dot_rows {
        ($name:ident, $feature:literal, $tile:ident, $weights:literal, [$($height:literal),*]) => {
            #[doc = concat!("# Safety\nThe CPU must support ", $feature, "; sizes as for a Kernel.")]
            #[target_feature(enable = $feature)]
            #[allow(clippy::int_plus_one)] // `i + height <= rows` for every height, 1 included
            pub unsafe fn $name(x: &[f32], rows: usize, w: &[f32], k: usize, out: SharedOutput) {
                /// `W` weight rows against every row of `x`.
                #[target_feature(enable = $feature)]
                unsafe fn weight_rows<const W: usize>(
                    x: &[f32],
                    rows: usize,
                    w: &[f32],
                    k: usize,
                    out: SharedOutput,
                ) {
                    let mut i = 0;
                    $(
                        while i + $height <= rows {
                            $tile::<W, $height>(x, i, w, k, out);
                            i += $height;
                        }
                    )*
                }
                let n = w.len() / k;
                let mut j = 0;
                while j + $weights <= n {
                    let block = &w[j * k..(j + $weights) * k];
                    weight_rows::<$weights>(x, rows, block, k, out.at(0, j));
                    j += $weights;
                }
                while j < n {
                    weight_rows::<1>(x, rows, &w[j * k..(j + 1) * k], k, out.at(0, j));
                    j += 1;
                }
            }
        };
    }

    dot_rows!(dot_rows_avx512, "avx512f", tile, 4, [4, 1]);
    dot_rows!(dot_rows_avx2, "avx2,fma", tile_avx2, 3, [3, 2, 1]);

    /// A `W x X` tile of outputs held in registers: each step loads `W + X` vectors for `W * X`
    /// FMAs. Every output is accumulated in the same order whatever the tile, so results do not
    /// depend on how many rows share the call.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const W: usize, const X: usize>(
        x: &[f32],
        first: usize,
        w: &[f32],
        k: usize,
        out: SharedOutput,
    ) {
        const WIDTH: usize = 16;
        let vector_k = k - k % WIDTH;
        let mut acc = [[_mm512_setzero_ps(); X]; W];
        let mut offset = 0;
        while offset < vector_k {
            let mut xv = [_mm512_setzero_ps(); X];
            for (i, xv) in xv.iter_mut().enumerate() {
                *xv = _mm512_loadu_ps(x.as_ptr().add((first + i) * k + offset));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm512_loadu_ps(w.as_ptr().add(r * k + offset));
                for (acc, xv) in acc.iter_mut().zip(&xv) {
                    *acc = _mm512_fmadd_ps(*xv, wv, *acc);
                }
            }
            offset += WIDTH;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (i, acc) in acc.iter().enumerate() {
                let input = &x[(first + i) * k..(first + i + 1) * k];
                let weights = &w[r * k..(r + 1) * k];
                out.write(
                    first + i,
                    r,
                    _mm512_reduce_add_ps(*acc) + super::tail(input, weights, vector_k),
                );
            }
        }
    }

    /// A `W x X` tile of outputs in 256-bit registers (at most 3 x 3: nine accumulators, three
    /// inputs and a weight vector fit the sixteen registers), each step loading `W + X` vectors
    /// for `W * X` FMAs. Every output is accumulated and reduced in the same order whatever the
    /// tile, so results do not depend on how many rows share the call.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_avx2<const W: usize, const X: usize>(
        x: &[f32],
        first: usize,
        w: &[f32],
        k: usize,
        out: SharedOutput,
    ) {
        const WIDTH: usize = 8;
        let vector_k = k - k % WIDTH;
        let mut acc = [[_mm256_setzero_ps(); X]; W];
        let mut offset = 0;
        while offset < vector_k {
            let mut xv = [_mm256_setzero_ps(); X];
            for (i, xv) in xv.iter_mut().enumerate() {
                *xv = _mm256_loadu_ps(x.as_ptr().add((first + i) * k + offset));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_ps(w.as_ptr().add(r * k + offset));
                for (acc, xv) in acc.iter_mut().zip(&xv) {
                    *acc = _mm256_fmadd_ps(*xv, wv, *acc);
                }
            }
            // The first pass over these weight rows also asks for the next rows into L2, so
            // that the stream from memory overlaps the passes of the other rows of `x`.
            if first == 0 {
                for r in 0..W {
                    let ahead = w.as_ptr().wrapping_add((W + r) * k + offset);
                    _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                }
            }
            offset += WIDTH;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (i, acc) in acc.iter().enumerate() {
                let input = &x[(first + i) * k..(first + i + 1) * k];
                let weights = &w[r * k..(r + 1) * k];
                let mut lanes = [0f32; WIDTH];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
                let sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                    + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                out.write(first + i, r, sum + super::tail(input, weights, vector_k));
            }
        }
    }
}

/// The portable kernel, for CPUs without AVX2.
///
/// # Safety
/// As [`Kernel`].
unsafe fn dot_rows(x: &[f32], rows: usize, w: &[f32], k: usize, out: SharedOutput) {
    for (j, weights) in w.chunks_exact(k).enumerate() {
        for (i, input) in x.chunks_exact(k).take(rows).enumerate() {
            out.write(i, j, input.iter().zip(weights).map(|(a, b)| a * b).sum());
        }
    }
}

/// The products past the last full vector.
#[inline(always)]
fn tail(input: &[f32], weights: &[f32], from: usize) -> f32 {
    input[from..]
        .iter()
        .zip(&weights[from..])
        .map(|(a, b)| a * b)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * n];
        for i in 0..rows {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matches_a_plain_matmul_for_awkward_shapes() {
        let mut state = 1u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for &(rows, n, k) in &[
            (1, 1, 1),
            (1, 70, 33),
            (3, 65, 64),
            (8, 129, 100),
            (2, 31, 768),
            (16, 7, 40),
            (5, 4, 17),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let ours = matmul_transposed(&x, rows, &w, n, k);
            let expected = reference(&x, rows, &w, n, k);
            for (index, (a, b)) in ours.iter().zip(&expected).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "({rows},{n},{k}) at {index}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_beside_others() {
        let k = 96;
        let n = 40;
        let x: Vec<f32> = (0..4 * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let together = matmul_transposed(&x, 4, &w, n, k);
        let alone = matmul_transposed(&x[2 * k..3 * k], 1, &w, n, k);
        assert_eq!(&together[2 * n..3 * n], &alone[..]);
    }
}
