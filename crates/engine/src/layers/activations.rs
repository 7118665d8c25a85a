//! Activation functions by their transformers names.

use candle_core::{DType, Module, Tensor};

use crate::kernels::cpu::activation::Gated;

use crate::error::{EngineError, Result};

/// An activation function, named as in transformers 4.37.2's `ACT2FN`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HiddenAct {
    /// `gelu`, `gelu_python`: the exact GELU, `x * Φ(x)` with the error function.
    Gelu,
    /// `gelu_10`: the exact GELU clipped to `[-10, 10]`.
    GeluClipped10,
    /// `gelu_new`, `gelu_fast`, `gelu_accurate`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `laplace`: `0.5 * (1 + erf((x - μ) / (σ √2)))` with μ = 0.707107, σ = 0.282095.
    Laplace,
    /// `leaky_relu`: torch's default negative slope, 0.01.
    LeakyRelu,
    /// `linear`: the identity.
    Linear,
    /// `mish`: `x * tanh(softplus(x))`.
    Mish,
    /// `relu`.
    Relu,
    /// `relu2`: `relu(x)^2`.
    Relu2,
    /// `relu6`: `min(max(x, 0), 6)`.
    Relu6,
    /// `sigmoid`.
    Sigmoid,
    /// `silu`, `swish`.
    Silu,
    /// `tanh`.
    Tanh,
}

