//! The router in process (tower's `oneshot`) over the real w8-gqa2 fixture: OpenAI's formats,
//! streaming, errors and operations routes.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use candlewick_engine::{load_generator, GeneratorConfig, LoadOptions, ModelSource};
use candlewick_scheduler::SchedulerConfig;
use candlewick_server::routes::{router, RouterOptions};
use candlewick_server::state::AppState;
use serde_json::{json, Value};
use tower::ServiceExt;

const MODEL: &str = "w8-gqa2";

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mistral/w8-gqa2")
}

/// A fresh engine over the fixture: 4 slots, the fixture's 512-token context.
fn load_state(request_timeout: Duration) -> Arc<AppState> {
    candlewick_server::metrics::prometheus();
    let options = LoadOptions {
        generator: GeneratorConfig {
            max_sequences: 4,
            // As the server runs by default: every test also goes through the prefix cache.
            prefix_cache_bytes: 16 << 20,
            ..GeneratorConfig::default()
        },
        ..LoadOptions::default()
    };
    let loaded = load_generator(&ModelSource::Dir(fixture()), &options).unwrap();
    let max_context = loaded.generator.max_context();
    let config = SchedulerConfig {
        max_waiting: 64,
        max_batch_tokens: 2048,
        max_input_tokens: max_context,
        max_total_tokens: max_context,
        request_timeout: Some(request_timeout),
    };
    Arc::new(AppState::start(MODEL.into(), loaded, config).unwrap())
}

/// One engine for most of the file, as a server has.
fn state() -> Arc<AppState> {
    static STATE: OnceLock<Arc<AppState>> = OnceLock::new();
    Arc::clone(STATE.get_or_init(|| load_state(Duration::from_secs(120))))
}

fn options() -> RouterOptions {
    RouterOptions {
        api_key: None,
        max_body_bytes: 2 * 1024 * 1024,
        cors_allow_origins: Vec::new(),
    }
}

fn app() -> Router {
    router(state(), &options()).unwrap()
}

/// `greedy.prompts[i]` and `greedy.alone[i]` of the fixture's reference.json.
fn reference(i: usize) -> (Vec<u32>, Vec<u32>) {
    let text = std::fs::read_to_string(fixture().join("reference.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_u64().unwrap() as u32)
            .collect()
    };
    (
        ids(&reference["greedy"]["prompts"][i]),
        ids(&reference["greedy"]["alone"][i]),
    )
}

fn decode(ids: &[u32]) -> String {
    state().tokenizer.decode(ids, true).unwrap()
}

/// The text `generated` adds after `prompt`, as decoding the whole sequence shows it: unlike
/// `decode(generated)`, it keeps a leading space that depends on what comes before.
fn continuation(prompt: &[u32], generated: &[u32]) -> String {
    let whole = decode(&[prompt, generated].concat());
    let head = decode(prompt);
    whole
        .strip_prefix(head.as_str())
        .unwrap_or_else(|| panic!("{whole:?} does not start with {head:?}"))
        .to_string()
}

/// A reference prompt whose continuation has no byte-fallback run that the engine's
/// incremental decoder splits differently from a whole decode (see
/// `every_reference_continuation_matches_a_whole_decode`).
const CLEAN_REFERENCE: usize = 4;

async fn send(app: Router, request: Request<Body>) -> (StatusCode, String) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

async fn post_json(path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = send(app(), post(path, body.to_string())).await;
    (status, serde_json::from_str(&text).unwrap())
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .to_string()
        })
        .collect()
}

fn assert_error(body: &Value, param: Option<&str>, code: Option<&str>) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["param"].as_str(), param, "{body}");
    assert_eq!(error["code"].as_str(), code, "{body}");
}

#[tokio::test]
async fn greedy_completion_of_token_ids_matches_the_reference() {
    let (prompt, expected) = reference(CLEAN_REFERENCE);
    let (status, body) = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": expected.len(), "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["id"].as_str().unwrap();
    assert!(id.starts_with("cmpl-") && id.len() == 5 + 24, "{id}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], continuation(&prompt, &expected));
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": prompt.len(), "completion_tokens": expected.len(),
               "total_tokens": prompt.len() + expected.len()})
    );
}

