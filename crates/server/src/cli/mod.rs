//! The `candlewick` subcommands: `serve` starts the HTTP server; `generate`, `classify` and
//! `bench` run the engine from the command line.

pub mod bench;
pub mod classify;
pub mod generate;
pub mod serve;
