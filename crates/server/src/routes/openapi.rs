//! `GET /openapi.json`: an OpenAPI 3.1 description of every route, its schemas generated from the
//! same Rust types the handlers read and write (schemars follows their serde attributes), with the
//! served models' names as the values of `model`.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::Json;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::api::chat::{ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse};
use crate::api::completions::{CompletionRequest, CompletionResponse};
use crate::api::embeddings::{EmbeddingRequest, EmbeddingResponse};
use crate::error::ErrorEnvelope;
use crate::pipelines::{fill_mask, question_answering, text_classification, token_classification};
use crate::routes::encoders::TaskRequest;
use crate::routes::models::{Model, ModelList};
use crate::routes::tokenize::{
    DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse,
};
use crate::state::Served;

/// The document of this server: `model` in each request lists the served models' names.
pub async fn document(State(served): State<Arc<Served>>) -> Json<Value> {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    let mut document = DOCUMENT.get_or_init(build).clone();
    let names: Vec<Value> = served
        .models()
        .iter()
        .map(|model| Value::from(model.model_name.as_str()))
        .collect();
    let schemas = &mut document["components"]["schemas"];
    for request in [
        "CompletionRequest",
        "ChatCompletionRequest",
        "EmbeddingRequest",
        "TaskRequest",
        "TokenizeRequest",
        "DetokenizeRequest",
    ] {
        let model = &mut schemas[request]["properties"]["model"];
        let mut allowed = names.clone();
        // The task routes' `model` is optional.
        if model["type"]
            .as_array()
            .is_some_and(|types| types.contains(&json!("null")))
        {
            allowed.push(Value::Null);
        }
        model["enum"] = Value::Array(allowed);
    }
    Json(document)
}

/// One operation: its summary, request body and success response.
struct Operation {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    request: Option<Value>,
    response: Value,
    /// Whether the route streams server-sent events when the request asks (`stream: true`).
    streams: Option<Value>,
    /// Path parameters.
    parameters: Vec<Value>,
}