#[tokio::test]
async fn completion_that_generates_eos_finishes_with_stop() {
    let (prompt, expected) = reference(3);
    assert_eq!(expected.last(), Some(&2), "the reference ends with </s>");
    let (status, body) = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], continuation(&prompt, &expected));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], expected.len());
}

/// Streamed and whole responses carry the same text for every reference continuation, and it is
/// the whole decode wherever that decode is valid UTF-8. (Random weights emit invalid byte runs;
/// a byte-fallback decoder rewrites a whole invalid run as U+FFFD, which a stream that has already
/// sent a complete character of that run cannot take back.)
#[tokio::test]
async fn every_reference_continuation_streams_and_returns_the_same_text() {
    for i in 0..5 {
        let (prompt, expected) = reference(i);
        let request = json!({"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0});
        let (status, body) = post_json("/v1/completions", request.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let whole = body["choices"][0]["text"].as_str().unwrap().to_string();
        let mut streaming = request;
        streaming["stream"] = json!(true);
        let (_, text) = send(app(), post("/v1/completions", streaming.to_string())).await;
        let streamed: String = sse_data(&text)
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter_map(|chunk| chunk["choices"][0]["text"].as_str().map(str::to_string))
            .collect();
        assert_eq!(streamed, whole, "greedy.prompts[{i}]");
        let decoded = continuation(&prompt, &expected);
        if !decoded.contains('\u{FFFD}') {
            assert_eq!(whole, decoded, "greedy.prompts[{i}]");
        }
    }
}

#[tokio::test]
async fn streamed_completion_concatenates_to_the_same_text_and_ends_with_done() {
    let (prompt, expected) = reference(CLEAN_REFERENCE);
    let request = json!({"model": MODEL, "prompt": prompt, "max_tokens": expected.len(),
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let (status, body) = send(app(), post("/v1/completions", request.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (usage_chunk, text_chunks) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], expected.len());
    let mut text = String::new();
    for (i, chunk) in text_chunks.iter().enumerate() {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(
            chunk["usage"],
            Value::Null,
            "usage is null until the last chunk"
        );
        let choice = &chunk["choices"][0];
        let last = i + 1 == text_chunks.len();
        assert!(
            last || !choice["text"].as_str().unwrap().is_empty(),
            "empty text chunk: {chunk}"
        );
        assert_eq!(
            choice["finish_reason"],
            if last { json!("length") } else { Value::Null }
        );
        text.push_str(choice["text"].as_str().unwrap());
    }
    assert_eq!(text, continuation(&prompt, &expected));
}

#[tokio::test]
async fn n_choices_share_a_prompt_and_greedy_choices_are_identical() {
    let (prompt, expected) = reference(CLEAN_REFERENCE);
    let (status, body) = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": [prompt.clone(), prompt.clone()], "n": 2,
               "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["text"], continuation(&prompt, &expected[..6]));
    }
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 2 * prompt.len(), "completion_tokens": 24,
               "total_tokens": 2 * prompt.len() + 24})
    );
}

#[tokio::test]
async fn seeded_sampling_is_reproducible() {
    let request = json!({"model": MODEL, "prompt": "hello", "max_tokens": 8, "seed": 11, "n": 2});
    let (_, first) = post_json("/v1/completions", request.clone()).await;
    let (_, second) = post_json("/v1/completions", request).await;
    assert_eq!(first["choices"], second["choices"]);
}

#[tokio::test]
async fn logprobs_list_every_generated_token_with_offsets_into_the_text() {
    let (prompt, expected) = reference(CLEAN_REFERENCE);
    let (status, body) = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let logprobs = &body["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 8);
    let text = body["choices"][0]["text"].as_str().unwrap().chars().count();
    let mut previous = 0;
    for i in 0..8 {
        assert_eq!(
            tokens[i].as_str().unwrap(),
            state().tokenizer.decode(&[expected[i]], false).unwrap()
        );
        assert!(logprobs["token_logprobs"][i].as_f64().unwrap() <= 0.0);
        let top = logprobs["top_logprobs"][i].as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{top:?}");
        let offset = logprobs["text_offset"][i].as_u64().unwrap() as usize;
        assert!(offset >= previous && offset <= text, "offset {offset}");
        previous = offset;
    }
}

#[tokio::test]
async fn chat_completion_renders_the_template_and_answers_as_the_assistant() {
    let (status, body) = post_json(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 5, "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    // Required by OpenAI's schema though nullable: present, as null.
    assert_eq!(
        choice["message"].get("refusal"),
        Some(&Value::Null),
        "{body}"
    );
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len(),
        body["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(
        content[0]["bytes"].as_array().unwrap().len(),
        content[0]["token"].as_str().unwrap().len()
    );
    // "<s>[INST] hi [/INST]" with the template's BOS and no second one.
    let prompt = state()
        .tokenizer
        .encode("<s>[INST] hi [/INST]", false)
        .unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], prompt.len());
}

#[tokio::test]
async fn streamed_chat_opens_with_the_role_and_closes_with_an_empty_delta() {
    let request = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5, "temperature": 0, "stream": true});
    let (status, body) = send(app(), post("/v1/chat/completions", request.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let last = &chunks[chunks.len() - 1]["choices"][0];
    assert_eq!(last["delta"], json!({}));
    assert!(last["finish_reason"].is_string());
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let (_, reply) = post_json(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 5, "temperature": 0}),
    )
    .await;
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed,
        reply["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn system_message_is_refused_with_the_templates_exception() {
    let (status, body) = post_json(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, Some("messages"), None);
    assert_eq!(
        body["error"]["message"],
        "Conversation roles must alternate user/assistant/user/assistant/..."
    );
}

