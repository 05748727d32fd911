//! Prometheus metrics: one process-wide recorder; HTTP requests counted by route and status;
//! engine figures read at scrape time.
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Instant;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let seconds = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ];
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("engine_batch_rows".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
                )
            })
            .expect("valid buckets")
            .install_recorder()
            .expect("one metrics recorder per process")
    })
}

/// Counts every request by route template and status, and times it.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Engine figures as gauges, refreshed when scraped.
pub fn record_engine(status: &engine::Status) {
    metrics::gauge!("engine_queue_depth").set(status.queued as f64);
    metrics::gauge!("engine_running_jobs").set(status.running_jobs as f64);
    metrics::gauge!("engine_running_images").set(status.running_images as f64);
    metrics::gauge!("engine_last_batch_rows").set(status.last_batch_rows as f64);
    metrics::gauge!("engine_unet_calls").set(status.steps_run as f64);
    metrics::gauge!("engine_prompt_cache_hits").set(status.prompt_cache_hits as f64);
    metrics::gauge!("engine_prompt_cache_misses").set(status.prompt_cache_misses as f64);
    metrics::gauge!("device_memory_in_use_bytes", "kind" => "adapters")
        .set(status.adapters.bytes_held as f64);
    metrics::gauge!("device_memory_in_use_bytes", "kind" => "annotators")
        .set(status.annotators.resident_bytes as f64);
    metrics::gauge!("engine_annotations_queued").set(status.annotations_queued as f64);
    metrics::gauge!("engine_annotators_resident").set(status.annotators.resident as f64);
    // Out-of-memory handling (docker/README.md, "What to alert on").
    metrics::gauge!("engine_oom_retries").set(status.oom_retries as f64);
    metrics::gauge!("engine_oom_failures").set(status.oom_failures as f64);
    metrics::gauge!("engine_batch_cap").set(status.batch_cap as f64);
}
