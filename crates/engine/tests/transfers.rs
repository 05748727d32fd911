//! The engine's batches make no per-step host↔device copies either: several jobs denoised
//! together copy as much at 3 steps as at 6 (diffusion::transfer counts every copy; its own
//! tests cover single runs and the source scan). Alone in its test binary, since the counters
//! are process-wide.
use candle_core::{DType, Device};
use diffusion::pipeline::{Request, StableDiffusion};
use diffusion::schedulers::SchedulerKind;
use diffusion::transfer;
use engine::{AdapterRegistry, AdapterSettings, Engine, EngineConfig, Event, Job};
use std::sync::Arc;

fn engine() -> Engine {
    let registry = AdapterRegistry::new(AdapterSettings {
        roots: vec![],
        budget_bytes: None,
        dtype: DType::F32,
        device: Device::Cpu,
    })
    .unwrap();
    let model = StableDiffusion::embedded(DType::F32, &Device::Cpu).unwrap();
    Engine::start(
        vec![("tiny".into(), model)],
        Arc::new(registry),
        EngineConfig {
            max_batch: 8,
            // The three jobs must share every step (jobs that finish together are decoded, and
            // downloaded, together): an idle worker waits this long to fill its batch,
            // far longer than submitting three jobs takes.
            max_queue_delay: std::time::Duration::from_millis(500),
            ..EngineConfig::default()
        },
    )
}

/// Three jobs (two schedulers, one of two images) submitted together; waits for all.
async fn run_batch(engine: &Engine, steps: usize) -> transfer::Counts {
    let before = transfer::counts();
    let mut handles = Vec::new();
    for (k, scheduler) in [
        SchedulerKind::UniPc,
        SchedulerKind::Ddim,
        SchedulerKind::UniPc,
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = Request::txt2img(&format!("prompt {k}"), 64, 48);
        req.steps = steps;
        req.seed = k as u64;
        req.scheduler = scheduler;
        req.num_images = 1 + k % 2;
        handles.push(engine.submit(Job::new(req)).unwrap());
    }
    for mut handle in handles {
        loop {
            match handle.events.recv().await {
                Some(Event::Done { .. }) => break,
                Some(Event::Failed(e)) => panic!("{e}"),
                Some(_) => {}
                None => panic!("the job ended early"),
            }
        }
    }
    transfer::counts().since(before)
}

#[tokio::test]
async fn batched_jobs_copy_as_much_at_3_steps_as_at_6() {
    let engine = engine();
    // A first batch fills the prompt cache, so that neither measured batch encodes a prompt.
    run_batch(&engine, 2).await;
    let short = run_batch(&engine, 3).await;
    let long = run_batch(&engine, 6).await;
    assert_eq!(short, long, "copies grow with the step count");
    assert!(
        long.device_to_host >= 1,
        "the images are downloaded: {long:?}"
    );
}
