//! A linear layer with weights fused or packed once at load, and the matmul it picks per call.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Storage, Tensor};
use candle_nn::VarBuilder;

use crate::error::{EngineError, Result};
use crate::kernels::cpu::{gemm as cpu_gemm, matmul as cpu_matmul};

/// A linear layer `y = x W^T (+ b)` over the last dimension of `x`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, stored as `layout` says.
    weight: Tensor,
    bias: Option<Tensor>,
    layout: WeightLayout,
}

/// How a [`Linear`] stores its weight.
#[derive(Debug, Clone)]
enum WeightLayout {
    /// `[out, in]`, as checkpoints store it.
    Rows,
    /// [`cpu_gemm::pack`]ed panels of `out_dim` outputs (CPU, f32, AVX-512 or AVX2).
    Panels { out_dim: usize },
    /// `[in, out]`, contiguous (CPU, f32, neither AVX-512 nor AVX2): what candle's GEMM reads
    /// best.
    Transposed,
    /// Quantized blocks multiplied by candle's quantized matmul (its AVX2, AVX-512, NEON and
    /// CUDA kernels); `weight` is then empty.
    Quantized { matmul: QMatMul, out_dim: usize },
}

/// In-situ quantization of a model's linear weights at load, in candle's quantized formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightQuantization {
    /// 8-bit blocks of 32 weights with one scale each (ggml's `q8_0`).
    Q8_0,
    /// 4-bit k-quants, super-blocks of 256 weights (ggml's `q4k`).
    Q4K,
}

impl WeightQuantization {
    /// Every format, as [`WeightQuantization::name`] spells them.
    pub const ALL: [Self; 2] = [Self::Q8_0, Self::Q4K];

    /// Parses `q8_0` or `q4k`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|q| q.name() == name)
    }

    /// The format's name, as candle's quantized module spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4k",
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// Bytes one weight takes in this format (a block's bytes over its weights).
    pub fn bytes_per_weight(self) -> f64 {
        let dtype = self.ggml();
        dtype.type_size() as f64 / dtype.block_size() as f64
    }

    /// Whether a weight whose rows are `in_dim` long splits into whole blocks.
    pub fn fits(self, in_dim: usize) -> bool {
        in_dim.is_multiple_of(self.ggml().block_size())
    }
}

