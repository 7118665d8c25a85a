//! `convert megatron-gpt2` against transformers 4.37.2's converter on the checkpoints of
//! tests/fixtures/megatron-gpt2 (checkpoint versions 0, 1.0 and 2.0; made by
//! make_megatron_gpt2_fixtures.py): the same tensors bit for bit, the same config values, and the
//! converted folder serves with transformers' logits. Bad inputs fail with errors that name what is
//! wrong.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candlewick_engine::convert::megatron;
use candlewick_engine::convert::torch::Checkpoint;
use candlewick_engine::{load_generator, LoadOptions, ModelSource};
use serde::Deserialize;

use common::{fixture_dir, prefill_new};

const LOGITS_TOLERANCE: f32 = 1e-4;

fn root() -> PathBuf {
    fixture_dir("megatron-gpt2")
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("candlewick-convert-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn convert(checkpoint: &Path, merges: &Path, out: &Path) -> Result<usize, String> {
    let mut file = Checkpoint::open(checkpoint).map_err(|e| e.to_string())?;
    let converted = megatron::gpt2(&mut file, |_, _| {}).map_err(|e| e.to_string())?;
    let vocab = root().join("tokenizer/vocab.json");
    megatron::write_gpt2_folder(&converted, &vocab, merges, out).map_err(|e| e.to_string())?;
    Ok(converted.tensors.len())
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

#[derive(Deserialize)]
struct Logits {
    input_ids: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
}

#[test]
fn every_checkpoint_version_converts_as_transformers_does_and_serves() {
    for (version, file) in [
        ("v0", "checkpoint.zip"),
        ("v1", "model_optim_rng.pt"),
        ("v2", "model_optim_rng.pt"),
    ] {
        let out = scratch(version);
        let count = convert(
            &root().join(version).join(file),
            &root().join("tokenizer/merges.txt"),
            &out,
        )
        .unwrap();
        let expected_dir = root().join(version).join("expected");

        let expected =
            candle_core::safetensors::load(expected_dir.join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let ours =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(count, expected.len(), "{version}");
        let mut names: Vec<&String> = expected.keys().collect();
        names.sort();
        assert_eq!(
            names,
            {
                let mut n: Vec<&String> = ours.keys().collect();
                n.sort();
                n
            },
            "{version}"
        );
        for name in names {
            let (a, b) = (&expected[name], &ours[name]);
            assert_eq!(a.dtype(), b.dtype(), "{version} {name}");
            assert_eq!(a.dims(), b.dims(), "{version} {name}");
            assert!(bits(a) == bits(b), "{version} {name}: values differ");
        }

        let read = |path: PathBuf| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
        };
        assert_eq!(
            read(out.join("config.json")),
            read(expected_dir.join("config.json")),
            "{version}"
        );

        let reference: Logits = serde_json::from_str(
            &std::fs::read_to_string(expected_dir.join("logits.json")).unwrap(),
        )
        .unwrap();
        let mut loaded =
            load_generator(&ModelSource::Dir(out.clone()), &LoadOptions::default()).unwrap();
        let ids = &reference.input_ids[0];
        for end in 1..=ids.len() {
            let (slots, logits) = prefill_new(&mut loaded.generator, &[&ids[..end]]);
            let largest = logits[0]
                .iter()
                .zip(&reference.logits[end - 1])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                largest <= LOGITS_TOLERANCE,
                "{version} position {}: |diff| {largest}",
                end - 1
            );
            loaded.generator.release(slots[0]);
        }
        let text = loaded.tokenizer.decode(&[39, 68], false).unwrap();
        assert_eq!(
            text, "He",
            "{version}: the tokenizer written beside the model"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let bad = root().join("bad");
    let merges = root().join("tokenizer/merges.txt");
    let cases = [
        (
            "truncated.zip",
            merges.clone(),
            vec!["not a complete zip archive"],
        ),
        (
            "wrong-member.zip",
            merges.clone(),
            vec!["release/mp_rank_00/model_optim_rng.pt", "other.pt"],
        ),
        (
            "missing-layer.pt",
            merges.clone(),
            vec!["layer 1 has no mlp.dense_h_to_4h.weight"],
        ),
        (
            "legacy.pt",
            merges.clone(),
            vec!["legacy format", "torch.save(torch.load("],
        ),
    ];
    for (file, merges, mentions) in cases {
        let error = convert(&bad.join(file), &merges, &scratch(file)).unwrap_err();
        for mention in mentions {
            assert!(error.contains(mention), "{file}: {error}");
        }
    }
    let error = convert(
        &root().join("v2/model_optim_rng.pt"),
        &bad.join("mismatched-merges.txt"),
        &scratch("merges"),
    )
    .unwrap_err();
    assert!(
        error.contains("mismatched-merges.txt") && error.contains("zq"),
        "{error}"
    );
}
