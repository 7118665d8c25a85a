//! `candlewick serve`: load the model, start the scheduler, serve the OpenAI-compatible API,
//! and on SIGTERM or SIGINT stop accepting, finish what is in flight, then stop the engine.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candlewick_engine::registry::Kind;
use candlewick_engine::{
    load_encoder, load_generator, model_kind, GeneratorConfig, LoadOptions, ModelSource,
};
use candlewick_scheduler::{EncoderConfig, SchedulerConfig};
use candlewick_server::config::{ServeArgs, Settings};
use candlewick_server::pipelines::PipelineTokenizer;
use candlewick_server::routes;
use candlewick_server::state::{AppState, Served};

use crate::ModelArgs;

/// How often histogram buckets are compacted between scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

pub fn run(args: ServeArgs) -> Result<()> {
    let settings = Settings::load(&args, |name| std::env::var(name).ok())?;
    // Loading is blocking work: it happens before the async runtime exists.
    let mut states = Vec::new();
    for model_settings in settings.served_models() {
        states.push(Arc::new(load_state(&model_settings)?));
    }
    let served = Served::new(states.clone()).map_err(|message| anyhow::anyhow!(message))?;
    let metrics = candlewick_server::metrics::prometheus();
    let router = routes::router(served, &settings.router_options())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((settings.host.as_str(), settings.port))
            .await
            .with_context(|| format!("binding {}:{}", settings.host, settings.port))?;
        tracing::info!("listening on http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
            loop {
                ticks.tick().await;
                metrics.run_upkeep();
            }
        });
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving")
    })?;
    // Every connection is closed: drop what the runtime still holds, then stop the engine.
    runtime.shutdown_timeout(Duration::from_secs(5));
    for state in states {
        match Arc::try_unwrap(state) {
            Ok(state) => state.shutdown(),
            Err(_) => tracing::warn!("requests still hold the engine; stopping without waiting"),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Loads one model as its settings say, with its own scheduler.
fn load_state(settings: &Settings) -> Result<AppState> {
    let model = ModelArgs {
        model: settings.model.clone(),
        device: settings.device.clone(),
        dtype: settings.dtype.clone(),
        quantize: None,
        quantize_lm_head: true,
    };
    let source = model.source()?;
    let device = model.device()?;
    let dtype = model.dtype()?;
    let model_name = settings
        .served_model_name
        .clone()
        .unwrap_or_else(|| source.display_name());
    if serves_encoder(&source)? {
        load_encoder_state(settings, &source, device, dtype, model_name)
    } else {
        load_generator_state(settings, &source, device, dtype, model_name)
    }
}

/// Whether the checkpoint is an encoder (or a sequence classifier), served by the task routes,
/// rather than a causal LM.
fn serves_encoder(source: &ModelSource) -> Result<bool> {
    Ok(matches!(model_kind(source)?, Kind::Encoder(_)))
}

fn load_generator_state(
    settings: &Settings,
    source: &ModelSource,
    device: Device,
    dtype: Option<DType>,
    model_name: String,
) -> Result<AppState> {
    let options = LoadOptions {
        device,
        dtype,
        generator: GeneratorConfig {
            max_sequences: settings.max_running,
            prefix_cache_bytes: settings.prefix_cache_bytes,
            ..GeneratorConfig::default()
        },
        quantize: settings.quantize,
    };
    let loaded = load_generator(source, &options)
        .with_context(|| format!("loading {}", source.display_name()))?;
    let weight_mib = super::weight_bytes(source, &options, false).unwrap_or(0) >> 20;
    let max_context = loaded.generator.max_context();
    let (max_input_tokens, max_total_tokens) = settings.token_limits(max_context)?;
    tracing::info!(
        model = %source.display_name(),
        served_as = %model_name,
        architecture = %loaded.architecture,
        max_context,
        max_input_tokens,
        max_total_tokens,
        max_running = settings.max_running,
        weight_mib,
        state_mib = loaded.generator.state().bytes() >> 20,
        prefix_cache_mib = settings.prefix_cache_bytes >> 20,
        "model loaded"
    );
    let config = SchedulerConfig {
        max_waiting: settings.max_waiting,
        max_batch_tokens: settings.max_batch_tokens,
        max_input_tokens,
        max_total_tokens,
        request_timeout: settings.request_timeout,
    };
    Ok(AppState::start(model_name, loaded, config)?)
}

fn load_encoder_state(
    settings: &Settings,
    source: &ModelSource,
    device: Device,
    dtype: Option<DType>,
    model_name: String,
) -> Result<AppState> {
    let options = LoadOptions {
        device,
        dtype,
        quantize: settings.quantize,
        ..LoadOptions::default()
    };
    let loaded = load_encoder(source, &options)
        .with_context(|| format!("loading {}", source.display_name()))?;
    let weight_mib = super::weight_bytes(source, &options, false).unwrap_or(0) >> 20;
    let max_positions = loaded.model.max_positions();
    let (max_input_tokens, _) = settings.token_limits(max_positions)?;
    let task = loaded.model.task().name();
    tracing::info!(
        model = %source.display_name(),
        served_as = %model_name,
        architecture = %loaded.architecture,
        task,
        max_input_tokens,
        max_batch_tokens = settings.max_batch_tokens,
        weight_mib,
        "model loaded"
    );
    let config = EncoderConfig {
        max_waiting: settings.max_waiting,
        max_batch_tokens: settings.max_batch_tokens,
        max_input_tokens,
        max_request_tokens: settings.max_request_tokens,
    };
    let pipeline_tokenizer = PipelineTokenizer::new(
        &loaded.tokenizer.shared(),
        loaded.tokenizer_config.as_deref(),
    )
    .map_err(|error| {
        anyhow::anyhow!(
            "reading the tokenizer of {}: {error}",
            source.display_name()
        )
    })?;
    Ok(AppState::start_encoder(
        model_name,
        loaded,
        pipeline_tokenizer,
        config,
        settings.pooling,
    )?)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
}
