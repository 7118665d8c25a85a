//! `y = x W^T + b` for many rows of `x` on CPU, in f32, with AVX-512 or AVX2 and FMA: the matmul
//! of an encoder's forward pass.
//!
//! candle's GEMM runs 256-bit FMA kernels on CPUs that have 512-bit ones, packs the weight on
//! every call, and adds the bias in a pass of its own. An encoder layer multiplies a few dozen
//! to a few thousand rows by small weights, so these costs show. Here the weight is packed once
//! at load ([`pack`], through [`crate::layers::Linear::into_batched_layout`]) into panels of 32
//! output columns, each `[k, 32]` and contiguous, so that the kernel streams it in order: a
//! 12-row by 32-column tile of outputs lives in 24 registers while it accumulates over `k`, each
//! step loading two weight vectors and broadcasting twelve inputs, and the bias seeds the
//! accumulators (the last rows go through 4- and 1-row tiles). Without AVX-512 the same scheme
//! runs on 256-bit registers: panels of 16 columns and tiles of 6 rows (12 accumulators, two
//! weight vectors and a broadcast input fill 15 of the 16 registers). The rows come in blocks
//! that stay in cache while every panel passes them; blocks by panels are split across the
//! rayon pool when the product is large enough to repay the fork.
//!
//! Each output is one FMA chain over `k` in order, whatever the tile or the number of rows, so
//! a sequence's outputs do not depend on which other sequences share its batch.

use rayon::prelude::*;

use crate::kernels::cpu::output::SharedOutput;

/// Below this many multiply-adds a product runs on the calling thread: forking would cost more
/// than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 21;
/// Rows of `x` multiplied by every panel before the next rows: a multiple of every tile's
/// height, small enough that the rows stay in L2 for wide inputs.
const ROW_BLOCK: usize = 96;

/// The instructions the kernel runs on, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// 512-bit registers: panels of 32 columns.
    Avx512,
    /// 256-bit registers with FMA: panels of 16 columns.
    Avx2,
}

impl Kernel {
    /// Output columns per register tile and per packed panel: two vectors.
    const fn panel_columns(self) -> usize {
        match self {
            Self::Avx512 => 32,
            Self::Avx2 => 16,
        }
    }
}

fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx512f") {
                Some(Kernel::Avx512)
            } else if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                Some(Kernel::Avx2)
            } else {
                None
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether this CPU runs the kernel (AVX-512F, or AVX2 with FMA); callers fall back to a
/// general GEMM otherwise.
pub fn available() -> bool {
    kernel().is_some()
}

/// Output columns per register tile and per packed panel on this CPU. Panics where the kernel
/// is not [`available`].
fn panel_columns() -> usize {
    expect_kernel().panel_columns()
}

fn expect_kernel() -> Kernel {
    kernel().expect("cpu_gemm needs AVX-512F, or AVX2 and FMA")
}

/// Floats in the packed form of a weight with `n` outputs and `k` inputs, where the kernel is
/// [`available`].
pub fn packed_len(n: usize, k: usize) -> usize {
    n.div_ceil(panel_columns()) * k * panel_columns()
}

/// The panels of a weight `w` (`[n, k]`, row-major, as checkpoints store it): with `c` =
/// [`panel_columns`], panel `j` holds output columns `c j .. c j + c` as `[k, c]`, zero past `n`.
pub fn pack(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k);
    let columns = panel_columns();
    let mut packed = vec![0f32; packed_len(n, k)];
    // Panels are independent: pack them in parallel (decoders pack per prefill call, where
    // this pass is what the packing costs).
    packed
        .par_chunks_mut(k * columns)
        .enumerate()
        .for_each(|(panel, out)| {
            let first = panel * columns;
            let rows = &w[first * k..((first + columns).min(n)) * k];
            for (lane, row) in rows.chunks_exact(k).enumerate() {
                for (p, &value) in row.iter().enumerate() {
                    out[p * columns + lane] = value;
                }
            }
        });
    packed
}

