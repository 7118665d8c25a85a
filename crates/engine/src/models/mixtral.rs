//! Mixtral (transformers 4.37.2 `modeling_mixtral`): Mistral's attention and rolling cache with a
//! sparse top-k mixture of SiLU-gated experts in place of each dense MLP.

use candle_nn::{Activation, VarBuilder};
use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::models::mistral::{ExpertsConfig, MistralConfig, MistralForCausalLM};

fn default_kv_heads() -> usize {
    8
}
fn default_hidden_act() -> Activation {
    Activation::Silu
}
fn default_max_position_embeddings() -> usize {
    4096 * 32
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    1e6
}
fn default_experts_per_token() -> usize {
    2
}
fn default_local_experts() -> usize {
    8
}

/// config.json of a Mixtral model, with transformers 4.37.2's defaults (which differ from
/// Mistral's: no sliding window, rope_theta 1e6, rms_norm_eps 1e-5).
#[derive(Debug, Clone, Deserialize)]
pub struct MixtralConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_kv_heads")]
    pub num_key_value_heads: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// The attention window W; absent or `null` means full causal attention.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_experts_per_token")]
    pub num_experts_per_tok: usize,
    #[serde(default = "default_local_experts")]
    pub num_local_experts: usize,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

impl MixtralConfig {
    /// The attention and norm settings, shared with Mistral's decoder.
    pub fn decoder(&self) -> MistralConfig {
        MistralConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            hidden_act: self.hidden_act,
            max_position_embeddings: self.max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            sliding_window: self.sliding_window,
            tie_word_embeddings: self.tie_word_embeddings,
            head_dim: self.head_dim,
            rope_scaling: self.rope_scaling.clone(),
        }
    }

    /// The experts of every layer, checked.
    pub fn experts(&self) -> Result<ExpertsConfig> {
        if self.num_local_experts == 0
            || self.num_experts_per_tok == 0
            || self.num_experts_per_tok > self.num_local_experts
        {
            return Err(EngineError::UnsupportedConfig(format!(
                "num_experts_per_tok {} must be between 1 and num_local_experts {}",
                self.num_experts_per_tok, self.num_local_experts
            )));
        }
        Ok(ExpertsConfig {
            num_experts: self.num_local_experts,
            top_k: self.num_experts_per_tok,
        })
    }
}

/// `MixtralForCausalLM`: the checkpoint layout is Mistral's with
/// `block_sparse_moe.{gate, experts.N.{w1,w2,w3}}` in place of `mlp`.
pub fn load_causal_lm(vb: VarBuilder, config: &MixtralConfig) -> Result<MistralForCausalLM> {
    MistralForCausalLM::load_with_experts(vb, &config.decoder(), Some(config.experts()?))
}