impl HiddenAct {
    /// The activations transformers knows, by name.
    pub const NAMES: &'static [&'static str] = &[
        "gelu",
        "gelu_10",
        "gelu_fast",
        "gelu_new",
        "gelu_python",
        "gelu_pytorch_tanh",
        "gelu_accurate",
        "laplace",
        "leaky_relu",
        "linear",
        "mish",
        "quick_gelu",
        "relu",
        "relu2",
        "relu6",
        "sigmoid",
        "silu",
        "swish",
        "tanh",
    ];

    /// Parses a `hidden_act` value; unknown names are refused.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" | "gelu_python" => Self::Gelu,
            "gelu_10" => Self::GeluClipped10,
            "gelu_new" | "gelu_fast" | "gelu_accurate" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "laplace" => Self::Laplace,
            "leaky_relu" => Self::LeakyRelu,
            "linear" => Self::Linear,
            "mish" => Self::Mish,
            "relu" => Self::Relu,
            "relu2" => Self::Relu2,
            "relu6" => Self::Relu6,
            "sigmoid" => Self::Sigmoid,
            "silu" | "swish" => Self::Silu,
            "tanh" => Self::Tanh,
            other => {
                return Err(EngineError::UnsupportedConfig(format!(
                    "hidden_act {other:?} is not implemented; known: {}",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }
}

impl Module for HiddenAct {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The sigmoid-gated ones run vectorized and threaded on CPU (candle's are scalar).
        let gated = match self {
            Self::GeluTanh => Some(Gated::GeluTanh),
            Self::Silu => Some(Gated::Silu),
            _ => None,
        };
        if let Some(kind) = gated {
            if x.device().is_cpu() && x.dtype() == DType::F32 && !crate::kernels::generic_only() {
                return x.contiguous()?.apply_op1_no_bwd(&kind);
            }
        }
        match self {
            Self::Gelu => x.gelu_erf(),
            Self::GeluClipped10 => x.gelu_erf()?.clamp(-10f32, 10f32),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Laplace => {
                // transformers' rounded constants (μ is close to, not exactly, 1/√2).
                #[allow(clippy::approx_constant)]
                let (mu, sigma) = (0.707107, 0.282095);
                ((x - mu)? / (sigma * std::f64::consts::SQRT_2))?
                    .erf()?
                    .affine(0.5, 0.5)
            }
            Self::LeakyRelu => x.maximum(&(x * 0.01)?),
            Self::Linear => Ok(x.clone()),
            Self::Mish => {
                // softplus(x) = max(x, 0) + log(1 + exp(-|x|)), which never overflows.
                let softplus = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                x * softplus.tanh()?
            }
            Self::Relu => x.relu(),
            Self::Relu2 => x.relu()?.sqr(),
            Self::Relu6 => x.clamp(0f32, 6f32),
            Self::Sigmoid => candle_nn::ops::sigmoid(x),
            Self::Silu => x.silu(),
            Self::Tanh => x.tanh(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn activations_match_transformers() {
        // Values from transformers 4.37.2's ACT2FN in float32.
        let x = [
            -25.0f32, -12.0, -3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.5, 7.0, 12.0, 25.0,
        ];
        let cases: &[(&str, [f32; 12])] = &[
            (
                "gelu",
                [
                    0.0,
                    0.0,
                    -0.004050225,
                    -0.1586553,
                    -0.1542688,
                    0.0,
                    0.1853734,
                    0.8413447,
                    2.484476,
                    7.0,
                    12.0,
                    25.0,
                ],
            ),
            (
                "gelu_10",
                [
                    0.0,
                    0.0,
                    -0.004050225,
                    -0.1586553,
                    -0.1542688,
                    0.0,
                    0.1853734,
                    0.8413447,
                    2.484476,
                    7.0,
                    10.0,
                    10.0,
                ],
            ),
            (
                "gelu_new",
                [
                    0.0,
                    0.0,
                    -0.003637433,
                    -0.158808,
                    -0.154286,
                    0.0,
                    0.1853709,
                    0.841192,
                    2.484916,
                    7.0,
                    12.0,
                    25.0,
                ],
            ),
            (
                "laplace",
                [
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                    9.387732e-06,
                    0.006094456,
                    0.07448831,
                    0.8504297,
                    1.0,
                    1.0,
                    1.0,
                    1.0,
                ],
            ),
            (
                "leaky_relu",
                [
                    -0.25, -0.12, -0.03, -0.01, -0.005, 0.0, 0.3, 1.0, 2.5, 7.0, 12.0, 25.0,
                ],
            ),
            (
                "mish",
                [
                    -3.471986e-10,
                    -7.373032e-05,
                    -0.1456475,
                    -0.3034014,
                    -0.2207438,
                    0.0,
                    0.2080014,
                    0.8650984,
                    2.471392,
                    6.999989,
                    12.0,
                    25.0,
                ],
            ),
            (
                "quick_gelu",
                [
                    -8.292971e-18,
                    -1.618642e-08,
                    -0.01807131,
                    -0.1542042,
                    -0.1496116,
                    0.0,
                    0.1874841,
                    0.8457958,
                    2.465014,
                    6.999953,
                    12.0,
                    25.0,
                ],
            ),
            (
                "relu2",
                [
                    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.09, 1.0, 6.25, 49.0, 144.0, 625.0,
                ],
            ),
            (
                "relu6",
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 1.0, 2.5, 6.0, 6.0, 6.0],
            ),
            (
                "sigmoid",
                [
                    1.388794e-11,
                    6.144174e-06,
                    0.04742587,
                    0.2689414,
                    0.3775407,
                    0.5,
                    0.5744425,
                    0.7310586,
                    0.9241418,
                    0.999089,
                    0.9999938,
                    1.0,
                ],
            ),
            (
                "swish",
                [
                    -3.471986e-10,
                    -7.373009e-05,
                    -0.1422776,
                    -0.2689414,
                    -0.1887703,
                    0.0,
                    0.1723328,
                    0.7310586,
                    2.310354,
                    6.993623,
                    11.99993,
                    25.0,
                ],
            ),
            (
                "tanh",
                [
                    -1.0, -1.0, -0.9950548, -0.7615942, -0.4621172, 0.0, 0.2913126, 0.7615942,
                    0.9866143, 0.9999983, 1.0, 1.0,
                ],
            ),
        ];
        let input = Tensor::new(&x, &Device::Cpu).unwrap();
        for (name, expected) in cases {
            let actual: Vec<f32> = HiddenAct::parse(name)
                .unwrap()
                .forward(&input)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-5 * e.abs().max(1.0),
                    "{name}({}): ours {a}, transformers {e}",
                    x[i]
                );
            }
        }
        for name in HiddenAct::NAMES {
            assert!(HiddenAct::parse(name).is_ok(), "{name}");
        }
        let error = HiddenAct::parse("gelu_fancy").unwrap_err().to_string();
        assert!(
            error.contains("gelu_fancy") && error.contains("quick_gelu"),
            "{error}"
        );
    }
}
