//! The `candlewick` binary as a user runs it.

use std::path::Path;
use std::process::Command;

fn candlewick() -> Command {
    Command::new(env!("CARGO_BIN_EXE_candlewick"))
}

#[test]
fn generate_runs_the_bundled_model_with_nothing_downloaded() {
    let output = candlewick()
        .args([
            "generate",
            "--prompt",
            "My favourite condiment is",
            "--max-tokens",
            "12",
            "--seed",
            "3",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.starts_with("My favourite condiment is"), "{stdout}");
    assert!(
        stdout.trim_end().len() > "My favourite condiment is".len(),
        "{stdout}"
    );
    // The same seed prints the same text.
    let again = candlewick()
        .args([
            "generate",
            "--prompt",
            "My favourite condiment is",
            "--max-tokens",
            "12",
            "--seed",
            "3",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap(), stdout);
}

#[test]
fn generate_greedy_on_a_fixture_prints_its_reference_continuation() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mistral/w8-gqa2");
    let output = candlewick()
        .args([
            "generate",
            "--model",
            fixture.to_str().unwrap(),
            "--prompt",
            "Hello world",
            "--temperature",
            "0",
        ])
        .args(["--max-tokens", "8", "--logprobs", "2"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut lines = stdout.lines();
    assert!(lines.next().unwrap().starts_with("Hello world"));
    // One line per generated token with its logprob and two alternatives, the chosen one first.
    let table: Vec<&str> = lines.collect();
    assert!(!table.is_empty() && table.len() <= 8, "{stdout}");
    for line in table {
        let chosen_logprob: f32 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(chosen_logprob <= 0.0, "{line}");
        assert!(
            line.contains(&format!("{chosen_logprob:.4}]"))
                || line.contains(&format!("{chosen_logprob:.4},")),
            "{line}"
        );
    }
}

#[test]
fn generate_quantizes_at_load_when_asked_and_refuses_unknown_formats() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mistral/w8-gqa2");
    let run = |format: &str| {
        candlewick()
            .args(["generate", "--model", fixture.to_str().unwrap()])
            .args([
                "--prompt",
                "Hello world",
                "--temperature",
                "0",
                "--max-tokens",
                "4",
            ])
            .args(["--quantize", format])
            .output()
            .unwrap()
    };
    let output = run("q8_0");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8(output.stdout)
        .unwrap()
        .starts_with("Hello world"));
    let output = run("q5");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("q8_0, q4k or none"), "{stderr}");
}

#[test]
fn a_missing_model_folder_fails_with_a_clear_message() {
    let output = candlewick()
        .args(["generate", "--model", "./no/such/model", "--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("./no/such/model"), "{stderr}");
}

#[test]
fn classify_prints_every_label_with_the_reference_scores() {
    #[derive(serde::Deserialize)]
    struct Reference {
        labels: Vec<String>,
        cases: Vec<Case>,
    }
    #[derive(serde::Deserialize)]
    struct Case {
        text: String,
        scores: Vec<f32>,
    }
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/classifiers/mixtral-cls5");
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("classification.json")).unwrap(),
    )
    .unwrap();
    let case = &reference.cases[1];
    let output = candlewick()
        .args([
            "classify",
            "--model",
            fixture.to_str().unwrap(),
            "--text",
            &case.text,
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let printed: Vec<(String, f32)> = stdout
        .lines()
        .skip(1)
        .map(|line| {
            let mut parts = line.split_whitespace();
            (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(printed.len(), reference.labels.len(), "{stdout}");
    for (label, score) in printed {
        let index = reference.labels.iter().position(|l| *l == label).unwrap();
        assert!(
            (score - case.scores[index]).abs() < 1e-4,
            "{label}: {score} vs {}",
            case.scores[index]
        );
    }
}

#[test]
fn convert_megatron_gpt2_writes_a_folder_that_generate_serves_and_refuses_a_legacy_file() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/megatron");
    let out = std::env::temp_dir().join(format!("candlewick-cli-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let convert = |checkpoint: &Path| {
        candlewick()
            .args(["convert", "megatron-gpt2", "--checkpoint"])
            .arg(checkpoint)
            .arg("--vocab")
            .arg(fixtures.join("gpt2-v1/vocab.json"))
            .arg("--merges")
            .arg(fixtures.join("gpt2-v1/merges.txt"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let done = convert(&fixtures.join("gpt2-v1/model_optim_rng.pt"));
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
    ] {
        assert!(out.join(file).is_file(), "{file} is missing");
    }
    let generated = candlewick()
        .args([
            "generate",
            "--max-tokens",
            "4",
            "--prompt",
            "Hello",
            "--model",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let refused = convert(&fixtures.join("bad/legacy.pt"));
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("legacy format") && message.contains("torch.save"),
        "{message}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn convert_megatron_bert_writes_a_folder_with_its_wordpiece_tokenizer() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/megatron");
    let out = std::env::temp_dir().join(format!(
        "candlewick-cli-convert-bert-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&out);
    let done = candlewick()
        .args(["convert", "megatron-bert", "--checkpoint"])
        .arg(fixtures.join("bert-v1/model_optim_rng.pt"))
        .arg("--vocab")
        .arg(fixtures.join("bert-v1/vocab.txt"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "MegatronBertForPreTraining");
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    // [CLS] [MASK] [SEP]: the special token stays whole, between the ones the template adds.
    let encoding = tokenizer.encode("[MASK]", true).unwrap();
    assert_eq!(encoding.get_ids(), [101, 103, 102]);
    let tokenizer_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tokenizer_config["do_lower_case"], true);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn generate_follows_a_choice_a_regex_or_a_json_schema() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mistral/w8-gqa2");
    let run = |flags: &[&str]| {
        candlewick()
            .args([
                "generate",
                "--model",
                fixture.to_str().unwrap(),
                "--prompt",
                "Answer:",
            ])
            .args(["--max-tokens", "60", "--seed", "5"])
            .args(flags)
            .output()
            .unwrap()
    };
    let text = |output: &std::process::Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout.clone()).unwrap();
        stdout
            .strip_prefix("Answer:")
            .unwrap_or_else(|| panic!("{stdout:?}"))
            .trim_end_matches('\n')
            .to_string()
    };
    let chosen = text(&run(&["--choice", "yes", "--choice", "no way"]));
    assert!(chosen == "yes" || chosen == "no way", "{chosen:?}");
    let matched = text(&run(&["--regex", "[0-9]{3}"]));
    assert!(
        matched.len() == 3 && matched.bytes().all(|b| b.is_ascii_digit()),
        "{matched:?}"
    );
    let schema =
        std::env::temp_dir().join(format!("candlewick-cli-schema-{}.json", std::process::id()));
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}"#,
    )
    .unwrap();
    let json = text(&run(&["--json-schema", schema.to_str().unwrap()]));
    std::fs::remove_file(&schema).ok();
    assert!(
        json == r#"{"ok": true}"# || json == r#"{"ok": false}"#,
        "{json:?}"
    );
    // One constraint at a time; an invalid one is a clear error.
    let both = run(&["--regex", "a", "--choice", "b"]);
    assert!(!both.status.success());
    let bad = run(&["--regex", "(open"]);
    assert!(!bad.status.success());
    assert!(!String::from_utf8_lossy(&bad.stderr).contains("panicked"));
}