#[tokio::test]
async fn unknown_model_is_404() {
    let (status, body) =
        post_json("/v1/completions", json!({"model": "gpt-9", "prompt": "hi"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_error(&body, Some("model"), Some("model_not_found"));
    assert_eq!(body["error"]["message"], "The model `gpt-9` does not exist");
}

#[tokio::test]
async fn oversized_body_is_413_with_the_json_envelope() {
    let app = router(
        state(),
        &RouterOptions {
            max_body_bytes: 64,
            ..options()
        },
    )
    .unwrap();
    let body = json!({"model": MODEL, "prompt": "x".repeat(200)}).to_string();
    let (status, text) = send(app, post("/v1/completions", body)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_error(&body, None, Some("request_too_large"));
    assert!(body["error"]["message"].as_str().unwrap().contains("64"));
}

#[tokio::test]
async fn api_key_is_required_on_v1_routes_only() {
    let app = || {
        router(
            state(),
            &RouterOptions {
                api_key: Some("sk-test".into()),
                ..options()
            },
        )
        .unwrap()
    };
    let (status, text) = send(
        app(),
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_error(&body, None, Some("invalid_api_key"));
    let wrong = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer sk-wrong")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(app(), wrong).await.0, StatusCode::UNAUTHORIZED);
    let right = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer sk-test")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(app(), right).await.0, StatusCode::OK);
    for open in ["/health", "/ready", "/metrics"] {
        let (status, _) = send(app(), Request::get(open).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{open}");
    }
}

#[tokio::test]
async fn malformed_json_and_unsupported_fields_are_400() {
    let (status, text) = send(app(), post("/v1/completions", "{\"model\": ")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_error(&body, None, None);
    assert!(
        body["error"]["message"].as_str().unwrap().contains("EOF"),
        "{body}"
    );

    let (status, body) = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi", "suffix": "!"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, Some("suffix"), None);

    let (status, body) = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi", "frobnicate": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("frobnicate"));
}

#[tokio::test]
async fn sampling_errors_name_the_parameter() {
    let (status, body) = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi", "top_p": 1.5}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, Some("top_p"), None);
    assert!(body["error"]["message"].as_str().unwrap().contains("1.5"));
}

#[tokio::test]
async fn request_past_the_context_is_400_context_length_exceeded() {
    let (status, body) = post_json(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 600}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_error(&body, Some("max_tokens"), Some("context_length_exceeded"));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("600") && message.contains("512"),
        "{message}"
    );
}

#[tokio::test]
async fn models_health_ready_and_unknown_routes() {
    let (status, text) = send(
        app(),
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], MODEL);
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["owned_by"], "candlewick");

    // The openai client's `models.retrieve`: the listed entry by name, 404 for another name.
    let (status, text) = send(
        app(),
        Request::get(format!("/v1/models/{MODEL}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let one: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(one, body["data"][0]);
    let (status, text) = send(
        app(),
        Request::get("/v1/models/org/other-model")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let missing: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(missing["error"]["code"], "model_not_found", "{missing}");
    assert!(
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .contains("org/other-model"),
        "{missing}"
    );

    let (status, text) = send(app(), Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, r#"{"status":"ok"}"#)
    );
    let (status, _) = send(app(), Request::get("/ready").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);

    let (status, text) = send(
        app(),
        Request::get("/v2/nothing").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_object());
    let (status, text) = send(
        app(),
        Request::get("/v1/completions").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_object());
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let _ = post_json("/v1/completions", json!({"model": "nope", "prompt": "hi"})).await;
    // The same prompt twice: the second starts from the first's cached state.
    for _ in 0..2 {
        let _ = post_json(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "hi there", "max_tokens": 2}),
        )
        .await;
    }
    let (status, text) = send(app(), Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains(r#"candlewick_requests_total{route="/v1/completions",status="404"}"#),
        "{text}"
    );
    assert!(
        text.contains("candlewick_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("candlewick_generated_tokens_total"), "{text}");
    assert!(
        text.contains(r#"candlewick_decode_batch_size_bucket{le="128"}"#),
        "{text}"
    );
    for name in [
        "candlewick_prefix_cache_hits_total",
        "candlewick_prefix_cache_misses_total",
        "candlewick_prefix_cache_bytes",
    ] {
        assert!(text.contains(name), "{name} missing from {text}");
    }
}

#[tokio::test]
async fn cors_preflight_is_answered_for_allowed_origins() {
    let app = router(
        state(),
        &RouterOptions {
            cors_allow_origins: vec!["http://example.com".into()],
            ..options()
        },
    )
    .unwrap();
    let preflight = Request::options("/v1/completions")
        .header(header::ORIGIN, "http://example.com")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .body(Body::empty())
        .unwrap();
    let response = app.oneshot(preflight).await.unwrap();
    assert_eq!(
        response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "http://example.com"
    );
}

#[tokio::test]
async fn stop_strings_end_the_text_before_them() {
    let (prompt, expected) = reference(CLEAN_REFERENCE);
    let text = continuation(&prompt, &expected);
    let stop = "udail";
    let before = &text[..text.find(stop).unwrap()];
    for stream in [false, true] {
        let request = json!({"model": MODEL, "prompt": prompt, "max_tokens": 24,
            "temperature": 0, "stop": [stop], "stream": stream});
        let (status, body) = send(app(), post("/v1/completions", request.to_string())).await;
        assert_eq!(status, StatusCode::OK);
        let (got, finish) = if stream {
            let data = sse_data(&body);
            let chunks: Vec<Value> = data[..data.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            let text: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap())
                .collect();
            (
                text,
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let body: Value = serde_json::from_str(&body).unwrap();
            let choice = &body["choices"][0];
            (
                choice["text"].as_str().unwrap().to_string(),
                choice["finish_reason"].clone(),
            )
        };
        assert_eq!(got, before, "stream: {stream}");
        assert_eq!(finish, "stop", "stream: {stream}");
    }
}

#[tokio::test]
async fn echo_puts_the_prompt_before_the_text() {
    let request = json!({"model": MODEL, "prompt": "hello there", "max_tokens": 3,
        "temperature": 0, "echo": true});
    let (status, body) = post_json("/v1/completions", request.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("hello there"), "{text}");

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (_, sse) = send(app(), post("/v1/completions", streamed.to_string())).await;
    let data = sse_data(&sse);
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"][0]["text"], "hello there");
    let joined: String = data[..data.len() - 1]
        .iter()
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(joined, text);
}

#[tokio::test]
async fn requests_past_their_time_limit_fail_with_504_or_an_error_chunk() {
    let app = router(load_state(Duration::from_nanos(1)), &options()).unwrap();
    let request = json!({"model": MODEL, "prompt": "hi", "max_tokens": 400, "ignore_eos": true});
    let (status, text) = send(app.clone(), post("/v1/completions", request.to_string())).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["type"], "server_error");

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (status, text) = send(app, post("/v1/completions", streamed.to_string())).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a stream has started before it fails"
    );
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let error: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not finish within"),
        "{error}"
    );
}

/// A schema whose every document is short: the fixture's random weights write anything the
/// grammar allows, so strings and arrays are bounded for the output to end within the budget.
fn bounded_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "mood": {"enum": ["happy", "sad"]},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2}
        },
        "required": ["name", "age", "mood"],
        "additionalProperties": false,
        "$defs": {"tag": {"type": "string", "maxLength": 4}}
    })
}

fn validate_against(schema: &Value, text: &str) {
    let value: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler
        .add_resource("schema.json", schema.clone())
        .unwrap();
    let index = compiler.compile("schema.json", &mut schemas).unwrap();
    if let Err(error) = schemas.validate(&value, index) {
        panic!("{text} breaks the schema: {error}");
    }
}

#[tokio::test]
async fn chat_json_schema_outputs_validate_sampled_or_greedy_streamed_or_not() {
    let schema = bounded_schema();
    for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.3, 3)] {
        let (status, body) = post_json(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "who?"}],
                   "max_tokens": 200, "temperature": temperature, "seed": seed,
                   "response_format": {"type": "json_schema",
                       "json_schema": {"name": "person", "strict": true, "schema": schema}}}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{body}");
        validate_against(&schema, choice["message"]["content"].as_str().unwrap());
    }

    let request = json!({"model": MODEL, "messages": [{"role": "user", "content": "who?"}],
        "max_tokens": 200, "temperature": 1.0, "seed": 7, "stream": true,
        "response_format": {"type": "json_schema",
            "json_schema": {"name": "person", "schema": schema}}});
    let (status, text) = send(app(), post("/v1/chat/completions", request.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let mut content = String::new();
    let mut finish = None;
    for data in sse_data(&text) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(delta) = choice["delta"]["content"].as_str() {
            content.push_str(delta);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("stop"));
    validate_against(&schema, &content);
    // The stream's text is the same reply as the JSON response's.
    let mut unstreamed = request.clone();
    unstreamed["stream"] = json!(false);
    let (_, body) = post_json("/v1/chat/completions", unstreamed).await;
    assert_eq!(body["choices"][0]["message"]["content"], content.as_str());
}

#[tokio::test]
async fn completions_take_json_regex_choice_and_grammar_constraints() {
    let prompt = "Answer:";
    let constrained = |field: Value| {
        let mut request = json!({"model": MODEL, "prompt": prompt, "max_tokens": 60,
                                 "temperature": 1.0, "seed": 11, "n": 3});
        for (key, value) in field.as_object().unwrap() {
            request[key] = value.clone();
        }
        post_json("/v1/completions", request)
    };
    let texts = |body: &Value| -> Vec<String> {
        body["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|choice| {
                assert_eq!(choice["finish_reason"], "stop", "{body}");
                choice["text"].as_str().unwrap().to_string()
            })
            .collect()
    };

    let choices = ["red", "green", "dark \"blue\""];
    let (status, body) = constrained(json!({"guided_choice": choices})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for text in texts(&body) {
        assert!(choices.contains(&text.as_str()), "{text:?}");
    }

    let (status, body) = constrained(json!({"guided_regex": "[0-9]{2}-[a-c]{3}"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for text in texts(&body) {
        let bytes = text.as_bytes();
        assert!(
            bytes.len() == 6
                && bytes[..2].iter().all(u8::is_ascii_digit)
                && bytes[2] == b'-'
                && bytes[3..].iter().all(|b| (b'a'..=b'c').contains(b)),
            "{text:?}"
        );
    }

    let (status, body) =
        constrained(json!({"guided_grammar": "start: \"go \" (\"left\" | \"right\") \"!\""})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for text in texts(&body) {
        assert!(text == "go left!" || text == "go right!", "{text:?}");
    }

    let schema = bounded_schema();
    for field in [
        json!({"guided_json": schema}),
        json!({"response_format": {"type": "json_schema",
                                   "json_schema": {"name": "p", "schema": schema}}}),
    ] {
        let (status, body) = constrained(field).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for text in texts(&body) {
            validate_against(&schema, &text);
        }
    }
}

#[tokio::test]
async fn a_grammar_that_does_not_compile_is_a_400_quoting_the_engine() {
    for (field, param) in [
        (
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "bad", "schema": {"type": "strnig"}}}}),
            "response_format",
        ),
        (json!({"guided_regex": "(open"}), "guided_regex"),
        (
            json!({"guided_grammar": "start: undefined_rule"}),
            "guided_grammar",
        ),
    ] {
        let mut request = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}]});
        for (key, value) in field.as_object().unwrap() {
            request[key] = value.clone();
        }
        let (status, body) = post_json("/v1/chat/completions", request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_error(&body, Some(param), None);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{param} cannot be used: ")),
            "{message}"
        );
        assert!(message.len() > param.len() + 20, "{message}");
    }
}