fn build() -> Value {
    // Requests as the handlers read them, responses as they write them (a field that is always
    // written, null or not, is required in a response).
    let settings = || {
        let mut settings = SchemaSettings::draft2020_12();
        settings.definitions_path = "/components/schemas".into();
        settings.meta_schema = None;
        settings
    };
    let mut requests = settings().for_deserialize().into_generator();
    let mut responses = settings().for_serialize().into_generator();
    fn of<T: JsonSchema>(generator: &mut SchemaGenerator) -> Value {
        generator.subschema_for::<T>().to_value()
    }
    let status = json!({"type": "object", "properties": {"status": {"type": "string"}},
                        "required": ["status"]});
    let model_parameter = json!({"name": "model", "in": "path", "required": true,
                                 "schema": {"type": "string"}});
    let post = |path, summary, request, response| Operation {
        method: "post",
        path,
        summary,
        request: Some(request),
        response,
        streams: None,
        parameters: Vec::new(),
    };
    let get = |path, summary, response| Operation {
        method: "get",
        request: None,
        ..post(path, summary, Value::Null, response)
    };
    let task = of::<TaskRequest>(&mut requests);
    let operations = vec![
        Operation {
            streams: Some(of::<CompletionResponse>(&mut responses)),
            ..post(
                "/v1/completions",
                "Continues prompts (OpenAI's legacy completions)",
                of::<CompletionRequest>(&mut requests),
                of::<CompletionResponse>(&mut responses),
            )
        },
        Operation {
            streams: Some(of::<ChatCompletionChunk>(&mut responses)),
            ..post(
                "/v1/chat/completions",
                "Answers a conversation (OpenAI's chat completions)",
                of::<ChatCompletionRequest>(&mut requests),
                of::<ChatCompletionResponse>(&mut responses),
            )
        },
        post(
            "/v1/embeddings",
            "Embeds texts (OpenAI's embeddings)",
            of::<EmbeddingRequest>(&mut requests),
            of::<EmbeddingResponse>(&mut responses),
        ),
        post(
            "/v1/classify",
            "Text classification, as transformers' pipeline",
            task.clone(),
            json!({"type": "array", "items": of::<text_classification::Output>(&mut responses)}),
        ),
        post(
            "/v1/token-classify",
            "Token classification, as transformers' pipeline",
            task.clone(),
            of::<token_classification::Output>(&mut responses),
        ),
        post(
            "/v1/question-answering",
            "Extractive question answering, as transformers' pipeline",
            task.clone(),
            of::<question_answering::Output>(&mut responses),
        ),
        post(
            "/v1/fill-mask",
            "Fill-mask, as transformers' pipeline",
            task,
            of::<fill_mask::Output>(&mut responses),
        ),
        get(
            "/v1/models",
            "The served models",
            of::<ModelList>(&mut responses),
        ),
        Operation {
            parameters: vec![model_parameter],
            ..get(
                "/v1/models/{model}",
                "One served model",
                of::<Model>(&mut responses),
            )
        },
        post(
            "/tokenize",
            "Token ids of a prompt or a rendered conversation",
            of::<TokenizeRequest>(&mut requests),
            of::<TokenizeResponse>(&mut responses),
        ),
        post(
            "/detokenize",
            "The text of token ids",
            of::<DetokenizeRequest>(&mut requests),
            of::<DetokenizeResponse>(&mut responses),
        ),
        get("/health", "200 while the process serves", status.clone()),
        get(
            "/ready",
            "200 while every model's engine runs, 503 otherwise",
            status,
        ),
    ];
    let error = of::<ErrorEnvelope>(&mut responses);
    let error_response = |description: &str| {
        json!({"description": description,
               "content": {"application/json": {"schema": error.clone()}}})
    };
    let mut paths = Map::new();
    for operation in operations {
        let mut content = Map::new();
        content.insert(
            "application/json".into(),
            json!({"schema": operation.response}),
        );
        if let Some(chunk) = operation.streams {
            // Each event's data is one chunk as JSON; the last is `[DONE]`.
            content.insert(
                "text/event-stream".into(),
                json!({"schema": {"type": "string",
                                  "description": "server-sent events, each `data:` one chunk",
                                  "x-chunk": chunk}}),
            );
        }
        let mut statuses = Map::new();
        statuses.insert(
            "200".into(),
            json!({"description": "Success", "content": content}),
        );
        if operation.request.is_some() || !operation.parameters.is_empty() {
            statuses.insert("400".into(), error_response("The request is invalid"));
            statuses.insert("404".into(), error_response("No such model"));
        }
        if operation.request.is_some() {
            statuses.insert("401".into(), error_response("A wrong or missing API key"));
            statuses.insert("413".into(), error_response("The body is too large"));
            statuses.insert("429".into(), error_response("The queue is full"));
            statuses.insert("500".into(), error_response("The server failed"));
            statuses.insert("503".into(), error_response("The server is shutting down"));
            statuses.insert("504".into(), error_response("The request ran out of time"));
        }
        if operation.path == "/ready" {
            statuses.insert(
                "503".into(),
                json!({"description": "An engine is not running",
                       "content": {"application/json": {"schema": {"type": "object"}}}}),
            );
        }
        let mut entry = json!({
            "summary": operation.summary,
            "operationId": format!("{}{}", operation.method, operation.path.replace(['/', '{', '}', '-'], "_")),
            "responses": statuses,
        });
        if let Some(request) = operation.request {
            entry["requestBody"] = json!({"required": true,
                "content": {"application/json": {"schema": request}}});
        }
        if !operation.parameters.is_empty() {
            entry["parameters"] = Value::Array(operation.parameters);
        }
        paths
            .entry(operation.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .map(|methods| methods.insert(operation.method.into(), entry));
    }
    paths.insert(
        "/metrics".into(),
        json!({"get": {"summary": "Prometheus metrics", "operationId": "get_metrics",
            "responses": {"200": {"description": "The text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}}),
    );
    paths.insert(
        "/openapi.json".into(),
        json!({"get": {"summary": "This description", "operationId": "get_openapi",
            "responses": {"200": {"description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": {"type": "object"}}}}}}}),
    );
    let mut schemas: Map<String, Value> = requests.take_definitions(true).into_iter().collect();
    for (name, schema) in responses.take_definitions(true) {
        // A type both read and written must be described the same way both times.
        if let Some(read) = schemas.get(&name) {
            debug_assert_eq!(read, &schema, "{name} differs as request and response");
        }
        schemas.insert(name, schema);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Candlewick",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible generation, embeddings and transformers-style task pipelines.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    })
}
