//! Hand-written kernels where they beat candle's generic operations, and the switch that turns
//! them off.

pub mod cpu;

use std::sync::OnceLock;

/// Whether `CANDLEWICK_GENERIC_KERNELS=1` asks every model to run the device-generic code
/// (attention and matmuls as candle tensor operations, what CUDA runs) instead of the CPU
/// kernels, so that this code is tested on every machine. Read once per process.
pub fn generic_only() -> bool {
    static GENERIC: OnceLock<bool> = OnceLock::new();
    *GENERIC
        .get_or_init(|| std::env::var("CANDLEWICK_GENERIC_KERNELS").is_ok_and(|value| value == "1"))
}
