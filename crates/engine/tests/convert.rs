//! `convert megatron-gpt2` and `convert megatron-bert` against transformers 4.37.2's converters on
//! the checkpoints of tests/fixtures/megatron (checkpoint versions 0, 1.0, 2.0 and 3.0, float16
//! and float32, tensors sharing one storage; made by make_megatron_fixtures.py): the same tensors
//! bit for bit, the same config values, and the converted folder serves with transformers' logits.
//! Bad inputs fail with errors that name what is wrong.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candlewick_engine::convert::megatron::{self, ConfigFile, Converted};
use candlewick_engine::convert::torch::Checkpoint;
use candlewick_engine::{
    load_encoder, load_generator, EncoderInput, EncoderOutput, LoadOptions, ModelSource,
};
use serde::Deserialize;
use serde_json::Value as Json;

use common::{fixture_dir, prefill_new};

const LOGITS_TOLERANCE: f32 = 1e-4;

fn root() -> PathBuf {
    fixture_dir("megatron")
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("candlewick-convert-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn read_json(path: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

type Converter = fn(
    &mut Checkpoint,
    Option<ConfigFile>,
    &mut dyn FnMut(usize, usize),
) -> Result<Converted, megatron::ConvertError>;

fn run(
    checkpoint: &Path,
    config: Option<&Path>,
    converter: Converter,
) -> Result<Converted, String> {
    let mut file = Checkpoint::open(checkpoint).map_err(|e| e.to_string())?;
    let values = config.map(read_json);
    let path = config.map(|p| p.display().to_string());
    let config_file = values
        .as_ref()
        .zip(path.as_deref())
        .map(|(values, path)| ConfigFile { path, values });
    let mut layers_seen = Vec::new();
    let converted = converter(&mut file, config_file, &mut |layer, layers| {
        layers_seen.push((layer, layers));
    })
    .map_err(|e| e.to_string())?;
    let layers = layers_seen.first().map_or(0, |&(_, n)| n);
    assert_eq!(
        layers_seen,
        (0..layers).map(|l| (l, layers)).collect::<Vec<_>>(),
        "progress reports every layer once"
    );
    Ok(converted)
}

fn convert_gpt2(case: &Path, checkpoint: &str, merges: &Path, out: &Path) -> Result<(), String> {
    let config = case.join("config_file.json");
    let converted = run(
        &case.join(checkpoint),
        config.is_file().then_some(config.as_path()),
        |c, f, p| megatron::gpt2(c, f, p),
    )?;
    megatron::write_gpt2_folder(&converted, &case.join("vocab.json"), merges, out)
        .map_err(|e| e.to_string())
}

fn convert_bert(case: &Path, out: &Path) -> Result<(), String> {
    let converted = run(&case.join("model_optim_rng.pt"), None, |c, f, p| {
        megatron::bert(c, f, p)
    })?;
    let lowercase = megatron::bert_lowercases(&converted, None).map_err(|e| e.to_string())?;
    megatron::write_bert_folder(&converted, &case.join("vocab.txt"), lowercase, out)
        .map_err(|e| e.to_string())
}

/// f32 bit patterns of `tensor` (exact for f16, whose every value f32 holds).
fn bits(tensor: &Tensor) -> Vec<u32> {
    tensor
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Our folder's tensors equal the converter's bit for bit, dtypes and shapes included, with the
/// metadata transformers needs to load them, and its config.json has the converter's values (plus
/// `extra`, which transformers leaves out).
fn assert_equal_to_transformers(case: &str, out: &Path, extra: &[(&str, Json)]) {
    let expected_dir = root().join(case).join("expected");
    let expected: HashMap<String, Tensor> =
        candle_core::safetensors::load(expected_dir.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let ours = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = expected.keys().collect();
    names.sort();
    let mut our_names: Vec<&String> = ours.keys().collect();
    our_names.sort();
    assert_eq!(names, our_names, "{case}");
    for name in names {
        let (a, b) = (&expected[name], &ours[name]);
        assert_eq!(a.dtype(), b.dtype(), "{case} {name}");
        assert_eq!(a.dims(), b.dims(), "{case} {name}");
        assert!(bits(a) == bits(b), "{case} {name}: values differ");
    }
    // transformers' from_pretrained refuses a safetensors file without this metadata.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let format = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format").cloned());
    assert_eq!(format.as_deref(), Some("pt"), "{case}");
    let mut config = read_json(&expected_dir.join("config.json"));
    for (key, value) in extra {
        config[*key] = value.clone();
    }
    assert_eq!(read_json(&out.join("config.json")), config, "{case}");
}

fn largest_difference(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[derive(Deserialize)]
struct Gpt2Logits {
    input_ids: Vec<Vec<u32>>,
    logits: Vec<Vec<Vec<f32>>>,
}

#[test]
fn every_gpt2_checkpoint_version_converts_as_transformers_does_and_serves() {
    for (case, file) in [
        ("gpt2-v0", "checkpoint.zip"),
        ("gpt2-v1", "model_optim_rng.pt"),
        ("gpt2-v2", "model_optim_rng.pt"),
        ("gpt2-v3", "model_optim_rng.pt"),
    ] {
        let dir = root().join(case);
        let out = scratch(case);
        convert_gpt2(&dir, file, &dir.join("merges.txt"), &out).unwrap();
        assert_equal_to_transformers(case, &out, &[]);

        let reference: Gpt2Logits =
            serde_json::from_value(read_json(&dir.join("expected/logits.json"))).unwrap();
        let mut loaded =
            load_generator(&ModelSource::Dir(out.clone()), &LoadOptions::default()).unwrap();
        let ids = &reference.input_ids[0];
        // Each prefix's last position against transformers' logits there (causal: the same).
        for end in 1..=ids.len() {
            let (slots, logits) = prefill_new(&mut loaded.generator, &[&ids[..end]]);
            let largest = largest_difference(&logits[0], &reference.logits[0][end - 1]);
            assert!(
                largest <= LOGITS_TOLERANCE,
                "{case} position {}: |diff| {largest}",
                end - 1
            );
            loaded.generator.release(slots[0]);
        }
        // The tokenizer written beside the model: GPT-2's byte-level BPE.
        let encoded = loaded.tokenizer.encode("Hello world", false).unwrap();
        assert_eq!(
            loaded.tokenizer.decode(&encoded, false).unwrap(),
            "Hello world",
            "{case}"
        );
        // Its merges as "a b" strings, which tokenizers releases before 0.20 (transformers 4.37's)
        // read too: they refuse ["a", "b"] pairs.
        let tokenizer = read_json(&out.join("tokenizer.json"));
        let merges = tokenizer["model"]["merges"].as_array().unwrap();
        assert_eq!(merges.len(), 40, "{case}");
        assert!(merges
            .iter()
            .all(|m| m.as_str().is_some_and(|m| m.split(' ').count() == 2)));
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[derive(Deserialize)]
struct BertLogits {
    input_ids: Vec<Vec<u32>>,
    token_type_ids: Vec<Vec<u32>>,
    prediction_logits: Vec<Vec<Vec<f32>>>,
    seq_relationship_logits: Vec<Vec<f32>>,
}

#[test]
fn every_bert_checkpoint_version_converts_as_transformers_does_and_serves_both_heads() {
    for case in ["bert-v0", "bert-v1", "bert-v2"] {
        let dir = root().join(case);
        let out = scratch(case);
        convert_bert(&dir, &out).unwrap();
        assert_equal_to_transformers(
            case,
            &out,
            &[(
                "architectures",
                serde_json::json!(["MegatronBertForPreTraining"]),
            )],
        );
        let reference: BertLogits =
            serde_json::from_value(read_json(&dir.join("expected/logits.json"))).unwrap();
        let input = EncoderInput::new(
            reference.input_ids[0].clone(),
            reference.token_type_ids[0].clone(),
        );

        // As written: MegatronBertForPreTraining serves fill-mask.
        let loaded = load_encoder(&ModelSource::Dir(out.clone()), &LoadOptions::default()).unwrap();
        let output = loaded.model.forward(std::slice::from_ref(&input)).unwrap();
        let EncoderOutput::Tokens(rows) = &output[0] else {
            panic!("{case}: masked LM output expected, got {:?}", output[0]);
        };
        assert_eq!(rows.len(), reference.prediction_logits[0].len(), "{case}");
        for (position, (ours, theirs)) in
            rows.iter().zip(&reference.prediction_logits[0]).enumerate()
        {
            let largest = largest_difference(ours, theirs);
            assert!(
                largest <= LOGITS_TOLERANCE,
                "{case} position {position}: |diff| {largest}"
            );
        }
        // The tokenizer written beside it: lowercasing WordPiece with BERT's template.
        let ids = loaded.tokenizer.encode("[MASK]", true).unwrap();
        assert_eq!(ids, [101, 103, 102], "{case}");

        // The same weights under the next-sentence head: transformers' seq_relationship logits.
        let mut config = read_json(&out.join("config.json"));
        config["architectures"] = serde_json::json!(["MegatronBertForNextSentencePrediction"]);
        std::fs::write(out.join("config.json"), config.to_string()).unwrap();
        let loaded = load_encoder(&ModelSource::Dir(out.clone()), &LoadOptions::default()).unwrap();
        let output = loaded.model.forward(std::slice::from_ref(&input)).unwrap();
        let EncoderOutput::Sequence(scores) = &output[0] else {
            panic!("{case}: next-sentence output expected, got {:?}", output[0]);
        };
        let largest = largest_difference(scores, &reference.seq_relationship_logits[0]);
        assert!(
            largest <= LOGITS_TOLERANCE,
            "{case} next sentence: |diff| {largest}"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn a_checkpoint_without_args_needs_its_config_and_says_so() {
    let dir = root().join("gpt2-v0");
    let error = run(&dir.join("checkpoint.zip"), None, |c, f, p| {
        megatron::gpt2(c, f, p)
    })
    .err()
    .expect("the 345M defaults do not fit a 64-position checkpoint");
    assert!(
        error.contains("64 rows") && error.contains("1024") && error.contains("--config"),
        "{error}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let bad = root().join("bad");
    let v2 = root().join("gpt2-v2");
    let merges = v2.join("merges.txt");
    let cases = [
        ("truncated.zip", vec!["not a complete zip archive"]),
        (
            "wrong-member.zip",
            vec!["release/mp_rank_00/model_optim_rng.pt", "other.pt"],
        ),
        (
            "missing-layer.pt",
            vec!["layer 1 has no mlp.dense_h_to_4h.weight"],
        ),
        ("legacy.pt", vec!["legacy format", "torch.save(torch.load("]),
    ];
    for (file, mentions) in cases {
        let target = scratch(file);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::copy(bad.join(file), target.join(file)).unwrap();
        std::fs::copy(v2.join("vocab.json"), target.join("vocab.json")).unwrap();
        let error = convert_gpt2(&target, file, &merges, &target.join("out")).unwrap_err();
        for mention in mentions {
            assert!(error.contains(mention), "{file}: {error}");
        }
        std::fs::remove_dir_all(&target).unwrap();
    }
    let error = convert_gpt2(
        &v2,
        "model_optim_rng.pt",
        &bad.join("mismatched-merges.txt"),
        &scratch("merges"),
    )
    .unwrap_err();
    assert!(
        error.contains("mismatched-merges.txt") && error.contains("ou"),
        "{error}"
    );
}
