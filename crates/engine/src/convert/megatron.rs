//! Megatron-LM checkpoints to Hugging Face folders, as transformers 4.37.2's
//! `convert_megatron_gpt2_checkpoint.py` and `convert_megatron_bert_checkpoint.py` convert them:
//! the same config values and the same tensors, bit for bit (written as safetensors).

use std::collections::BTreeMap;
use std::path::Path;

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

/// Each layer's tensors, by layer index.
type ByLayer = BTreeMap<usize, LayerTensors>;

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

    /// For a size mismatch: where the sizes came from when the checkpoint has no `args`.
    fn config_hint(&self) -> &'static str {
        if self.args.is_some() {
            ""
        } else {
            " (the checkpoint has no args, so the sizes are the 345M model's: pass --config \
             with the model's config.json)"
        }
    }

    /// Every layer index below `n_layer` is there, and no other.
    fn check_layers<T>(
        &self,
        layers: &BTreeMap<usize, T>,
        n_layer: usize,
    ) -> Result<(), ConvertError> {
        let found = layers.keys().next_back().map_or(0, |last| last + 1);
        if found != n_layer || layers.len() != n_layer {
            return Err(self.error(format!(
                "the checkpoint has layers for {} indices up to {found}, and the config {n_layer} \
                 layers{}",
                layers.len(),
                self.config_hint()
            )));
        }
        Ok(())
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
    fn layers(&self) -> Result<(ByLayer, Value), ConvertError> {
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
        let mut layers = ByLayer::new();
        for (key, value) in transformer.entries() {
            let Some((layer, name)) = layer_key(key) else {
                continue;
            };
            layers
                .entry(layer)
                .or_insert_with(|| LayerTensors {
                    layer,
                    tensors: Vec::new(),
                })
                .tensors
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
    /// The tensor under the first of `names` this layer has, read.
    fn read(&self, megatron: &mut Megatron, names: &[&str]) -> Result<Tensor, ConvertError> {
        let tensor = self.take(megatron, names)?;
        megatron.read(&tensor)
    }

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

/// transformers' `GPT2Config()` as config.json spells it.
fn gpt2_defaults() -> BTreeMap<String, Json> {
    let defaults = [
        ("activation_function", json!("gelu_new")),
        ("attn_pdrop", json!(0.1)),
        ("bos_token_id", json!(50256)),
        ("embd_pdrop", json!(0.1)),
        ("eos_token_id", json!(50256)),
        ("initializer_range", json!(0.02)),
        ("layer_norm_epsilon", json!(1e-5)),
        ("model_type", json!("gpt2")),
        ("n_embd", json!(768)),
        ("n_head", json!(12)),
        ("n_inner", Json::Null),
        ("n_layer", json!(12)),
        ("n_positions", json!(1024)),
        ("reorder_and_upcast_attn", json!(false)),
        ("resid_pdrop", json!(0.1)),
        ("scale_attn_by_inverse_layer_idx", json!(false)),
        ("scale_attn_weights", json!(true)),
        ("summary_activation", Json::Null),
        ("summary_first_dropout", json!(0.1)),
        ("summary_proj_to_labels", json!(true)),
        ("summary_type", json!("cls_index")),
        ("summary_use_proj", json!(true)),
        ("transformers_version", json!(TRANSFORMERS_VERSION)),
        ("use_cache", json!(true)),
        ("vocab_size", json!(50257)),
    ];
    defaults
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// transformers' `MegatronBertConfig()` as config.json spells it.
fn bert_defaults() -> BTreeMap<String, Json> {
    let defaults = [
        ("attention_probs_dropout_prob", json!(0.1)),
        ("hidden_act", json!("gelu")),
        ("hidden_dropout_prob", json!(0.1)),
        ("hidden_size", json!(1024)),
        ("initializer_range", json!(0.02)),
        ("intermediate_size", json!(4096)),
        ("layer_norm_eps", json!(1e-12)),
        ("max_position_embeddings", json!(512)),
        ("model_type", json!("megatron-bert")),
        ("num_attention_heads", json!(16)),
        ("num_hidden_layers", json!(24)),
        ("pad_token_id", json!(0)),
        ("position_embedding_type", json!("absolute")),
        ("transformers_version", json!(TRANSFORMERS_VERSION)),
        ("type_vocab_size", json!(2)),
        ("use_cache", json!(true)),
        ("vocab_size", json!(29056)),
    ];
    defaults
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// The converters' config.json says it was written by this version.
const TRANSFORMERS_VERSION: &str = "4.37.2";

/// The class defaults with a `--config` file's values over them (`from_json_file`).
fn with_config_file(
    mut defaults: BTreeMap<String, Json>,
    file: &Json,
    path: &str,
) -> Result<BTreeMap<String, Json>, ConvertError> {
    let Json::Object(values) = file else {
        return Err(ConvertError::Layout {
            path: path.to_owned(),
            reason: "the config file is not a JSON object".into(),
        });
    };
    for (key, value) in values {
        defaults.insert(key.clone(), value.clone());
    }
    defaults.insert("transformers_version".into(), json!(TRANSFORMERS_VERSION));
    Ok(defaults)
}

/// A size of the config being built.
fn config_size(
    m: &Megatron,
    config: &BTreeMap<String, Json>,
    key: &str,
) -> Result<usize, ConvertError> {
    config
        .get(key)
        .and_then(Json::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| {
            m.error(format!(
                "the config's {key} is not a size: {:?}",
                config.get(key)
            ))
        })
}

/// A config file for a converter, read by the caller: its path (for errors) and its values.
pub struct ConfigFile<'a> {
    pub path: &'a str,
    pub values: &'a Json,
}

/// The sizes a checkpoint's `args` set, as transformers' converters copy them: each config key
/// from its `args` field (a missing one is an error), then the feed-forward width (`inner`) from
/// `ffn_hidden_size`, else 4 x the hidden size (`hidden`).
fn sizes_from_args(
    m: &Megatron,
    config: &mut BTreeMap<String, Json>,
    sizes: &[(&str, &str)],
    (hidden, inner): (&str, &str),
) -> Result<(), ConvertError> {
    for &(key, arg) in sizes {
        if let Some(value) = m.required_arg(arg)? {
            config.insert(key.into(), json!(value));
        }
    }
    let hidden = config_size(m, config, hidden)?;
    let width = m.arg_usize("ffn_hidden_size")?.unwrap_or(4 * hidden);
    config.insert(inner.into(), json!(width));
    Ok(())
}

/// Converts a Megatron-LM GPT-2 checkpoint as `convert_megatron_gpt2_checkpoint.py` does: without a
/// config file, NVIDIA's 345M GPT-2 with the activation the args' flags pick; with one
/// (`--config_file`), `GPT2Config` from it; either way `args`, when the checkpoint has them, set the
/// sizes.
pub fn gpt2(
    checkpoint: &mut Checkpoint,
    config_file: Option<ConfigFile>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Converted, ConvertError> {
    let mut m = Megatron::new(checkpoint);
    let mut config = match config_file {
        Some(file) => with_config_file(gpt2_defaults(), file.values, file.path)?,
        None => {
            let activation = match &m.args {
                Some(args)
                    if args.get("bias_gelu_fusion").and_then(Value::as_bool) == Some(true) =>
                {
                    "gelu_fast"
                }
                Some(args) if args.get("openai_gelu").and_then(Value::as_bool) == Some(true) => {
                    "gelu_new"
                }
                Some(_) => "gelu",
                None => "gelu_new",
            };
            let mut config = gpt2_defaults();
            for (key, value) in [
                ("activation_function", json!(activation)),
                ("n_embd", json!(1024)),
                ("n_head", json!(16)),
                ("n_inner", json!(4096)),
                ("n_layer", json!(24)),
            ] {
                config.insert(key.into(), value);
            }
            config
        }
    };
    if m.args.is_some() {
        let sizes = [
            ("vocab_size", "padded_vocab_size"),
            ("n_positions", "max_position_embeddings"),
            ("n_embd", "hidden_size"),
            ("n_layer", "num_layers"),
            ("n_head", "num_attention_heads"),
        ];
        sizes_from_args(&m, &mut config, &sizes, ("n_embd", "n_inner"))?;
    }
    config.insert("architectures".into(), json!(["GPT2LMHeadModel"]));
    config.insert("tokenizer_class".into(), json!("GPT2TokenizerFast"));

    let vocab_size = config_size(&m, &config, "vocab_size")?;
    let n_positions = config_size(&m, &config, "n_positions")?;
    let n_embd = config_size(&m, &config, "n_embd")?;
    let n_layer = config_size(&m, &config, "n_layer")?;
    let n_head = config_size(&m, &config, "n_head")?;
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
            "the position embeddings have {positions} rows and the config {n_positions} positions{}",
            m.config_hint()
        )));
    }
    let (layers, transformer) = m.layers()?;
    m.check_layers(&layers, n_layer)?;
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
    for (&layer, layer_tensors) in &layers {
        progress(layer, n_layer);
        let name = |suffix: &str| format!("transformer.h.{layer}.{suffix}");
        for (megatron_name, hf) in [
            ("input_layernorm.weight", "ln_1.weight"),
            ("input_layernorm.bias", "ln_1.bias"),
            ("post_attention_layernorm.weight", "ln_2.weight"),
            ("post_attention_layernorm.bias", "ln_2.bias"),
        ] {
            out.push((name(hf), layer_tensors.read(&mut m, &[megatron_name])?));
        }
        out.push((name("attn.bias"), causal.clone()));
        out.push((name("attn.masked_bias"), masked_bias.clone()));
        let qkv_weight = layer_tensors.read(&mut m, &refs(&names(&QKV, "weight")))?;
        let qkv_weight = m.qkv_ordered(qkv_weight, n_head, head_dim)?;
        out.push((name("attn.c_attn.weight"), transpose(qkv_weight, "c_attn")?));
        let qkv_bias = layer_tensors.read(&mut m, &refs(&names(&QKV, "bias")))?;
        out.push((
            name("attn.c_attn.bias"),
            m.qkv_ordered(qkv_bias, n_head, head_dim)?,
        ));
        for (ops, hf) in [
            (&DENSE[..], "attn.c_proj"),
            (&["mlp.dense_h_to_4h"][..], "mlp.c_fc"),
            (&["mlp.dense_4h_to_h"][..], "mlp.c_proj"),
        ] {
            let weight = layer_tensors.read(&mut m, &refs(&names(ops, "weight")))?;
            out.push((name(&format!("{hf}.weight")), transpose(weight, hf)?));
            let bias = layer_tensors.read(&mut m, &refs(&names(ops, "bias")))?;
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

    Ok(Converted {
        config,
        tensors: out,
    })
}

/// Converts a Megatron-LM BERT checkpoint as `convert_megatron_bert_checkpoint.py` does:
/// `MegatronBertConfig()` with the vocabulary of `lm_head.bias`, or the config file's values; then
/// the checkpoint's `args`, when it has them, set the sizes and `tokenizer_type`. The config also
/// names `MegatronBertForPreTraining` (the heads the checkpoint holds), which transformers' file
/// leaves out, so that the folder serves fill-mask and next-sentence prediction as it is.
pub fn bert(
    checkpoint: &mut Checkpoint,
    config_file: Option<ConfigFile>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Converted, ConvertError> {
    let mut m = Megatron::new(checkpoint);
    let mut config = match config_file {
        Some(file) => with_config_file(bert_defaults(), file.values, file.path)?,
        None => {
            let bias = m.tensor_ref(m.at("model/lm_head/bias")?, "model/lm_head/bias")?;
            let mut config = bert_defaults();
            config.insert(
                "vocab_size".into(),
                json!(bias.shape.iter().product::<usize>()),
            );
            config
        }
    };
    if let Some(args) = &m.args {
        if let Some(tokenizer) = args.get("tokenizer_type").and_then(Value::as_str) {
            config.insert("tokenizer_type".into(), json!(tokenizer));
        }
        let sizes = [
            ("vocab_size", "padded_vocab_size"),
            ("max_position_embeddings", "max_position_embeddings"),
            ("hidden_size", "hidden_size"),
            ("num_hidden_layers", "num_layers"),
            ("num_attention_heads", "num_attention_heads"),
        ];
        sizes_from_args(
            &m,
            &mut config,
            &sizes,
            ("hidden_size", "intermediate_size"),
        )?;
    }
    config.insert(
        "architectures".into(),
        json!(["MegatronBertForPreTraining"]),
    );

    let vocab_size = config_size(&m, &config, "vocab_size")?;
    let positions = config_size(&m, &config, "max_position_embeddings")?;
    let hidden = config_size(&m, &config, "hidden_size")?;
    let n_layer = config_size(&m, &config, "num_hidden_layers")?;
    let heads = config_size(&m, &config, "num_attention_heads")?;
    if heads == 0 || hidden % heads != 0 {
        return Err(m.error(format!(
            "hidden size {hidden} is not a multiple of {heads} heads"
        )));
    }

    let word = m.tensor("model/language_model/embedding/word_embeddings/weight")?;
    let word_rows = word.dim(0).map_err(wrap("word embeddings"))?;
    let word = word
        .narrow(0, 0, vocab_size.min(word_rows))
        .and_then(|t| t.contiguous())
        .map_err(wrap("word embeddings"))?;
    let position = m.tensor("model/language_model/embedding/position_embeddings/weight")?;
    if position.dims() != [positions, hidden] {
        return Err(m.error(format!(
            "the position embeddings are {:?} and the config has {positions} positions of {hidden}{}",
            position.dims(),
            m.config_hint()
        )));
    }
    let token_type = m.tensor("model/language_model/embedding/tokentype_embeddings/weight")?;
    let mut out: Vec<(String, Tensor)> = vec![
        (
            "bert.embeddings.word_embeddings.weight".into(),
            word.clone(),
        ),
        (
            "bert.embeddings.position_embeddings.weight".into(),
            position,
        ),
        (
            "bert.embeddings.token_type_embeddings.weight".into(),
            token_type,
        ),
    ];
    let (layers, transformer) = m.layers()?;
    m.check_layers(&layers, n_layer)?;
    let rows = |t: &Tensor, part: usize, what: &str| {
        t.narrow(0, part * hidden, hidden)
            .and_then(|t| t.contiguous())
            .map_err(wrap(what))
    };
    for (&layer, layer_tensors) in &layers {
        progress(layer, n_layer);
        let name = |suffix: &str| format!("bert.encoder.layer.{layer}.{suffix}");
        for (megatron_name, hf) in [
            ("input_layernorm.weight", "attention.ln.weight"),
            ("input_layernorm.bias", "attention.ln.bias"),
        ] {
            out.push((name(hf), layer_tensors.read(&mut m, &[megatron_name])?));
        }
        let weight = layer_tensors.read(&mut m, &refs(&names(&QKV, "weight")))?;
        let weight = m.qkv_ordered(weight, heads, hidden / heads)?;
        let bias = layer_tensors.read(&mut m, &refs(&names(&QKV, "bias")))?;
        let bias = m.qkv_ordered(bias, heads, hidden / heads)?;
        for (part, projection) in ["query", "key", "value"].into_iter().enumerate() {
            let what = format!("attention.self.{projection}");
            out.push((name(&format!("{what}.weight")), rows(&weight, part, &what)?));
            out.push((name(&format!("{what}.bias")), rows(&bias, part, &what)?));
        }
        for (ops, hf) in [
            (&DENSE[..], "attention.output.dense"),
            (&["post_attention_layernorm"][..], "ln"),
            (&["mlp.dense_h_to_4h"][..], "intermediate.dense"),
            (&["mlp.dense_4h_to_h"][..], "output.dense"),
        ] {
            for kind in ["weight", "bias"] {
                let tensor = layer_tensors.read(&mut m, &refs(&names(ops, kind)))?;
                out.push((name(&format!("{hf}.{kind}")), tensor));
            }
        }
    }
    let entry = |m: &Megatron, parent: &Value, parent_name: &str, key: &str| {
        let value = parent
            .get(key)
            .ok_or_else(|| m.error(format!("the {parent_name} has no {key}")))?;
        m.tensor_ref(value, key)
    };
    for (megatron_name, hf) in [
        ("final_layernorm.weight", "bert.encoder.ln.weight"),
        ("final_layernorm.bias", "bert.encoder.ln.bias"),
    ] {
        let tensor = entry(&m, &transformer, "transformer", megatron_name)?;
        out.push((hf.into(), m.read(&tensor)?));
    }
    for (path, hf) in [
        (
            "model/language_model/pooler/dense.weight",
            "bert.pooler.dense.weight",
        ),
        (
            "model/language_model/pooler/dense.bias",
            "bert.pooler.dense.bias",
        ),
        (
            "model/lm_head/dense.weight",
            "cls.predictions.transform.dense.weight",
        ),
        (
            "model/lm_head/dense.bias",
            "cls.predictions.transform.dense.bias",
        ),
        (
            "model/lm_head/layernorm.weight",
            "cls.predictions.transform.LayerNorm.weight",
        ),
        (
            "model/lm_head/layernorm.bias",
            "cls.predictions.transform.LayerNorm.bias",
        ),
    ] {
        out.push((hf.into(), m.tensor(path)?));
    }
    // The decoder is the word embeddings, as transformers replicates them.
    out.push(("cls.predictions.decoder.weight".into(), word));
    for (path, hf) in [
        ("model/lm_head/bias", "cls.predictions.bias"),
        ("model/binary_head/weight", "cls.seq_relationship.weight"),
        ("model/binary_head/bias", "cls.seq_relationship.bias"),
    ] {
        out.push((hf.into(), m.tensor(path)?));
    }
    Ok(Converted {
        config,
        tensors: out,
    })
}

/// Writes a converted folder's files.
struct FolderWriter<'a> {
    out: &'a Path,
}

impl<'a> FolderWriter<'a> {
    fn create(out: &'a Path) -> Result<Self, ConvertError> {
        let writer = Self { out };
        std::fs::create_dir_all(out).map_err(|e| writer.error("creating the folder", &e))?;
        Ok(writer)
    }

    fn error(&self, what: &str, e: &dyn std::fmt::Display) -> ConvertError {
        ConvertError::Layout {
            path: self.out.display().to_string(),
            reason: format!("{what}: {e}"),
        }
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), ConvertError> {
        std::fs::write(self.out.join(name), bytes)
            .map_err(|e| self.error(&format!("writing {name}"), &e))
    }

    fn json(&self, name: &str, value: &impl serde::Serialize) -> Result<(), ConvertError> {
        let text = serde_json::to_string_pretty(value).map_err(|e| self.error(name, &e))?;
        self.write(name, format!("{text}\n").as_bytes())
    }

    fn copy(&self, source: &Path, name: &str) -> Result<(), ConvertError> {
        let bytes = std::fs::read(source)
            .map_err(|e| self.error(&format!("reading {}", source.display()), &e))?;
        self.write(name, &bytes)
    }

    /// config.json and model.safetensors, with the `"format": "pt"` metadata that transformers'
    /// `from_pretrained` requires of a safetensors file.
    fn model(&self, converted: &Converted) -> Result<(), ConvertError> {
        self.json("config.json", &converted.config)?;
        let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(
            converted
                .tensors
                .iter()
                .map(|(name, tensor)| (name.as_str(), tensor)),
            Some(metadata),
            &self.out.join("model.safetensors"),
        )
        .map_err(|e| self.error("writing model.safetensors", &e))
    }
}

/// Refuses a tokenizer with more tokens than the model has embedding rows.
fn check_vocab(
    converted: &Converted,
    tokenizer_json: &[u8],
    source: &Path,
) -> Result<(), ConvertError> {
    let layout = |reason: String| ConvertError::Layout {
        path: source.display().to_string(),
        reason,
    };
    let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json)
        .map_err(|e| layout(format!("reading the tokenizer back: {e}")))?;
    let rows = converted
        .config
        .get("vocab_size")
        .and_then(Json::as_u64)
        .unwrap_or(0) as usize;
    let tokens = tokenizer.get_vocab_size(true);
    if tokens > rows {
        return Err(layout(format!(
            "the tokenizer has {tokens} tokens and the checkpoint's embeddings {rows} rows"
        )));
    }
    Ok(())
}

/// tokenizer.json with its BPE merges written as `"a b"` strings, the form every release of
/// tokenizers reads (those before 0.20, which transformers 4.37 installs, refuse the `["a", "b"]`
/// pairs that later ones write). Unchanged when a merge's part holds a space, which only pairs
/// can express; byte-level BPE never has one.
fn portable_merges(tokenizer_json: &[u8]) -> Result<Vec<u8>, ConvertError> {
    let internal = |e: serde_json::Error| ConvertError::Layout {
        path: "tokenizer.json".into(),
        reason: format!("re-reading the tokenizer: {e}"),
    };
    let mut tokenizer: Json = serde_json::from_slice(tokenizer_json).map_err(internal)?;
    let Some(merges) = tokenizer
        .pointer_mut("/model/merges")
        .and_then(Json::as_array_mut)
    else {
        return Ok(tokenizer_json.to_vec());
    };
    let mut joined = Vec::with_capacity(merges.len());
    for merge in merges.iter() {
        match merge.as_array().map(Vec::as_slice) {
            Some([Json::String(a), Json::String(b)]) if !a.contains(' ') && !b.contains(' ') => {
                joined.push(Json::String(format!("{a} {b}")))
            }
            _ => return Ok(tokenizer_json.to_vec()),
        }
    }
    *merges = joined;
    serde_json::to_vec(&tokenizer).map_err(internal)
}

/// Writes `converted` to `out` as a Hugging Face folder: config.json, model.safetensors, and the
/// byte-level BPE tokenizer of `vocab` and `merges` (vocab.json, merges.txt, tokenizer.json,
/// tokenizer_config.json, special_tokens_map.json), checked against the model's vocabulary.
pub fn write_gpt2_folder(
    converted: &Converted,
    vocab: &Path,
    merges: &Path,
    out: &Path,
) -> Result<(), ConvertError> {
    let tokenizer_json = crate::loader::byte_level_bpe_json(vocab, merges, None).map_err(|e| {
        ConvertError::Layout {
            path: format!("{} and {}", vocab.display(), merges.display()),
            reason: format!("building the tokenizer: {e}"),
        }
    })?;
    check_vocab(converted, &tokenizer_json, vocab)?;
    let folder = FolderWriter::create(out)?;
    folder.model(converted)?;
    folder.copy(vocab, "vocab.json")?;
    folder.copy(merges, "merges.txt")?;
    folder.write("tokenizer.json", &portable_merges(&tokenizer_json)?)?;
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
    folder.json("tokenizer_config.json", &tokenizer_config)?;
    folder.json(
        "special_tokens_map.json",
        &json!({"bos_token": eot, "eos_token": eot, "unk_token": eot}),
    )
}

/// Whether a BERT's WordPiece lowercases: `lowercase` when given, else what the checkpoint's
/// `tokenizer_type` says (`BertWordPieceLowerCase` or `BertWordPieceCase`).
pub fn bert_lowercases(
    converted: &Converted,
    lowercase: Option<bool>,
) -> Result<bool, ConvertError> {
    if let Some(lowercase) = lowercase {
        return Ok(lowercase);
    }
    match converted
        .config
        .get("tokenizer_type")
        .and_then(Json::as_str)
    {
        Some("BertWordPieceLowerCase") => Ok(true),
        Some("BertWordPieceCase") => Ok(false),
        other => Err(ConvertError::Layout {
            path: "the checkpoint's args".into(),
            reason: format!(
                "tokenizer_type {other:?} does not say whether the vocabulary is cased: pass \
                 --lowercase true or --lowercase false"
            ),
        }),
    }
}

/// Writes `converted` to `out` as a Hugging Face folder: config.json, model.safetensors, and the
/// WordPiece tokenizer of `vocab` (vocab.txt, tokenizer.json, tokenizer_config.json,
/// special_tokens_map.json), checked against the model's vocabulary.
pub fn write_bert_folder(
    converted: &Converted,
    vocab: &Path,
    lowercase: bool,
    out: &Path,
) -> Result<(), ConvertError> {
    let tokenizer_json =
        crate::loader::wordpiece_json(vocab, lowercase).map_err(|e| ConvertError::Layout {
            path: vocab.display().to_string(),
            reason: format!("building the tokenizer: {e}"),
        })?;
    check_vocab(converted, &tokenizer_json, vocab)?;
    let folder = FolderWriter::create(out)?;
    folder.model(converted)?;
    folder.copy(vocab, "vocab.txt")?;
    folder.write("tokenizer.json", &tokenizer_json)?;
    let positions = converted
        .config
        .get("max_position_embeddings")
        .cloned()
        .unwrap_or(Json::Null);
    folder.json(
        "tokenizer_config.json",
        &json!({
            "clean_up_tokenization_spaces": true,
            "cls_token": "[CLS]",
            "do_lower_case": lowercase,
            "mask_token": "[MASK]",
            "model_max_length": positions,
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "strip_accents": null,
            "tokenize_chinese_chars": true,
            "tokenizer_class": "BertTokenizer",
            "unk_token": "[UNK]",
        }),
    )?;
    folder.json(
        "special_tokens_map.json",
        &json!({
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "unk_token": "[UNK]",
        }),
    )
}