#[tokio::test]
async fn seeded_constrained_sampling_is_the_same_alone_and_beside_fifteen_others() {
    let request = |seed: u64| {
        json!({"model": MODEL, "prompt": "Data:", "max_tokens": 120, "temperature": 1.0,
               "seed": seed, "guided_json": bounded_schema()})
    };
    // A fresh engine, so that the batch composition is only what this test sends.
    let state = load_state(Duration::from_secs(120));
    let app = router(state, &options()).unwrap();
    let (_, alone) = send(app.clone(), post("/v1/completions", request(5).to_string())).await;
    let alone: Value = serde_json::from_str(&alone).unwrap();
    let mut batch = Vec::new();
    for seed in 100..115 {
        batch.push(send(
            app.clone(),
            post("/v1/completions", request(seed).to_string()),
        ));
    }
    batch.insert(
        7,
        send(app.clone(), post("/v1/completions", request(5).to_string())),
    );
    let results = futures_util::future::join_all(batch).await;
    let beside: Value = serde_json::from_str(&results[7].1).unwrap();
    assert_eq!(beside["choices"][0]["text"], alone["choices"][0]["text"]);
    validate_against(
        &bounded_schema(),
        alone["choices"][0]["text"].as_str().unwrap(),
    );
    let distinct: std::collections::HashSet<String> = results
        .iter()
        .map(|(status, text)| {
            assert_eq!(*status, StatusCode::OK, "{text}");
            let body: Value = serde_json::from_str(text).unwrap();
            let text = body["choices"][0]["text"].as_str().unwrap().to_string();
            validate_against(&bounded_schema(), &text);
            text
        })
        .collect();
    assert!(distinct.len() > 8, "{distinct:?}");
}

