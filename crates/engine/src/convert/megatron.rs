//! Megatron-LM checkpoints to Hugging Face folders, as transformers 4.37.2's
//! `convert_megatron_gpt2_checkpoint.py` and `convert_megatron_bert_checkpoint.py` convert them:
//! the same config values and the same tensors, bit for bit (written as safetensors).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value as Json};

use crate::convert::torch::{Checkpoint, CheckpointError, TensorRef, Value};

/// Why a checkpoint could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{path}: {reason}")]
    Layout { path: String, reason: String },
    #[error("converting {what}: {source}")]
    Tensor {
        what: String,
        source: candle_core::Error,
    },
}

/// A converted model: config.json's values and the weights by name.
pub struct Converted {
    pub config: BTreeMap<String, Json>,
    pub tensors: Vec<(String, Tensor)>,
}

/// Which converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Bert,
}

/// The parts of a Megatron checkpoint every family reads.
struct Megatron<'a> {
    checkpoint: &'a mut Checkpoint,
    root: Value,
    args: Option<Value>,
    version: f64,
}

impl<'a> Megatron<'a> {
    fn new(checkpoint: &'a mut Checkpoint) -> Self {
        let root = checkpoint.root.clone();
        let args = root
            .get("args")
            .cloned()
            .filter(|a| !matches!(a, Value::None));
        let version = root
            .get("checkpoint_version")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        Self {
            checkpoint,
            root,
            args,
            version,
        }
    }

    fn error(&self, reason: String) -> ConvertError {
        ConvertError::Layout {
            path: self.checkpoint.path().display().to_string(),
            reason,
        }
    }

    /// The value at `path` (dict keys joined by `/`).
    fn at(&self, path: &str) -> Result<&Value, ConvertError> {
        let mut value = &self.root;
        for key in path.split('/') {
            value = value
                .get(key)
                .ok_or_else(|| self.error(format!("the checkpoint has no {path}")))?;
        }
        Ok(value)
    }

    fn tensor_ref(&self, value: &Value, what: &str) -> Result<TensorRef, ConvertError> {
        match value {
            Value::Tensor(tensor) => Ok(tensor.clone()),
            _ => Err(self.error(format!("{what} is not a tensor"))),
        }
    }

    fn read(&mut self, tensor: &TensorRef) -> Result<Tensor, ConvertError> {
        Ok(self.checkpoint.tensor(tensor)?)
    }

    fn tensor(&mut self, path: &str) -> Result<Tensor, ConvertError> {
        let tensor = self.tensor_ref(self.at(path)?, path)?;
        self.read(&tensor)
    }

    /// An integer of `args`, when there are args.
    fn arg_usize(&self, name: &str) -> Result<Option<usize>, ConvertError> {
        let Some(args) = &self.args else {
            return Ok(None);
        };
        match args.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_usize()
                .map(Some)
                .ok_or_else(|| self.error(format!("args.{name} is not a size: {value:?}"))),
        }
    }

    fn required_arg(&self, name: &str) -> Result<Option<usize>, ConvertError> {
        match (&self.args, self.arg_usize(name)?) {
            (Some(_), None) => Err(self.error(format!("args has no {name}"))),
            (_, found) => Ok(found),
        }
    }

    /// The transformer's layer tensors by layer, and its other entries.
    fn layers(&self) -> Result<(BTreeMap<usize, Vec<(String, TensorRef)>>, Value), ConvertError> {
        let lm = self.at("model/language_model")?;
        let transformer = lm
            .get("transformer")
            .or_else(|| lm.get("encoder"))
            .ok_or_else(|| {
                self.error(
                    "the checkpoint has no model/language_model/transformer (or encoder)".into(),
                )
            })?
            .clone();
        let mut layers: BTreeMap<usize, Vec<(String, TensorRef)>> = BTreeMap::new();
        for (key, value) in transformer.entries() {
            let Some((layer, name)) = layer_key(key) else {
                continue;
            };
            layers
                .entry(layer)
                .or_default()
                .push((name.to_owned(), self.tensor_ref(value, key)?));
        }
        Ok((layers, transformer))
    }

    /// `fix_query_key_value_ordering`: the fused QKV rows of this checkpoint version in the
    /// `[q; k; v]` order, each of `heads` heads of `head_dim` rows.
    fn qkv_ordered(
        &self,
        tensor: Tensor,
        heads: usize,
        head_dim: usize,
    ) -> Result<Tensor, ConvertError> {
        let shape = tensor.dims().to_vec();
        let rest = &shape[1..];
        let with_rest = |dims: &[usize]| [dims, rest].concat();
        let wrap = |source| ConvertError::Tensor {
            what: "the query-key-value ordering".into(),
            source,
        };
        let reordered = if self.version == 1.0 {
            tensor
                .reshape(with_rest(&[heads, head_dim, 3]))
                .and_then(|t| t.transpose(0, 2))
                .and_then(|t| t.transpose(1, 2))
                .and_then(|t| t.contiguous())
                .map_err(wrap)?
        } else if self.version >= 2.0 {
            tensor
                .reshape(with_rest(&[heads, 3, head_dim]))
                .and_then(|t| t.transpose(0, 1))
                .and_then(|t| t.contiguous())
                .map_err(wrap)?
        } else {
            tensor
        };
        reordered.reshape(shape).map_err(wrap)
    }
}

