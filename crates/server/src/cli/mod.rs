//! The `candlewick` subcommands: `serve` starts the HTTP server; `generate`, `classify` and
//! `bench` run the engine from the command line; `convert` turns other checkpoint formats into
//! Hugging Face folders.

pub mod bench;
pub mod classify;
pub mod convert;
pub mod generate;
pub mod serve;
