//! Checkpoints in other formats to Hugging Face folders: PyTorch's zip pickles read natively
//! ([`torch`]) and Megatron-LM's layout mapped as transformers' converters map it ([`megatron`]).

pub mod megatron;
pub mod torch;