/// `layers.N.NAME` as (N, NAME).
fn layer_key(key: &str) -> Option<(usize, &str)> {
    let rest = key.strip_prefix("layers.")?;
    let (index, name) = rest.split_once('.')?;
    let (op, kind) = name.rsplit_once('.')?;
    let op_ok = !op.is_empty()
        && op
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    let kind_ok = !kind.is_empty() && kind.chars().all(|c| c.is_ascii_lowercase());
    (op_ok && kind_ok).then_some(())?;
    Some((index.parse().ok()?, name))
}

fn wrap(what: &str) -> impl Fn(candle_core::Error) -> ConvertError + '_ {
    move |source| ConvertError::Tensor {
        what: what.to_owned(),
        source,
    }
}

/// The tensors of one layer, by Megatron name; fails naming the first missing one.
struct LayerTensors {
    layer: usize,
    tensors: Vec<(String, TensorRef)>,
}

impl LayerTensors {
    fn take(&self, megatron: &Megatron, names: &[&str]) -> Result<TensorRef, ConvertError> {
        self.tensors
            .iter()
            .find(|(name, _)| names.contains(&name.as_str()))
            .map(|(_, t)| t.clone())
            .ok_or_else(|| {
                megatron.error(format!("layer {} has no {} tensor", self.layer, names[0]))
            })
    }
}

const QKV: [&str; 2] = [
    "attention.query_key_value",
    "self_attention.query_key_value",
];
const DENSE: [&str; 2] = ["attention.dense", "self_attention.dense"];

fn names(ops: &[&str], kind: &str) -> Vec<String> {
    ops.iter().map(|op| format!("{op}.{kind}")).collect()
}

fn refs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

