//! `GET /v1/models` and `GET /v1/models/{model}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use schemars::JsonSchema;
use serde::Serialize;

use crate::error::ApiError;
use crate::state::{AppState, Served};

/// `{"object": "list", "data": [...]}`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<Model>,
}

/// One served model.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Model {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

/// Lists the served model.
pub async fn list(State(served): State<Arc<Served>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: served
            .models()
            .iter()
            .map(|model| describe(model))
            .collect(),
    })
}

/// One model by its name (the openai client's `models.retrieve`); 404 for another name.
pub async fn retrieve(
    State(served): State<Arc<Served>>,
    Path(model): Path<String>,
) -> Result<Json<Model>, ApiError> {
    Ok(Json(describe(served.get(&model)?)))
}

fn describe(state: &AppState) -> Model {
    Model {
        id: state.model_name.clone(),
        object: "model",
        created: state.created,
        owned_by: "candlewick",
    }
}
