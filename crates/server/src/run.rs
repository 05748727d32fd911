//! Running a prepared job through the engine: deadline, progress, cancellation when the
//! caller goes away (dropping the future drops the job handle, which cancels the job).
use engine::{Event, JobHandle};
use image::RgbImage;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use crate::api::{Prepared, Timings};
use crate::error::ApiError;
use crate::AppState;

/// Progress as a stream consumer sees it.
#[derive(Debug, Clone)]
pub enum Progress {
    Queued { position: usize },
    Started,
    Step { step: usize, total: usize },
}

pub struct Finished {
    pub images: Vec<RgbImage>,
    pub seeds: Vec<u64>,
    pub timings: Timings,
}

/// Submits and waits. `progress` (if any) hears every event; if its receiver closes (an SSE
/// client left), the job is cancelled.
pub async fn run_job(
    state: &AppState,
    mut prepared: Prepared,
    prepare_ms: u64,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<Finished, ApiError> {
    let started = Instant::now();
    let timeout = Duration::from_secs(state.config.server.request_timeout_secs);
    prepared.job.deadline = Some(started + timeout);
    let result = async {
        let handle = state.engine.submit(prepared.job)?;
        wait(handle, started, timeout, progress).await
    }
    .await;
    let outcome = match &result {
        Ok(_) => "ok".to_string(),
        Err(e) => e.outcome().to_string(),
    };
    metrics::counter!("generation_requests_total", "outcome" => outcome).increment(1);
    let mut finished = result?;
    finished.timings.prepare_ms = prepare_ms;
    finished.timings.total_ms = prepare_ms + started.elapsed().as_millis() as u64;
    metrics::histogram!("generation_duration_seconds")
        .record(finished.timings.total_ms as f64 / 1000.0);
    Ok(finished)
}

async fn wait(
    mut handle: JobHandle,
    started: Instant,
    timeout: Duration,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<Finished, ApiError> {
    let deadline = tokio::time::Instant::from_std(started + timeout + Duration::from_secs(1));
    let mut queue_ms = 0;
    loop {
        let event = tokio::select! {
            e = handle.events.recv() => e,
            _ = tokio::time::sleep_until(deadline) => {
                handle.cancel();
                return Err(engine::EngineError::Timeout.into());
            }
            _ = closed(&progress) => {
                handle.cancel();
                return Err(engine::EngineError::Cancelled.into());
            }
        };
        let report = match event {
            None => return Err(engine::EngineError::Stopped.into()),
            Some(Event::Queued { position }) => Progress::Queued { position },
            Some(Event::Started) => {
                queue_ms = started.elapsed().as_millis() as u64;
                Progress::Started
            }
            Some(Event::Step { step, total }) => Progress::Step { step, total },
            Some(Event::Done { images, seeds, .. }) => {
                let total = started.elapsed().as_millis() as u64;
                return Ok(Finished {
                    images,
                    seeds,
                    timings: Timings {
                        prepare_ms: 0,
                        queue_ms,
                        inference_ms: total.saturating_sub(queue_ms),
                        total_ms: total,
                    },
                });
            }
            Some(Event::Failed(e)) => return Err(e.into()),
        };
        if let Some(p) = &progress {
            let _ = p.send(report).await;
        }
    }
}

/// Resolves when the progress receiver is gone; never without one.
async fn closed(progress: &Option<mpsc::Sender<Progress>>) {
    match progress {
        Some(p) => p.closed().await,
        None => std::future::pending().await,
    }
}