/// Converts a Megatron-LM GPT-2 checkpoint as `convert_megatron_gpt2_checkpoint.py` does.
pub fn gpt2(
    checkpoint: &mut Checkpoint,
    mut progress: impl FnMut(usize, usize),
) -> Result<Converted, ConvertError> {
    let mut m = Megatron::new(checkpoint);
    let activation = match &m.args {
        Some(args) if args.get("bias_gelu_fusion").and_then(Value::as_bool) == Some(true) => {
            "gelu_fast"
        }
        Some(args) if args.get("openai_gelu").and_then(Value::as_bool) == Some(true) => "gelu_new",
        Some(_) => "gelu",
        None => "gelu_new",
    };
    let vocab_size = m.required_arg("padded_vocab_size")?.unwrap_or(50257);
    let n_positions = m.required_arg("max_position_embeddings")?.unwrap_or(1024);
    let n_embd = m.required_arg("hidden_size")?.unwrap_or(1024);
    let n_layer = m.required_arg("num_layers")?.unwrap_or(24);
    let n_head = m.required_arg("num_attention_heads")?.unwrap_or(16);
    let n_inner = m
        .arg_usize("ffn_hidden_size")?
        .unwrap_or(if m.args.is_some() { 4 * n_embd } else { 4096 });
    if n_head == 0 || n_embd % n_head != 0 {
        return Err(m.error(format!(
            "hidden size {n_embd} is not a multiple of {n_head} heads"
        )));
    }
    let head_dim = n_embd / n_head;

    let word = m.tensor("model/language_model/embedding/word_embeddings/weight")?;
    let word_rows = word.dim(0).map_err(wrap("word embeddings"))?;
    let wte = word
        .narrow(0, 0, vocab_size.min(word_rows))
        .and_then(|t| t.contiguous())
        .map_err(wrap("word embeddings"))?;
    let wpe = m.tensor("model/language_model/embedding/position_embeddings/weight")?;
    let positions = wpe.dim(0).map_err(wrap("position embeddings"))?;
    if positions != n_positions {
        return Err(m.error(format!(
            "the position embeddings have {positions} rows and the config {n_positions} positions"
        )));
    }
    let (layers, transformer) = m.layers()?;
    let found = layers.keys().next_back().map_or(0, |last| last + 1);
    if found != n_layer || layers.len() != n_layer {
        return Err(m.error(format!(
            "the checkpoint has layers for {} indices up to {found}, and the config {n_layer} layers",
            layers.len()
        )));
    }
    let mut out: Vec<(String, Tensor)> = vec![
        ("transformer.wte.weight".into(), wte.clone()),
        ("transformer.wpe.weight".into(), wpe),
    ];
    let causal = Tensor::tril2(n_positions, DType::F16, &Device::Cpu)
        .and_then(|t| t.reshape((1, 1, n_positions, n_positions)))
        .map_err(wrap("the causal mask"))?;
    let masked_bias = Tensor::new(-1e4f32, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F16))
        .map_err(wrap("masked_bias"))?;
    let transpose = |t: Tensor, what: &str| t.t().and_then(|t| t.contiguous()).map_err(wrap(what));
    for (&layer, tensors) in &layers {
        progress(layer, n_layer);
        let layer_tensors = LayerTensors {
            layer,
            tensors: tensors.clone(),
        };
        let name = |suffix: &str| format!("transformer.h.{layer}.{suffix}");
        for (megatron_name, hf) in [
            ("input_layernorm.weight", "ln_1.weight"),
            ("input_layernorm.bias", "ln_1.bias"),
            ("post_attention_layernorm.weight", "ln_2.weight"),
            ("post_attention_layernorm.bias", "ln_2.bias"),
        ] {
            let tensor = layer_tensors.take(&m, &[megatron_name])?;
            out.push((name(hf), m.read(&tensor)?));
        }
        out.push((name("attn.bias"), causal.clone()));
        out.push((name("attn.masked_bias"), masked_bias.clone()));
        let qkv_weight = m.read(&layer_tensors.take(&m, &refs(&names(&QKV, "weight")))?)?;
        let qkv_weight = m.qkv_ordered(qkv_weight, n_head, head_dim)?;
        out.push((name("attn.c_attn.weight"), transpose(qkv_weight, "c_attn")?));
        let qkv_bias = m.read(&layer_tensors.take(&m, &refs(&names(&QKV, "bias")))?)?;
        out.push((
            name("attn.c_attn.bias"),
            m.qkv_ordered(qkv_bias, n_head, head_dim)?,
        ));
        for (ops, hf) in [
            (&DENSE[..], "attn.c_proj"),
            (&["mlp.dense_h_to_4h"][..], "mlp.c_fc"),
            (&["mlp.dense_4h_to_h"][..], "mlp.c_proj"),
        ] {
            let weight = m.read(&layer_tensors.take(&m, &refs(&names(ops, "weight")))?)?;
            out.push((name(&format!("{hf}.weight")), transpose(weight, hf)?));
            let bias = m.read(&layer_tensors.take(&m, &refs(&names(ops, "bias")))?)?;
            out.push((name(&format!("{hf}.bias")), bias));
        }
    }
    for (megatron_name, hf) in [
        ("final_layernorm.weight", "transformer.ln_f.weight"),
        ("final_layernorm.bias", "transformer.ln_f.bias"),
    ] {
        let tensor = m.tensor_ref(
            transformer
                .get(megatron_name)
                .ok_or_else(|| m.error(format!("the transformer has no {megatron_name}")))?,
            megatron_name,
        )?;
        out.push((hf.into(), m.read(&tensor)?));
    }
    out.push(("lm_head.weight".into(), wte));

    let config = [
        ("activation_function", json!(activation)),
        ("architectures", json!(["GPT2LMHeadModel"])),
        ("attn_pdrop", json!(0.1)),
        ("bos_token_id", json!(50256)),
        ("embd_pdrop", json!(0.1)),
        ("eos_token_id", json!(50256)),
        ("initializer_range", json!(0.02)),
        ("layer_norm_epsilon", json!(1e-5)),
        ("model_type", json!("gpt2")),
        ("n_embd", json!(n_embd)),
        ("n_head", json!(n_head)),
        ("n_inner", json!(n_inner)),
        ("n_layer", json!(n_layer)),
        ("n_positions", json!(n_positions)),
        ("reorder_and_upcast_attn", json!(false)),
        ("resid_pdrop", json!(0.1)),
        ("scale_attn_by_inverse_layer_idx", json!(false)),
        ("scale_attn_weights", json!(true)),
        ("summary_activation", Json::Null),
        ("summary_first_dropout", json!(0.1)),
        ("summary_proj_to_labels", json!(true)),
        ("summary_type", json!("cls_index")),
        ("summary_use_proj", json!(true)),
        ("tokenizer_class", json!("GPT2TokenizerFast")),
        ("transformers_version", json!("4.37.2")),
        ("use_cache", json!(true)),
        ("vocab_size", json!(vocab_size)),
    ];
    Ok(Converted {
        config: config.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        tensors: out,
    })
}

