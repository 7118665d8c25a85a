//! `y = x W^T + b` for many rows of `x` on CPU, in f32, with AVX-512 or AVX2 and FMA: the matmul
//! of an encoder's forward pass.
//!
//! candle's GEMM runs 256-bit FMA kernels on CPUs that have 512-bit ones, packs the weight on
//! every call, and adds the bias in a pass of its own. An encoder layer multiplies a few dozen
//! to a few thousand rows by small weights, so these costs show; decoders run it too, for decode
//! steps (a few rows, every weight read once, in order) and prefill alike. Here the weight is packed once
//! at load ([`pack`], through [`crate::layers::Linear::into_batched_layout`]) into panels of 64
//! output columns, each `[k, 64]` and contiguous, so that the kernel streams it in order: a
//! 6-row by 64-column tile of outputs lives in 24 registers while it accumulates over `k`, each
//! step loading four weight vectors and broadcasting six inputs, and the bias seeds the
//! accumulators (the last rows go through 2- and 1-row tiles). Without AVX-512 the same scheme
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
    /// 512-bit registers: panels of 64 columns.
    Avx512,
    /// 256-bit registers with FMA: panels of 16 columns.
    Avx2,
}

impl Kernel {
    /// Output columns per register tile and per packed panel: four vectors with AVX-512, two
    /// with AVX2.
    const fn panel_columns(self) -> usize {
        match self {
            Self::Avx512 => 64,
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
    panels(n, k, |first, out| {
        let rows = &w[first * k..((first + columns).min(n)) * k];
        for (lane, row) in rows.chunks_exact(k).enumerate() {
            for (p, &value) in row.iter().enumerate() {
                out[p * columns + lane] = value;
            }
        }
    })
}

/// [`pack`] of a weight stored input-major, `[k, n]` row-major (GPT-2's Conv1D): the same panels,
/// each row of a panel one contiguous copy.
pub fn pack_columns(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k);
    let columns = panel_columns();
    panels(n, k, |first, out| {
        let width = columns.min(n - first);
        for (p, row) in out.chunks_exact_mut(columns).enumerate() {
            row[..width].copy_from_slice(&w[p * n + first..p * n + first + width]);
        }
    })
}

/// The zeroed panels of a weight of `n` outputs and `k` inputs, each filled by `fill(its first
/// output column, the panel)`. Panels are independent: they are filled in parallel (a model's
/// whole weights pass through here at load).
fn panels(n: usize, k: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let columns = panel_columns();
    let mut packed = vec![0f32; packed_len(n, k)];
    packed
        .par_chunks_mut(k * columns)
        .enumerate()
        .for_each(|(panel, out)| fill(panel * columns, out));
    packed
}

/// The inputs per output of a [`pack`]ed weight of `n` outputs and `len` floats.
pub fn packed_inputs(len: usize, n: usize) -> usize {
    len / (n.div_ceil(panel_columns()) * panel_columns())
}

/// The weight `[n, k]` (row-major) that [`pack`] turned into `packed`.
pub fn unpack(packed: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(packed.len(), packed_len(n, k));
    let columns = panel_columns();
    let mut w = vec![0f32; n * k];
    for (column, row) in w.chunks_exact_mut(k).enumerate() {
        let (panel, lane) = (column / columns, column % columns);
        let base = panel * k * columns + lane;
        for (p, value) in row.iter_mut().enumerate() {
            *value = packed[base + p * columns];
        }
    }
    w
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
        let masks: [__mmask16; 4] =
            std::array::from_fn(|v| lanes(width.saturating_sub(16 * v).min(16)));
        let seed: [__m512; 4] = match bias {
            Some(bias) => std::array::from_fn(|v| {
                _mm512_maskz_loadu_ps(masks[v], bias.as_ptr().wrapping_add(first + 16 * v))
            }),
            None => [_mm512_setzero_ps(); 4],
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
        // Six rows at a time, then twos, then ones: every tile computes each output the same
        // way, so the split does not change a bit.
        while row + 6 <= m {
            tile_6(&panel, x.add(row * k), out.add(row * n));
            row += 6;
        }
        while row + 2 <= m {
            tile_2(&panel, x.add(row * k), out.add(row * n));
            row += 2;
        }
        while row < m {
            tile_1(&panel, x.add(row * k), out.add(row * n));
            row += 1;
        }
    }

    /// One packed panel and where its outputs go.
    struct Panel {
        k: usize,
        /// The panel's `[k, 64]` weights.
        w: *const f32,
        /// Stride of the output rows.
        n: usize,
        /// The panel's columns that exist (all but in the last panel), per vector.
        masks: [__mmask16; 4],
        /// The accumulators' start: the bias, or zeros.
        seed: [__m512; 4],
    }

    fn lanes(count: usize) -> __mmask16 {
        ((1u32 << count) - 1) as __mmask16
    }

    /// Defines a tile function over the listed rows of `x` (row-major with `panel.k` columns)
    /// against the panel, storing them at `out`. Each row keeps four accumulators (64 columns),
    /// so one broadcast input feeds four FMAs: broadcasts take a vector port on some CPUs, and
    /// at one per two FMAs they held the kernel to two thirds of its FMA rate. The accumulators
    /// are named one by one so that they stay in registers whatever the optimisation level,
    /// and the loop advances pointers rather than multiplying indexes.
    macro_rules! tile {
        ($name:ident: $(($row:literal, $a0:ident, $a1:ident, $a2:ident, $a3:ident)),*) => {
            #[target_feature(enable = "avx512f")]
            unsafe fn $name(panel: &Panel, x: *const f32, out: *mut f32) {
                let (k, n) = (panel.k, panel.n);
                let [mask0, mask1, mask2, mask3] = panel.masks;
                $(
                    let mut $a0 = panel.seed[0];
                    let mut $a1 = panel.seed[1];
                    let mut $a2 = panel.seed[2];
                    let mut $a3 = panel.seed[3];
                )*
                let mut w = panel.w;
                let mut xp = x;
                for _ in 0..k {
                    let w0 = _mm512_loadu_ps(w);
                    let w1 = _mm512_loadu_ps(w.add(16));
                    let w2 = _mm512_loadu_ps(w.add(32));
                    let w3 = _mm512_loadu_ps(w.add(48));
                    $(
                        let a = _mm512_set1_ps(*xp.add($row * k));
                        $a0 = _mm512_fmadd_ps(a, w0, $a0);
                        $a1 = _mm512_fmadd_ps(a, w1, $a1);
                        $a2 = _mm512_fmadd_ps(a, w2, $a2);
                        $a3 = _mm512_fmadd_ps(a, w3, $a3);
                    )*
                    w = w.add(PANEL_COLUMNS);
                    xp = xp.add(1);
                }
                $(
                    let o = out.add($row * n);
                    _mm512_mask_storeu_ps(o, mask0, $a0);
                    _mm512_mask_storeu_ps(o.wrapping_add(16), mask1, $a1);
                    _mm512_mask_storeu_ps(o.wrapping_add(32), mask2, $a2);
                    _mm512_mask_storeu_ps(o.wrapping_add(48), mask3, $a3);
                )*
            }
        };
    }

    tile!(tile_6:
        (0, a0, b0, c0, d0),
        (1, a1, b1, c1, d1),
        (2, a2, b2, c2, d2),
        (3, a3, b3, c3, d3),
        (4, a4, b4, c4, d4),
        (5, a5, b5, c5, d5)
    );
    tile!(tile_2: (0, a0, b0, c0, d0), (1, a1, b1, c1, d1));
    tile!(tile_1: (0, a0, b0, c0, d0));
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
    fn packing_input_major_weights_gives_the_same_panels() {
        if !available() {
            return;
        }
        for &(k, n) in &[(1, 1), (33, 17), (64, 130), (7, 64)] {
            let w = values(n * k, 7);
            let transposed: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            assert_eq!(pack_columns(&transposed, k, n), pack(&w, n, k), "({k},{n})");
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

#[cfg(test)]
mod layout_tests {
    #[test]
    fn unpack_inverts_pack_for_partial_panels() {
        if !super::available() {
            return;
        }
        let (n, k) = (70, 5);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
        let packed = super::pack(&w, n, k);
        assert_eq!(super::packed_inputs(packed.len(), n), k);
        assert_eq!(super::unpack(&packed, n, k), w);
    }
}