/// `x` is `[m, k]`, `packed` the [`pack`]ed weight of `n` outputs, `bias` is `[n]`; returns
/// `[m, n]`. Panics when [`available`] is false or the sizes disagree.
pub fn matmul_bias(
    x: &[f32],
    m: usize,
    packed: &[f32],
    k: usize,
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let kernel = expect_kernel();
    assert_eq!(x.len(), m * k);
    assert_eq!(packed.len(), packed_len(n, k));
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n);
    }
    let mut y = vec![0f32; m * n];
    let out = SharedOutput::new(&mut y, n);
    let panels = n.div_ceil(kernel.panel_columns());
    // Work comes in blocks of rows by panels, a block's panels one after another, so that the
    // block's rows of `x` stay in cache while every panel streams past them.
    let blocks = m.div_ceil(ROW_BLOCK);
    let run = |job: usize| {
        let (block, panel) = (job / panels, job % panels);
        let first = block * ROW_BLOCK;
        let rows = ROW_BLOCK.min(m - first);
        let x = &x[first * k..(first + rows) * k];
        // Safety: the kernel's instructions were detected above; the sizes were checked above,
        // the kernel masks the columns past `n`, and jobs write disjoint parts of `y`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let out = out.at(first, 0);
            match kernel {
                Kernel::Avx512 => x86::panel(x, rows, packed, k, n, bias, panel, out),
                Kernel::Avx2 => x86_avx2::panel(x, rows, packed, k, n, bias, panel, out),
            }
        };
    };
    let jobs = blocks * panels;
    if m * n * k >= PARALLEL_MIN_MACS && jobs > 1 {
        (0..jobs).into_par_iter().for_each(run);
    } else {
        (0..jobs).for_each(run);
    }
    y
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Kernel, SharedOutput};
    use std::arch::x86_64::*;

    const PANEL_COLUMNS: usize = Kernel::Avx512.panel_columns();

    /// Panel `index` of every output row.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; the slices must have the sizes `matmul_bias` checks.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel(
        x: &[f32],
        m: usize,
        packed: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
        index: usize,
        out: SharedOutput,
    ) {
        let first = index * PANEL_COLUMNS;
        let width = PANEL_COLUMNS.min(n - first);
        let masks = [lanes(width.min(16)), lanes(width.saturating_sub(16))];
        let seed = match bias {
            Some(bias) => [
                _mm512_maskz_loadu_ps(masks[0], bias.as_ptr().add(first)),
                _mm512_maskz_loadu_ps(masks[1], bias.as_ptr().add(first + 16)),
            ],
            None => [_mm512_setzero_ps(); 2],
        };
        let panel = Panel {
            k,
            w: packed.as_ptr().add(index * k * PANEL_COLUMNS),
            n,
            masks,
            seed,
        };
        let out = out.at(0, first).ptr();
        let x = x.as_ptr();
        let mut row = 0;
        // Twelve rows at a time, then fours, then ones: every tile computes each output the
        // same way, so the split does not change a bit.
        while row + 12 <= m {
            tile_12(&panel, x.add(row * k), out.add(row * n));
            row += 12;
        }
        while row + 4 <= m {
            tile_4(&panel, x.add(row * k), out.add(row * n));
            row += 4;
        }
        while row < m {
            tile_1(&panel, x.add(row * k), out.add(row * n));
            row += 1;
        }
    }

    /// One packed panel and where its outputs go.
    struct Panel {
        k: usize,
        /// The panel's `[k, 32]` weights.
        w: *const f32,
        /// Stride of the output rows.
        n: usize,
        /// The panel's columns that exist (all but in the last panel).
        masks: [__mmask16; 2],
        /// The accumulators' start: the bias, or zeros.
        seed: [__m512; 2],
    }

    fn lanes(count: usize) -> __mmask16 {
        ((1u32 << count) - 1) as __mmask16
    }

    /// Defines a tile function over the listed rows of `x` (row-major with `panel.k` columns)
    /// against the panel, storing them at `out`. The accumulators are named one by one so that
    /// they stay in registers whatever the optimisation level, and the loop advances pointers
    /// rather than multiplying indexes.
    macro_rules! tile {
        ($name:ident: $(($row:literal, $a0:ident, $a1:ident)),*) => {
            #[target_feature(enable = "avx512f")]
            unsafe fn $name(panel: &Panel, x: *const f32, out: *mut f32) {
                let (k, n) = (panel.k, panel.n);
                let [mask0, mask1] = panel.masks;
                $(let mut $a0 = panel.seed[0]; let mut $a1 = panel.seed[1];)*
                let mut w = panel.w;
                let mut xp = x;
                for _ in 0..k {
                    let w0 = _mm512_loadu_ps(w);
                    let w1 = _mm512_loadu_ps(w.add(16));
                    $(
                        let a = _mm512_set1_ps(*xp.add($row * k));
                        $a0 = _mm512_fmadd_ps(a, w0, $a0);
                        $a1 = _mm512_fmadd_ps(a, w1, $a1);
                    )*
                    w = w.add(PANEL_COLUMNS);
                    xp = xp.add(1);
                }
                $(
                    let o = out.add($row * n);
                    _mm512_mask_storeu_ps(o, mask0, $a0);
                    _mm512_mask_storeu_ps(o.add(16), mask1, $a1);
                )*
            }
        };
    }

    tile!(tile_12:
        (0, a0, b0),
        (1, a1, b1),
        (2, a2, b2),
        (3, a3, b3),
        (4, a4, b4),
        (5, a5, b5),
        (6, a6, b6),
        (7, a7, b7),
        (8, a8, b8),
        (9, a9, b9),
        (10, a10, b10),
        (11, a11, b11)
    );
    tile!(tile_4: (0, a0, b0), (1, a1, b1), (2, a2, b2), (3, a3, b3));
    tile!(tile_1: (0, a0, b0));
}