impl Linear {
    /// Loads `weight` (`[out, in]`) and, when `bias` is set, `bias` from `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// A layer over an existing weight `[out, in]` and bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            layout: WeightLayout::Rows,
        }
    }

    /// A layer over a weight stored input-major, `[in, out]` (GPT-2's Conv1D), and bias `[out]`,
    /// in the batched layout of [`Linear::into_batched_layout`]: packed straight from the
    /// input-major rows where the CPU GEMM runs, transposed once elsewhere.
    pub fn from_input_major(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (in_dim, out_dim) = weight.dims2()?;
        if weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && !crate::kernels::generic_only()
            && cpu_gemm::available()
        {
            let columns: Vec<f32> = weight.flatten_all()?.to_vec1()?;
            let packed = cpu_gemm::pack_columns(&columns, in_dim, out_dim);
            let len = packed.len();
            return Ok(Self {
                weight: Tensor::from_vec(packed, len, weight.device())?,
                bias,
                layout: WeightLayout::Panels { out_dim },
            });
        }
        Self::new(weight.t()?.contiguous()?, bias).into_batched_layout()
    }

    /// A layer over an existing weight (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Self::new(weight, None)
    }

    /// Several projections of the same input fused into one: their weights are concatenated
    /// along the output dimension once at load, so that each step runs one matmul instead of
    /// several. Fuse before [`Linear::into_batched_layout`].
    pub fn fused(parts: &[Linear]) -> Result<Self> {
        if parts
            .iter()
            .any(|p| !matches!(p.layout, WeightLayout::Rows))
        {
            return Err(candle_core::Error::Msg(
                "layers are fused before they change layout".into(),
            )
            .into());
        }
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if parts.iter().all(|p| p.bias.is_some()) {
            let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// Stores the weight in the layout [`cpu_gemm`] reads, and uses it for every forward
    /// whatever the number of rows: packed panels where the CPU has AVX-512 or AVX2 and FMA (one
    /// weight read in order serves a decode step's few rows as well as a prefill's thousands),
    /// the transposed weight read by candle's GEMM elsewhere. Encoders and decoders both store
    /// their linear layers so. The weight's memory is held once in the new layout (twice when it
    /// is shared, as tied embeddings are). A no-op off CPU, for other dtypes than f32, and under
    /// `CANDLEWICK_GENERIC_KERNELS=1`.
    pub fn into_batched_layout(self) -> Result<Self> {
        if !matches!(self.layout, WeightLayout::Rows)
            || !self.weight.device().is_cpu()
            || self.weight.dtype() != DType::F32
            || crate::kernels::generic_only()
        {
            return Ok(self);
        }
        let (out_dim, in_dim) = self.weight.dims2()?;
        let (weight, layout) = if cpu_gemm::available() {
            let rows: Vec<f32> = self.weight.flatten_all()?.to_vec1()?;
            let packed = cpu_gemm::pack(&rows, out_dim, in_dim);
            let len = packed.len();
            (
                Tensor::from_vec(packed, len, self.weight.device())?,
                WeightLayout::Panels { out_dim },
            )
        } else {
            (self.weight.t()?.contiguous()?, WeightLayout::Transposed)
        };
        Ok(Self {
            weight,
            bias: self.bias,
            layout,
        })
    }

    /// Quantizes the weight to `format` in place of the f32 (or bf16) weight, whatever its
    /// layout; the bias stays as it is. Returns the layer unchanged, and false, when its rows do
    /// not split into whole blocks of the format.
    pub fn quantized(self, format: WeightQuantization) -> Result<(Self, bool)> {
        if !format.fits(self.in_dim()?) {
            return Ok((self, false));
        }
        let this = self.into_rows()?;
        let out_dim = this.weight.dim(0)?;
        let qtensor = QTensor::quantize(&this.weight.to_dtype(DType::F32)?, format.ggml())?;
        let matmul = QMatMul::from_qtensor(qtensor)?;
        let empty = Tensor::zeros(0, this.weight.dtype(), this.weight.device())?;
        Ok((
            Self {
                weight: empty,
                bias: this.bias,
                layout: WeightLayout::Quantized { matmul, out_dim },
            },
            true,
        ))
    }

    /// The same layer with its weight as rows `[out, in]` again.
    fn into_rows(self) -> Result<Self> {
        let weight = match &self.layout {
            WeightLayout::Rows => return Ok(self),
            WeightLayout::Transposed => self.weight.t()?.contiguous()?,
            &WeightLayout::Panels { out_dim } => {
                let packed: Vec<f32> = self.weight.to_vec1()?;
                let in_dim = cpu_gemm::packed_inputs(packed.len(), out_dim);
                let rows = cpu_gemm::unpack(&packed, out_dim, in_dim);
                Tensor::from_vec(rows, (out_dim, in_dim), self.weight.device())?
            }
            WeightLayout::Quantized { .. } => {
                return Err(EngineError::Internal(
                    "the layer is quantized already".into(),
                ))
            }
        };
        Ok(Self {
            weight,
            bias: self.bias,
            layout: WeightLayout::Rows,
        })
    }

    /// Whether the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.layout, WeightLayout::Quantized { .. })
    }

    /// Inputs of the layer.
    fn in_dim(&self) -> Result<usize> {
        Ok(match &self.layout {
            WeightLayout::Rows => self.weight.dim(1)?,
            WeightLayout::Transposed => self.weight.dim(0)?,
            &WeightLayout::Panels { out_dim } => {
                cpu_gemm::packed_inputs(self.weight.elem_count(), out_dim)
            }
            WeightLayout::Quantized { matmul, .. } => match matmul {
                QMatMul::QTensor(q) => q.shape().dims2()?.1,
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dim(1)?,
            },
        })
    }

    /// Outputs of the layer.
    pub fn out_dim(&self) -> Result<usize> {
        Ok(match &self.layout {
            WeightLayout::Rows => self.weight.dim(0)?,
            WeightLayout::Panels { out_dim } | WeightLayout::Quantized { out_dim, .. } => *out_dim,
            WeightLayout::Transposed => self.weight.dim(1)?,
        })
    }
}

/// In-situ quantization of a decoder at load: the format, and whether the output head is
/// quantized too (it is the largest matmul of a small model and the most sensitive one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// The format of the linear weights.
    pub format: WeightQuantization,
    /// Whether the output head (`lm_head`, or the tied embeddings as a head) is quantized.
    pub lm_head: bool,
}

impl QuantizeOptions {
    /// The options a setting names: `q8_0` or `q4k` (the head as `lm_head` says), or `none`
    /// for exact weights. The error names what is accepted.
    pub fn parse(name: &str, lm_head: bool) -> std::result::Result<Option<Self>, String> {
        if name == "none" {
            return Ok(None);
        }
        match WeightQuantization::parse(name) {
            Some(format) => Ok(Some(Self { format, lm_head })),
            None => Err(format!("quantize must be q8_0, q4k or none, got {name:?}")),
        }
    }
}

/// What in-situ quantization did to a model's linear layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuantizeReport {
    /// Layers whose weights are now quantized.
    pub quantized: usize,
    /// Layers left in the model's dtype: their rows do not split into whole blocks, or they
    /// were asked to stay (the head).
    pub kept: usize,
}

/// A part of a model that holds linear layers, quantized in place after load. Routers,
/// embeddings and norms stay in the model's dtype.
pub trait Quantize {
    /// Quantizes every linear weight of `self` to `format`, counting them in `report`.
    fn quantize(&mut self, format: WeightQuantization, report: &mut QuantizeReport) -> Result<()>;
}