#[tokio::test]
async fn tokenize_and_detokenize_count_as_the_prompts_do() {
    let tokenizer = &state().tokenizer;
    let (status, body) = post_json(
        "/tokenize",
        json!({"model": MODEL, "prompt": "Hello world", "return_token_strs": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let expected = tokenizer.encode("Hello world", true).unwrap();
    assert_eq!(body["tokens"], json!(expected));
    assert_eq!(body["count"], expected.len());
    assert_eq!(body["max_model_len"], 512);
    assert_eq!(body["token_strs"].as_array().unwrap().len(), expected.len());
    assert_eq!(body["token_strs"][0], "<s>");

    // A conversation counts as the chat route's prompt: the rendered template, no second BOS.
    let (status, body) = post_json(
        "/tokenize",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chat = tokenizer.encode("<s>[INST] hi [/INST]", false).unwrap();
    assert_eq!(body["tokens"], json!(chat));
    assert!(body["token_strs"].is_null());

    let (status, body) =
        post_json("/detokenize", json!({"model": MODEL, "tokens": expected})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["prompt"], "<s> Hello world");

    for (route, request, param) in [
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": "a", "messages": []}),
            "messages",
        ),
        ("/tokenize", json!({"model": MODEL}), "prompt"),
        (
            "/detokenize",
            json!({"model": MODEL, "tokens": [1, 99999]}),
            "tokens",
        ),
    ] {
        let (status, body) = post_json(route, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_error(&body, Some(param), None);
    }
    let (status, _) = post_json("/detokenize", json!({"model": "other", "tokens": [1]})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8},
                               "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time"}}
    ])
}

