//! What a sequence keeps between steps.

pub mod kv_ring;