impl Quantize for Linear {
    fn quantize(&mut self, format: WeightQuantization, report: &mut QuantizeReport) -> Result<()> {
        let (layer, quantized) = self.clone().quantized(format)?;
        *self = layer;
        if quantized {
            report.quantized += 1;
        } else {
            report.kept += 1;
        }
        Ok(())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Flatten the leading dimensions so that the product is a single 2-D matmul against the
        // transposed (strided, never copied) weight.
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x = x.reshape((rows, in_dim))?;
        let y = match &self.layout {
            WeightLayout::Quantized { matmul, .. } => {
                // The quantized kernels take f32 activations and return f32.
                let dtype = x.dtype();
                matmul.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            &WeightLayout::Panels { out_dim } => {
                // The bias is added inside the kernel.
                let y = packed_matmul(&x, &self.weight, out_dim, self.bias.as_ref())?;
                let mut out_dims = dims.to_vec();
                out_dims[dims.len() - 1] = out_dim;
                return y.reshape(out_dims);
            }
            WeightLayout::Transposed => x.matmul(&self.weight)?,
            WeightLayout::Rows => {
                let on_cpu_f32 = x.device().is_cpu()
                    && x.dtype() == DType::F32
                    && !crate::kernels::generic_only();
                if on_cpu_f32 && rows <= cpu_matmul::MAX_ROWS {
                    skinny_matmul(&x, &self.weight)?
                } else {
                    x.matmul(&self.weight.t()?)?
                }
            }
        };
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = y.dim(1)?;
        y.reshape(out_dims)
    }
}

/// `x W^T + bias` through [`cpu_gemm`] over the packed weight.
fn packed_matmul(
    x: &Tensor,
    packed: &Tensor,
    out_dim: usize,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (rows, k) = x.dims2()?;
    let y = {
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = packed.storage_and_layout();
        let bias_guard = bias.map(|b| b.storage_and_layout());
        let bias_values = match &bias_guard {
            Some((storage, layout)) => Some(cpu_f32(storage, layout)?),
            None => None,
        };
        cpu_gemm::matmul_bias(
            cpu_f32(&x_storage, x_layout)?,
            rows,
            cpu_f32(&w_storage, w_layout)?,
            k,
            out_dim,
            bias_values,
        )
    };
    Tensor::from_vec(y, (rows, out_dim), x.device())
}

/// The values of a contiguous f32 CPU tensor.
fn cpu_f32<'a>(
    storage: &'a Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("a packed CPU weight needs CPU inputs");
    };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("the packed matmul needs contiguous tensors".into())
    })?;
    Ok(&cpu.as_slice::<f32>()?[start..end])
}

/// `x W^T` through [`cpu_matmul`] for the few rows of a decode step on CPU.
fn skinny_matmul(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let (rows, k) = x.dims2()?;
    let n = weight.dim(0)?;
    let y = {
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let (Storage::Cpu(x_cpu), Storage::Cpu(w_cpu)) = (&*x_storage, &*w_storage) else {
            candle_core::bail!("skinny matmul runs on CPU tensors only");
        };
        let x_all = x_cpu.as_slice::<f32>()?;
        let w_all = w_cpu.as_slice::<f32>()?;
        let (x_start, x_end) = x_layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("x is not contiguous".into()))?;
        let (w_start, w_end) = w_layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("weight is not contiguous".into()))?;
        cpu_matmul::matmul_transposed(&x_all[x_start..x_end], rows, &w_all[w_start..w_end], n, k)
    };
    Tensor::from_vec(y, (rows, n), x.device())
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The largest |a - b| relative to the largest |a|.
    fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = a.abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn quantized_layers_stay_close_to_f32_and_refuse_partial_blocks() {
        let device = Device::Cpu;
        let weight = Tensor::randn(0f32, 1., (96, 256), &device).unwrap();
        let bias = Tensor::randn(0f32, 1., 96, &device).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 5, 256), &device).unwrap();
        let exact = Linear::new(weight.clone(), Some(bias.clone()));
        let expected = exact.forward(&x).unwrap();
        // Measured: 0.6% for q8_0, 6% for q4k (both sides are quantized: the activations to
        // 8-bit blocks too).
        for (format, bound) in [
            (WeightQuantization::Q8_0, 0.02),
            (WeightQuantization::Q4K, 0.15),
        ] {
            let (layer, quantized) = exact.clone().quantized(format).unwrap();
            assert!(quantized && layer.is_quantized());
            assert_eq!(layer.out_dim().unwrap(), 96);
            let error = relative_error(&expected, &layer.forward(&x).unwrap());
            eprintln!("{format:?}: relative error {error:.4}");
            assert!(error > 0.0 && error < bound, "{format:?}: {error}");
        }
        let narrow = Linear::new(weight.narrow(1, 0, 96).unwrap(), None);
        let (layer, quantized) = narrow.quantized(WeightQuantization::Q4K).unwrap();
        assert!(!quantized && !layer.is_quantized());
        assert_eq!(
            WeightQuantization::parse("q4k"),
            Some(WeightQuantization::Q4K)
        );
        assert_eq!(WeightQuantization::parse("q8"), None);
    }
}