#[cfg(target_arch = "x86_64")]
mod x86_avx2 {
    use super::{Kernel, SharedOutput};
    use std::arch::x86_64::*;

    const PANEL_COLUMNS: usize = Kernel::Avx2.panel_columns();

    /// Panel `index` of every output row.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; the slices must have the sizes `matmul_bias` checks.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn panel(
        x: &[f32],
        m: usize,
        packed: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
        index: usize,
        out: SharedOutput,
    ) {
        let first = index * PANEL_COLUMNS;
        let width = PANEL_COLUMNS.min(n - first);
        let masks = [lanes(width.min(8)), lanes(width.saturating_sub(8))];
        // Masked lanes are neither read nor written, so the pointers past `n` are never used.
        let seed = match bias {
            Some(bias) => [
                _mm256_maskload_ps(bias.as_ptr().wrapping_add(first), masks[0]),
                _mm256_maskload_ps(bias.as_ptr().wrapping_add(first + 8), masks[1]),
            ],
            None => [_mm256_setzero_ps(); 2],
        };
        let panel = Panel {
            k,
            w: packed.as_ptr().add(index * k * PANEL_COLUMNS),
            n,
            full: width == PANEL_COLUMNS,
            masks,
            seed,
        };
        let out = out.at(0, first).ptr();
        let x = x.as_ptr();
        let mut row = 0;
        // Six rows at a time, then fours, then ones: every tile computes each output the same
        // way, so the split does not change a bit.
        while row + 6 <= m {
            tile_6(&panel, x.add(row * k), out.add(row * n));
            row += 6;
        }
        while row + 4 <= m {
            tile_4(&panel, x.add(row * k), out.add(row * n));
            row += 4;
        }
        while row < m {
            tile_1(&panel, x.add(row * k), out.add(row * n));
            row += 1;
        }
    }

    /// One packed panel and where its outputs go.
    struct Panel {
        k: usize,
        /// The panel's `[k, 16]` weights.
        w: *const f32,
        /// Stride of the output rows.
        n: usize,
        /// Whether all 16 columns exist (all panels but the last): plain stores, which are
        /// much faster than masked ones on some CPUs.
        full: bool,
        /// The panel's columns that exist.
        masks: [__m256i; 2],
        /// The accumulators' start: the bias, or zeros.
        seed: [__m256; 2],
    }

    #[target_feature(enable = "avx2")]
    fn lanes(count: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(count as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// As the AVX-512 kernel's `tile!`, on 256-bit vectors.
    macro_rules! tile {
        ($name:ident: $(($row:literal, $a0:ident, $a1:ident)),*) => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name(panel: &Panel, x: *const f32, out: *mut f32) {
                let (k, n) = (panel.k, panel.n);
                $(let mut $a0 = panel.seed[0]; let mut $a1 = panel.seed[1];)*
                let mut w = panel.w;
                let mut xp = x;
                for _ in 0..k {
                    let w0 = _mm256_loadu_ps(w);
                    let w1 = _mm256_loadu_ps(w.add(8));
                    $(
                        let a = _mm256_set1_ps(*xp.add($row * k));
                        $a0 = _mm256_fmadd_ps(a, w0, $a0);
                        $a1 = _mm256_fmadd_ps(a, w1, $a1);
                    )*
                    w = w.add(PANEL_COLUMNS);
                    xp = xp.add(1);
                }
                if panel.full {
                    $(
                        let o = out.add($row * n);
                        _mm256_storeu_ps(o, $a0);
                        _mm256_storeu_ps(o.add(8), $a1);
                    )*
                } else {
                    let [mask0, mask1] = panel.masks;
                    $(
                        let o = out.add($row * n);
                        _mm256_maskstore_ps(o, mask0, $a0);
                        _mm256_maskstore_ps(o.wrapping_add(8), mask1, $a1);
                    )*
                }
            }
        };
    }

    tile!(tile_6:
        (0, a0, b0),
        (1, a1, b1),
        (2, a2, b2),
        (3, a3, b3),
        (4, a4, b4),
        (5, a5, b5)
    );
    tile!(tile_4: (0, a0, b0), (1, a1, b1), (2, a2, b2), (3, a3, b3));
    tile!(tile_1: (0, a0, b0));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        x: &[f32],
        m: usize,
        w: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
                y[i * n + j] = (dot + bias.map_or(0.0, |b| b[j] as f64)) as f32;
            }
        }
        y
    }

    fn values(count: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_a_plain_matmul_for_awkward_shapes() {
        if !available() {
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 33, 17),
            (12, 64, 32),
            (13, 100, 70),
            (40, 128, 96),
            (200, 96, 520),
        ] {
            let (x, w, bias) = (values(m * k, 1), values(n * k, 2), values(n, 3));
            let packed = pack(&w, n, k);
            for bias in [None, Some(bias.as_slice())] {
                let ours = matmul_bias(&x, m, &packed, k, n, bias);
                let expected = reference(&x, m, &w, k, n, bias);
                for (index, (a, b)) in ours.iter().zip(&expected).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "({m},{k},{n}) at {index}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_beside_others() {
        if !available() {
            return;
        }
        let (m, k, n) = (30, 96, 80);
        let (x, w, bias) = (values(m * k, 4), values(n * k, 5), values(n, 6));
        let packed = pack(&w, n, k);
        let together = matmul_bias(&x, m, &packed, k, n, Some(&bias));
        for row in [0, 11, 12, 29] {
            let alone = matmul_bias(&x[row * k..(row + 1) * k], 1, &packed, k, n, Some(&bias));
            assert_eq!(&together[row * n..(row + 1) * n], &alone[..], "row {row}");
        }
    }
}
