//! Prometheus metrics: the recorder behind the `metrics` facade (the scheduler records through
//! it too), and per-route request counts and durations.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Upper bounds of the decode batch size buckets.
const BATCH_SIZE_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
/// Upper bounds of every `*_seconds` histogram's buckets, 1 ms to 1 min.
const LATENCY_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder, installed on first use. If another recorder was installed
/// first, metrics are not recorded and `/metrics` stays empty (logged once).
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            tracing::warn!(%error, "metrics are not recorded: another recorder is installed");
        }
        describe();
        handle
    })
}

fn builder() -> PrometheusBuilder {
    let with_buckets = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("candlewick_decode_batch_size".into()),
            &BATCH_SIZE_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        });
    // Only empty bucket lists are refused, and ours are constants.
    with_buckets.unwrap_or_else(|_| PrometheusBuilder::new())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "candlewick_queue_depth",
        "Requests waiting for a sequence slot"
    );
    describe_gauge!("candlewick_running_sequences", "Sequences holding a slot");
    describe_histogram!("candlewick_decode_batch_size", "Sequences per decode step");
    describe_histogram!(
        "candlewick_time_to_first_token_seconds",
        Unit::Seconds,
        "From submission to the first generated token"
    );
    describe_histogram!(
        "candlewick_inter_token_latency_seconds",
        Unit::Seconds,
        "Between two tokens of one sequence"
    );
    describe_histogram!(
        "candlewick_decode_step_seconds",
        Unit::Seconds,
        "One decode step"
    );
    describe_histogram!(
        "candlewick_grammar_mask_seconds",
        Unit::Seconds,
        "Structured outputs' token masks of one decode step (overlapping the step)"
    );
    describe_histogram!(
        "candlewick_prefill_step_seconds",
        Unit::Seconds,
        "One prefill step"
    );
    describe_counter!("candlewick_prompt_tokens_total", "Prompt tokens prefilled");
    describe_counter!("candlewick_generated_tokens_total", "Tokens generated");
    describe_counter!(
        "candlewick_requests_total",
        "HTTP requests by route and status"
    );
    describe_histogram!(
        "candlewick_request_duration_seconds",
        Unit::Seconds,
        "Time to the response head by route (a stream's body is not included)"
    );
}

/// Middleware: counts each request by matched route and status, and times it to the response
/// head.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("candlewick_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("candlewick_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