/// Writes `converted` to `out` as a Hugging Face folder: config.json, model.safetensors, and the
/// byte-level BPE tokenizer of `vocab` and `merges` (vocab.json, merges.txt, tokenizer.json,
/// tokenizer_config.json, special_tokens_map.json), checked against the model's vocabulary.
pub fn write_gpt2_folder(
    converted: &Converted,
    vocab: &std::path::Path,
    merges: &std::path::Path,
    out: &std::path::Path,
) -> Result<(), ConvertError> {
    let io = |what: &str, e: &dyn std::fmt::Display| ConvertError::Layout {
        path: out.display().to_string(),
        reason: format!("{what}: {e}"),
    };
    let tokenizer_json = crate::loader::byte_level_bpe_json(vocab, merges, None)
        .map_err(|e| io("building the tokenizer", &e))?;
    let tokenizer = tokenizers::Tokenizer::from_bytes(&tokenizer_json)
        .map_err(|e| io("reading the tokenizer back", &e))?;
    let model_vocab = converted
        .config
        .get("vocab_size")
        .and_then(Json::as_u64)
        .unwrap_or(0) as usize;
    let tokens = tokenizer.get_vocab_size(true);
    if tokens > model_vocab {
        return Err(ConvertError::Layout {
            path: vocab.display().to_string(),
            reason: format!(
                "the tokenizer has {tokens} tokens and the checkpoint's embeddings {model_vocab} rows"
            ),
        });
    }
    std::fs::create_dir_all(out).map_err(|e| io("creating the folder", &e))?;
    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(out.join(name), bytes).map_err(|e| io(&format!("writing {name}"), &e))
    };
    let config = serde_json::to_string_pretty(&converted.config).map_err(|e| io("config", &e))?;
    write("config.json", format!("{config}\n").as_bytes())?;
    let tensors: std::collections::HashMap<String, Tensor> =
        converted.tensors.iter().cloned().collect();
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))
        .map_err(|e| io("writing model.safetensors", &e))?;
    for (source, name) in [(vocab, "vocab.json"), (merges, "merges.txt")] {
        let bytes =
            std::fs::read(source).map_err(|e| io(&format!("reading {}", source.display()), &e))?;
        write(name, &bytes)?;
    }
    write("tokenizer.json", &tokenizer_json)?;
    let eot = "<|endoftext|>";
    let positions = converted
        .config
        .get("n_positions")
        .cloned()
        .unwrap_or(Json::Null);
    let tokenizer_config = json!({
        "add_prefix_space": false,
        "bos_token": eot,
        "clean_up_tokenization_spaces": true,
        "eos_token": eot,
        "model_max_length": positions,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": eot,
    });
    let special = json!({"bos_token": eot, "eos_token": eot, "unk_token": eot});
    for (name, value) in [
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special),
    ] {
        let text = serde_json::to_string_pretty(&value).map_err(|e| io(name, &e))?;
        write(name, format!("{text}\n").as_bytes())?;
    }
    Ok(())
}