#[tokio::test]
async fn required_and_named_tool_choices_always_return_calls_that_parse() {
    let tools = weather_tools();
    let arguments_schema = tools[0]["function"]["parameters"].clone();
    for (choice, parallel) in [
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            true,
        ),
        (json!("required"), false),
        (json!("required"), true),
    ] {
        // Random weights would list parallel calls for ever: a bias on "]" ends the list soon
        // (the grammar allows it only after a whole call).
        let close = *state()
            .tokenizer
            .encode("]", false)
            .unwrap()
            .last()
            .unwrap();
        for seed in 0..3 {
            let (status, body) = post_json(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user", "content": "weather?"}],
                       "tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel,
                       "max_tokens": 300, "temperature": 1.0, "seed": seed,
                       "logit_bias": {close.to_string(): 8.0}}),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let choice_body = &body["choices"][0];
            assert_eq!(choice_body["finish_reason"], "tool_calls", "{body}");
            let message = &choice_body["message"];
            assert!(message["content"].is_null(), "{body}");
            assert!(message.get("refusal").is_some_and(Value::is_null));
            let calls = message["tool_calls"].as_array().unwrap();
            assert!(!calls.is_empty());
            if !parallel {
                assert_eq!(calls.len(), 1, "{body}");
            }
            for call in calls {
                assert!(call["id"].as_str().unwrap().starts_with("call_"));
                assert_eq!(call["type"], "function");
                let name = call["function"]["name"].as_str().unwrap();
                let arguments = call["function"]["arguments"].as_str().unwrap();
                match name {
                    "get_weather" => validate_against(&arguments_schema, arguments),
                    "get_time" => {
                        let value: Value = serde_json::from_str(arguments).unwrap();
                        assert!(value.is_object(), "{arguments}");
                    }
                    other => panic!("called {other}"),
                }
                if choice.is_object() {
                    assert_eq!(name, "get_weather");
                }
            }
        }
    }
}

