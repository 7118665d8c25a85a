//! Candlewick's HTTP server: an OpenAI-compatible API over the scheduler.
//!
//! The binary (`candlewick serve`) loads the model, starts the [`state::AppState`], and serves
//! [`routes::router`]; tests drive the same router in process.

pub mod api;
pub mod auth;
pub mod chat_template;
pub mod config;
pub mod error;
pub mod generation;
pub mod metrics;
pub mod pipelines;
pub mod routes;
pub mod state;
pub mod tools;
