//! CPU kernels in f32: attention over the rolling cache in place, the decode matmul and the
//! packed-panel GEMM, each dispatched at run time on the CPU's vector extensions.

pub mod activation;
pub mod attention;
pub mod gemm;
pub mod matmul;
mod output;