#[tokio::test]
async fn tool_calls_stream_as_deltas_that_add_up_to_the_unstreamed_reply() {
    let request = json!({"model": MODEL, "messages": [{"role": "user", "content": "weather?"}],
        "tools": weather_tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 300, "temperature": 1.0, "seed": 4, "stream": true});
    let (status, text) = send(app(), post("/v1/chat/completions", request.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish = None;
    let mut content = String::new();
    for data in sse_data(&text) {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap();
        let choice = &chunk["choices"][0];
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        for delta in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = delta["index"].as_u64().unwrap() as usize;
            if index == calls.len() {
                assert!(delta["id"].as_str().unwrap().starts_with("call_"));
                assert_eq!(delta["type"], "function");
                calls.push((String::new(), String::new()));
            }
            calls[index].0 += delta["function"]["name"].as_str().unwrap_or("");
            calls[index].1 += delta["function"]["arguments"].as_str().unwrap_or("");
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(content, "");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "get_weather");
    let mut unstreamed = request.clone();
    unstreamed["stream"] = json!(false);
    let (_, body) = post_json("/v1/chat/completions", unstreamed).await;
    let call = &body["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["arguments"], calls[0].1.as_str());
}

#[tokio::test]
async fn auto_tools_with_a_text_reply_return_it_as_content() {
    // The fixture's random weights do not write calls: the reply is text, returned as content.
    let (status, body) = post_json(
        "/v1/chat/completions",
        json!({"model": MODEL, "tools": weather_tools(), "tool_choice": "auto",
               "max_tokens": 8, "temperature": 0,
               "messages": [{"role": "user", "content": "weather?"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let message = &body["choices"][0]["message"];
    assert!(message["content"].is_string(), "{body}");
    assert!(message.get("tool_calls").is_none(), "{body}");
    let (_, plain) = post_json(
        "/v1/chat/completions",
        json!({"model": MODEL, "max_tokens": 8, "temperature": 0,
               "messages": [{"role": "user", "content": "weather?"}]}),
    )
    .await;
    // The fixture's template ignores tools, so the reply is the plain chat's.
    assert_eq!(
        message["content"],
        plain["choices"][0]["message"]["content"]
    );
    // Streamed, the same text arrives as content.
    let request = json!({"model": MODEL, "tools": weather_tools(), "max_tokens": 8,
        "temperature": 0, "stream": true, "messages": [{"role": "user", "content": "weather?"}]});
    let (_, text) = send(app(), post("/v1/chat/completions", request.to_string())).await;
    let streamed: String = sse_data(&text)
        .iter()
        .filter(|data| *data != "[DONE]")
        .map(|data| {
            let chunk: Value = serde_json::from_str(data).unwrap();
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(streamed, message["content"].as_str().unwrap());
}

/// Validates `value` against the schema at `pointer` of the server's own /openapi.json.
struct OpenApi {
    schemas: boon::Schemas,
    compiler: boon::Compiler,
}

impl OpenApi {
    async fn fetch() -> Self {
        let (status, text) = send(
            app(),
            Request::get("/openapi.json").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let document: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        let mut compiler = boon::Compiler::new();
        compiler.set_default_draft(boon::Draft::V2020_12);
        compiler.add_resource("openapi.json", document).unwrap();
        Self {
            schemas: boon::Schemas::new(),
            compiler,
        }
    }

    fn check(&mut self, pointer: &str, value: &Value) {
        let location = format!("openapi.json#{pointer}");
        let index = self
            .compiler
            .compile(&location, &mut self.schemas)
            .unwrap_or_else(|e| panic!("{pointer}: {e}"));
        if let Err(error) = self.schemas.validate(value, index) {
            panic!("{value} breaks {pointer}: {error}");
        }
    }
}

/// `path` as one JSON-pointer segment.
fn segment(path: &str) -> String {
    path.replace('~', "~0").replace('/', "~1")
}

fn body_pointer(path: &str) -> String {
    format!(
        "/paths/{}/post/requestBody/content/application~1json/schema",
        segment(path)
    )
}

fn ok_pointer(method: &str, path: &str) -> String {
    format!(
        "/paths/{}/{method}/responses/200/content/application~1json/schema",
        segment(path)
    )
}

#[tokio::test]
async fn requests_and_responses_match_the_servers_own_openapi_description() {
    let mut openapi = OpenApi::fetch().await;
    let posts = [
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 4, "logprobs": true, "top_logprobs": 2, "seed": 1}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "weather?"}],
                   "tools": weather_tools(), "tool_choice": "required", "max_tokens": 200,
                   "temperature": 0}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": ["a", "b"], "max_tokens": 3, "logprobs": 2,
                   "guided_regex": "[ab]{3}"}),
        ),
        (
            "/tokenize",
            json!({"model": MODEL, "prompt": "hi", "return_token_strs": true}),
        ),
        ("/detokenize", json!({"model": MODEL, "tokens": [1, 2, 3]})),
    ];
    for (path, request) in posts {
        openapi.check(&body_pointer(path), &request);
        let (status, body) = post_json(path, request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        openapi.check(&ok_pointer("post", path), &body);
    }
    // Streamed chunks, each `data:` one chunk as the stream's schema says.
    let request = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}});
    let tool_request = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "tools": weather_tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 200, "temperature": 0, "stream": true});
    let chunk_pointer = "/paths/~1v1~1chat~1completions/post/responses/200/content/text~1event-stream/schema/x-chunk";
    let mut tool_call_chunks = 0;
    for request in [request, tool_request] {
        let (_, text) = send(app(), post("/v1/chat/completions", request.to_string())).await;
        for data in sse_data(&text).iter().filter(|data| *data != "[DONE]") {
            let chunk: Value = serde_json::from_str(data).unwrap();
            openapi.check(chunk_pointer, &chunk);
            tool_call_chunks += usize::from(chunk["choices"][0]["delta"]["tool_calls"].is_array());
        }
    }
    assert_eq!(tool_call_chunks, 1);
    for (path, pointer) in [
        ("/v1/models", ok_pointer("get", "/v1/models")),
        (
            &*format!("/v1/models/{MODEL}"),
            ok_pointer("get", "/v1/models/{model}"),
        ),
    ] {
        let (status, text) = send(app(), Request::get(path).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        openapi.check(&pointer, &serde_json::from_str(&text).unwrap());
    }
    // The description is strict where OpenAI's is: a chat message without `refusal` breaks it.
    let index = openapi
        .compiler
        .compile(
            "openapi.json#/components/schemas/AssistantMessage",
            &mut openapi.schemas,
        )
        .unwrap();
    assert!(openapi
        .schemas
        .validate(
            &json!({"role": "assistant", "content": "x", "refusal": null}),
            index
        )
        .is_ok());
    assert!(openapi
        .schemas
        .validate(&json!({"role": "assistant", "content": "x"}), index)
        .is_err());
    // Errors are the envelope the description names.
    let (status, body) = post_json("/v1/completions", json!({"model": MODEL, "prompt": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    openapi.check(
        "/paths/~1v1~1completions/post/responses/400/content/application~1json/schema",
        &body,
    );
}
