//! One server, two models: a Mistral generator (the w8-gqa2 fixture) and a MobileBERT
//! token-classification encoder, each with its own scheduler, routed by `model`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::Router;
use candlewick_engine::{load_encoder, load_generator, LoadOptions, ModelSource, Pooling};
use candlewick_scheduler::{EncoderConfig, SchedulerConfig};
use candlewick_server::pipelines::PipelineTokenizer;
use candlewick_server::routes::{router, RouterOptions};
use candlewick_server::state::{AppState, Served};
use serde_json::{json, Value};
use tower::ServiceExt;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn generator(name: &str) -> Arc<AppState> {
    let loaded = load_generator(
        &ModelSource::Dir(fixture("mistral/w8-gqa2")),
        &LoadOptions::default(),
    )
    .unwrap();
    let max = loaded.generator.max_context();
    let config = SchedulerConfig {
        max_waiting: 16,
        max_batch_tokens: 512,
        max_input_tokens: max,
        max_total_tokens: max,
        request_timeout: None,
    };
    Arc::new(AppState::start(name.into(), loaded, config).unwrap())
}

fn encoder(name: &str) -> Arc<AppState> {
    let loaded = load_encoder(
        &ModelSource::Dir(fixture(
            "encoders/mobilebert-layernorm/token-classification",
        )),
        &LoadOptions::default(),
    )
    .unwrap();
    let pipeline_tokenizer = PipelineTokenizer::new(
        &loaded.tokenizer.shared(),
        loaded.tokenizer_config.as_deref(),
    )
    .unwrap();
    let max = loaded.model.max_positions();
    let config = EncoderConfig {
        max_waiting: 16,
        max_batch_tokens: 1024,
        max_input_tokens: max,
        max_request_tokens: 4096,
    };
    Arc::new(
        AppState::start_encoder(
            name.into(),
            loaded,
            pipeline_tokenizer,
            config,
            Pooling::Mean,
        )
        .unwrap(),
    )
}

fn app(models: Vec<Arc<AppState>>) -> Router {
    let options = RouterOptions {
        api_key: None,
        max_body_bytes: 1 << 20,
        cors_allow_origins: Vec::new(),
    };
    router(Served::new(models).unwrap(), &options).unwrap()
}

async fn call(app: &Router, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, |body| Body::from(body.to_string())))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_generator_and_an_encoder_side_by_side_answer_their_own_routes() {
    let app = app(vec![generator("writer"), encoder("tagger")]);

    let (status, list) = call(&app, "GET", "/v1/models", None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["writer", "tagger"]);
    let (status, one) = call(&app, "GET", "/v1/models/tagger", None).await;
    assert_eq!(
        (status, one["id"].as_str()),
        (StatusCode::OK, Some("tagger"))
    );

    let (status, body) = call(
        &app,
        "POST",
        "/v1/completions",
        Some(json!({"model": "writer", "prompt": "Hi", "max_tokens": 4, "temperature": 0})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model"], "writer");
    assert_eq!(body["usage"]["completion_tokens"], 4);

    let tag = json!({"inputs": "Sarah lives in London", "parameters": {"aggregation_strategy": "simple"}});
    let mut named = tag.clone();
    named["model"] = json!("tagger");
    let (status, named_answer) = call(&app, "POST", "/v1/token-classify", Some(named)).await;
    assert_eq!(status, StatusCode::OK, "{named_answer}");
    assert!(named_answer.is_array(), "{named_answer}");
    // Without `model`, the task routes go to the one model doing the task.
    let (status, answer) = call(&app, "POST", "/v1/token-classify", Some(tag)).await;
    assert_eq!((status, &answer), (StatusCode::OK, &named_answer));

    // A model's name on the other's route: the model's-task 400; an unknown name: 404.
    let (status, body) = call(
        &app,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": "tagger", "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_task");
    assert_eq!(body["error"]["param"], "model");
    let (status, body) = call(
        &app,
        "POST",
        "/v1/token-classify",
        Some(json!({"model": "writer", "inputs": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "unsupported_task");
    let (status, body) = call(
        &app,
        "POST",
        "/v1/completions",
        Some(json!({"model": "nobody", "prompt": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    // The classify route: no served model does it.
    let (status, body) = call(&app, "POST", "/v1/classify", Some(json!({"inputs": "x"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "model");

    let (status, _) = call(&app, "GET", "/ready", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn two_models_may_not_share_a_name() {
    let error = Served::new(vec![encoder("same"), encoder("same")])
        .err()
        .unwrap();
    assert!(error.contains("\"same\""), "{error}");
}
