//! The engine on the embedded model: batching keeps each job's result, admission and
//! cancellation behave.
use candle_core::{DType, Device};
use diffusion::control::ControlMode;
use diffusion::images::ResizeMode;
use diffusion::pipeline::{ControlSpec, Request, StableDiffusion};
use diffusion::schedulers::SchedulerKind;
use engine::{Engine, EngineConfig, EngineError, Event, JobHandle};
use std::sync::Arc;
use std::time::Duration;

fn model() -> StableDiffusion {
    StableDiffusion::embedded(DType::F32, &Device::Cpu).unwrap()
}

fn request(prompt: &str, seed: u64, steps: usize, scheduler: SchedulerKind) -> Request {
    let mut req = Request::txt2img(prompt, 64, 48);
    req.steps = steps;
    req.seed = seed;
    req.scheduler = scheduler;
    req
}

/// Waits for the job's end: its images, or its error.
async fn finish(mut handle: JobHandle) -> Result<(Vec<image::RgbImage>, usize), EngineError> {
    let mut steps = 0;
    while let Some(event) = handle.events.recv().await {
        match event {
            Event::Step { .. } => steps += 1,
            Event::Done { images, .. } => return Ok((images, steps)),
            Event::Failed(e) => return Err(e),
            _ => {}
        }
    }
    Err(EngineError::Stopped)
}

fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn jobs_in_a_shared_batch_get_the_images_they_get_alone() {
    let net = Arc::new(diffusion::embedded::controlnet(3, DType::F32, &Device::Cpu).unwrap());
    let hint =
        image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 9]));
    let mut with_control = request("a tower", 1, 5, SchedulerKind::UniPc);
    with_control.controls.push(ControlSpec {
        net,
        image: hint,
        resize: ResizeMode::JustResize,
        scale: 0.9,
        start: 0.0,
        end: 0.8,
        mode: ControlMode::Balanced,
        mask_hint: false,
    });
    let requests = vec![
        with_control,
        request("a river", 2, 3, SchedulerKind::EulerAncestral),
        request("a forest at dusk", 3, 4, SchedulerKind::Ddim),
        request("a lamp", 4, 2, SchedulerKind::DpmPP2M),
    ];
    let alone: Vec<image::RgbImage> = {
        let sd = model();
        requests
            .iter()
            .map(|r| sd.generate(r, |_, _| {}).unwrap().images.remove(0))
            .collect()
    };
    let engine = Engine::start(
        model(),
        EngineConfig {
            max_queue: 8,
            max_batch: 4,
        },
    );
    let handles: Vec<JobHandle> = requests
        .iter()
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    for (k, (handle, reference)) in handles.into_iter().zip(&alone).enumerate() {
        let (images, steps) = finish(handle).await.unwrap();
        assert_eq!(steps, requests[k].steps, "job {k}");
        // Batched and alone agree to ~1e-6 in the latents; 8-bit rounding may move a level.
        let d = max_pixel_diff(&images[0], reference);
        assert!(d <= 1, "job {k}: pixels differ by {d}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_is_refused_at_once() {
    let engine = Engine::start(
        model(),
        EngineConfig {
            max_queue: 1,
            max_batch: 1,
        },
    );
    let mut accepted = Vec::new();
    let mut refused = 0;
    for k in 0..4 {
        let start = std::time::Instant::now();
        match engine.submit(request("x", k, 30, SchedulerKind::Euler)) {
            Ok(h) => accepted.push(h),
            Err(EngineError::Overloaded(1)) => {
                refused += 1;
                assert!(
                    start.elapsed() < Duration::from_millis(100),
                    "refusal waited"
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    // One running (or about to), one waiting: the rest are refused.
    assert!(
        accepted.len() <= 2 && refused >= 2,
        "{} accepted",
        accepted.len()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn cancelling_or_dropping_frees_the_slot() {
    let engine = Engine::start(
        model(),
        EngineConfig {
            max_queue: 4,
            max_batch: 1,
        },
    );
    for drop_it in [false, true] {
        let mut long = engine
            .submit(request("long", 1, 1000, SchedulerKind::Euler))
            .unwrap();
        // Wait until it is running.
        loop {
            match long.events.recv().await {
                Some(Event::Step { .. }) => break,
                Some(_) => {}
                None => panic!("the long job ended early"),
            }
        }
        let short = engine
            .submit(request("short", 2, 2, SchedulerKind::Euler))
            .unwrap();
        if drop_it {
            drop(long);
        } else {
            long.cancel();
            // No Done for the cancelled job: its stream ends.
            let rest = tokio::time::timeout(Duration::from_secs(30), async {
                let mut done = false;
                while let Some(e) = long.events.recv().await {
                    done |= matches!(e, Event::Done { .. });
                }
                done
            })
            .await
            .expect("the cancelled job's stream ends");
            assert!(!rest);
        }
        // The single slot was freed: the short job completes.
        let (images, _) = tokio::time::timeout(Duration::from_secs(60), finish(short))
            .await
            .expect("the short job ran")
            .unwrap();
        assert_eq!(images.len(), 1);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_bad_request_fails_alone() {
    let engine = Engine::start(model(), EngineConfig::default());
    let mut bad = request("x", 1, 2, SchedulerKind::Euler);
    bad.width = 30;
    let bad = engine.submit(bad).unwrap();
    let good = engine
        .submit(request("y", 2, 2, SchedulerKind::Euler))
        .unwrap();
    assert!(matches!(finish(bad).await, Err(EngineError::Invalid(_))));
    assert!(finish(good).await.is_ok());
}
