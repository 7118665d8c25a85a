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
    let operations = vec![
        Operation {
            method: "post",
            path: "/v1/completions",
            summary: "Continues prompts (OpenAI's legacy completions)",
            request: Some(of::<CompletionRequest>(&mut requests)),
            response: of::<CompletionResponse>(&mut responses),
            streams: Some(of::<CompletionResponse>(&mut responses)),
            parameters: Vec::new(),
        },
        Operation {
            method: "post",
            path: "/v1/chat/completions",
            summary: "Answers a conversation (OpenAI's chat completions)",
            request: Some(of::<ChatCompletionRequest>(&mut requests)),
            response: of::<ChatCompletionResponse>(&mut responses),
            streams: Some(of::<ChatCompletionChunk>(&mut responses)),
            parameters: Vec::new(),
        },
        Operation {
            method: "post",
            path: "/v1/embeddings",
            summary: "Embeds texts (OpenAI's embeddings)",
            request: Some(of::<EmbeddingRequest>(&mut requests)),
            response: of::<EmbeddingResponse>(&mut responses),
            streams: None,
            parameters: Vec::new(),
        },
        Operation {
            method: "post",
            path: "/v1/classify",
            summary: "Text classification, as transformers' pipeline",
            request: Some(of::<TaskRequest>(&mut requests)),
            response: json!({"type": "array", "items":
                of::<text_classification::Output>(&mut responses)}),
            streams: None,
            parameters: Vec::new(),
        },
        Operation {
            method: "post",
            path: "/v1/token-classify",
            summary: "Token classification, as transformers' pipeline",
            request: Some(of::<TaskRequest>(&mut requests)),
            response: of::<token_classification::Output>(&mut responses),
            streams: None,
            parameters: Vec::new(),
        },
        Operation {
            method: "post",
            path: "/v1/question-answering",
            summary: "Extractive question answering, as transformers' pipeline",
            request: Some(of::<TaskRequest>(&mut requests)),
            response: of::<question_answering::Output>(&mut responses),
            streams: None,
            parameters: Vec::new(),
        },
        Operation {
            method: "post",
            path: "/v1/fill-mask",
            summary: "Fill-mask, as transformers' pipeline",
            request: Some(of::<TaskRequest>(&mut requests)),
            response: of::<fill_mask::Output>(&mut responses),
            streams: None,
            parameters: Vec::new(),
        },
        Operation {
            method: "get",
            path: "/v1/models",
            summary: "The served models",
            request: None,
            response: of::<ModelList>(&mut responses),
            streams: None,
            parameters: Vec::new(),
        },
        Operation {
            method: "get",
            path: "/v1/models/{model}",
            summary: "One served model",
            request: None,
            response: of::<Model>(&mut responses),
            streams: None,
            parameters: vec![model_parameter],
        },
        Operation {
            method: "post",
            path: "/tokenize",
            summary: "Token ids of a prompt or a rendered conversation",
            request: Some(of::<TokenizeRequest>(&mut requests)),
            response: of::<TokenizeResponse>(&mut responses),
            streams: None,
            parameters: Vec::new(),
        },
        Operation {
            method: "post",
            path: "/detokenize",
            summary: "The text of token ids",
            request: Some(of::<DetokenizeRequest>(&mut requests)),
            response: of::<DetokenizeResponse>(&mut responses),
            streams: None,
            parameters: Vec::new(),
        },
        Operation {
            method: "get",
            path: "/health",
            summary: "200 while the process serves",
            request: None,
            response: status.clone(),
            streams: None,
            parameters: Vec::new(),
        },
        Operation {
            method: "get",
            path: "/ready",
            summary: "200 while every model's engine runs, 503 otherwise",
            request: None,
            response: status,
            streams: None,
            parameters: Vec::new(),
        },
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
