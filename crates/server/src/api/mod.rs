//! OpenAI's request and response types (serde), and their validation.

pub mod chat;
pub mod common;
pub mod completions;
pub mod embeddings;
