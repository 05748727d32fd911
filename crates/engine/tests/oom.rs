//! Out of device memory on the CPU: [`Engine::inject_faults`] makes chosen batched calls fail
//! with the error a CUDA allocation failure gives, and the engine must rerun a batch smaller
//! (every job still getting exactly what it gets alone), fail only a job that runs out of
//! memory alone (with `OutOfMemory`), keep serving the others, and lower then grow back the
//! batch it forms.
use candle_core::{DType, Device, Tensor};
use diffusion::control::ControlMode;
use diffusion::images::ResizeMode;
use diffusion::pipeline::{ControlSpec, Request, StableDiffusion};
use diffusion::schedulers::SchedulerKind;
use engine::{
    is_out_of_memory, simulated_out_of_memory, AdapterRegistry, AdapterSettings, Engine,
    EngineConfig, EngineError, Event, FaultHook, Job, JobHandle, NamedControl, Stage, StepInfo,
};
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

fn control(adapter: &str) -> NamedControl {
    NamedControl {
        adapter: adapter.into(),
        image: image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 9])
        }),
        resize: ResizeMode::JustResize,
        scale: 0.9,
        start: 0.0,
        end: 1.0,
        mode: ControlMode::Balanced,
        mask_hint: false,
    }
}

/// An engine whose idle worker waits up to 5 s for `max_batch` images, so jobs submitted
/// together start in one batch.
fn engine(max_batch: usize) -> Engine {
    let registry = AdapterRegistry::new(AdapterSettings {
        roots: vec![],
        budget_bytes: None,
        dtype: DType::F32,
        device: Device::Cpu,
    })
    .unwrap();
    Engine::start(
        vec![("tiny".into(), model())],
        Arc::new(registry),
        EngineConfig {
            max_queue: 16,
            max_batch,
            max_queue_delay: Duration::from_secs(5),
            ..EngineConfig::default()
        },
    )
}

struct Finished {
    images: Vec<image::RgbImage>,
    latents: Tensor,
    steps: usize,
}

async fn finish(mut handle: JobHandle) -> Result<Finished, EngineError> {
    let run = async {
        let mut steps = 0;
        while let Some(event) = handle.events.recv().await {
            match event {
                Event::Step { .. } => steps += 1,
                Event::Done {
                    images, latents, ..
                } => {
                    return Ok(Finished {
                        images,
                        latents,
                        steps,
                    })
                }
                Event::Failed(e) => return Err(e),
                _ => {}
            }
        }
        Err(EngineError::Stopped)
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the job ended")
}

/// The job run alone outside the engine, decoding image by image: its latents and images.
fn alone(sd: &StableDiffusion, req: &Request) -> (Tensor, Vec<image::RgbImage>) {
    let mut job = sd.new_job(req).unwrap();
    while !job.is_done() {
        diffusion::denoise::step_batch(&sd.unet, &mut [&mut job]).unwrap();
    }
    let images = (0..job.n_images())
        .flat_map(|k| sd.decode(&job.latents.narrow(0, k, 1).unwrap()).unwrap())
        .collect();
    (job.latents, images)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn hook(f: impl Fn(&StepInfo) -> bool + Send + Sync + 'static) -> Option<FaultHook> {
    Some(Arc::new(f))
}

/// After the test: nothing left running or queued, and a new job still runs.
async fn assert_healthy(engine: &Engine) {
    let done = finish(
        engine
            .submit(Job::new(request("after", 42, 2, SchedulerKind::Euler)))
            .unwrap(),
    )
    .await
    .expect("a job after the failures runs");
    assert_eq!((done.steps, done.images.len()), (2, 1));
    // The worker publishes its figures after it sent the job's end: wait for them.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !engine.is_idle() {
        assert!(
            std::time::Instant::now() < until,
            "not idle: {:?}",
            engine.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = engine.status();
    assert_eq!((status.queued, status.running_jobs), (0, 0), "{status:?}");
    assert!(!engine.is_closed());
    assert!(status.batch_cap >= 1);
}

#[test]
fn out_of_memory_errors_are_recognised_through_wrappers() {
    let injected = simulated_out_of_memory();
    assert!(is_out_of_memory(&injected), "{injected}");
    // As the worker sees it: wrapped in diffusion's error, with a backtrace or context.
    assert!(is_out_of_memory(&diffusion::Error::from(
        simulated_out_of_memory().bt()
    )));
    assert!(is_out_of_memory(
        &simulated_out_of_memory().context("in the UNet")
    ));
    // The Display text of cudarc's errors (their Debug) on the device.
    for real in [
        "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
        "CublasError(CUBLAS_STATUS_ALLOC_FAILED)",
        "CudnnError(CUDNN_STATUS_ALLOC_FAILED)",
        "internal error: called `Result::unwrap()` on an `Err` value: \
         DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
    ] {
        assert!(is_out_of_memory(&real), "{real}");
    }
    for other in [
        "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access was encountered\")",
        "CublasError(CUBLAS_STATUS_EXECUTION_FAILED)",
        "shape mismatch in matmul, lhs: [2, 3], rhs: [4, 5]",
    ] {
        assert!(!is_out_of_memory(&other), "{other}");
    }
    let e = candle_core::Error::Msg("shape mismatch".into());
    assert!(!is_out_of_memory(&e));
}

/// (a) Four jobs start in one batch; every UNet call and decode of more than one job (and
/// every decode of more than one image) runs out of memory. All four finish, bit-identical to
/// their runs alone (each ends up stepped and decoded alone, as the reference is), with no
/// step lost or repeated; the worker now forms batches of one image.
#[tokio::test(flavor = "current_thread")]
async fn an_out_of_memory_batch_is_rerun_smaller_and_every_job_gets_what_it_gets_alone() {
    let engine = engine(5);
    engine.adapters().put("edges", "embedded:3").unwrap();
    engine.inject_faults(hook(|s| match s.stage {
        Stage::Denoise => s.jobs > 1,
        Stage::Decode => s.images > 1,
        Stage::Encode => false,
    }));
    let mut two = request("a river", 2, 4, SchedulerKind::EulerAncestral);
    two.num_images = 2;
    let mut plain = request("a forest", 3, 4, SchedulerKind::Ddim);
    plain.guidance_scale = 1.0;
    let jobs: Vec<(Request, bool)> = vec![
        (request("a tower", 1, 3, SchedulerKind::UniPc), true),
        (two, false),
        (plain, false),
        (request("a lamp", 4, 5, SchedulerKind::DpmPP2M), true),
    ];
    let sd = model();
    let references: Vec<_> = jobs
        .iter()
        .map(|(req, controlled)| {
            let mut req = req.clone();
            if *controlled {
                let c = control("edges");
                req.controls = vec![ControlSpec {
                    net: Arc::new(
                        diffusion::embedded::controlnet(3, DType::F32, &Device::Cpu).unwrap(),
                    ),
                    image: c.image,
                    resize: c.resize,
                    scale: c.scale,
                    start: c.start,
                    end: c.end,
                    mode: c.mode,
                    mask_hint: c.mask_hint,
                }];
            }
            alone(&sd, &req)
        })
        .collect();
    let handles: Vec<JobHandle> = jobs
        .iter()
        .map(|(req, controlled)| {
            let mut job = Job::new(req.clone());
            if *controlled {
                job.controls.push(control("edges"));
            }
            engine.submit(job).unwrap()
        })
        .collect();
    let mut total_steps = 0;
    for (k, (handle, (latents, images))) in handles.into_iter().zip(&references).enumerate() {
        let done = finish(handle)
            .await
            .unwrap_or_else(|e| panic!("job {k}: {e}"));
        let steps = jobs[k].0.steps;
        total_steps += steps;
        assert_eq!(done.steps, steps, "job {k}");
        let d = max_abs_diff(&done.latents, latents);
        assert_eq!(
            d, 0.0,
            "job {k}: latents differ by {d:e} from the job alone"
        );
        assert_eq!(done.images.len(), images.len(), "job {k}");
        for (i, (a, b)) in done.images.iter().zip(images).enumerate() {
            assert!(a == b, "job {k}, image {i} differs from the job alone");
        }
    }
    let status = engine.status();
    // The first step of 5 images (4 jobs) failed, then its chunk of 2 images that held two
    // jobs; the decode of jobs 1 and 2 (they finish together), then that of job 1's 2 images.
    assert_eq!(status.oom_retries, 4, "{status:?}");
    assert_eq!(status.oom_failures, 0, "{status:?}");
    // Injected failures never reached the UNet: each job was stepped exactly once per step.
    assert_eq!(status.steps_run as usize, total_steps, "{status:?}");
    assert_eq!(status.batch_cap, 1, "{status:?}");
    engine.inject_faults(None);
    assert_healthy(&engine).await;
}

/// (b) A job that runs out of memory alone fails with `OutOfMemory`, whatever it was doing
/// (encoding, a step, decoding); the job batched with it and jobs after it succeed. (c) The
/// worker lives on and its figures add up.
#[tokio::test(flavor = "current_thread")]
async fn a_job_out_of_memory_alone_fails_and_the_others_go_on() {
    let engine = engine(2);
    // Seed 666 runs out of memory in every UNet call, 777 when admitted, 888 when decoded.
    engine.inject_faults(hook(|s| match s.stage {
        Stage::Denoise => s.seeds.contains(&666),
        Stage::Encode => s.seeds.contains(&777),
        Stage::Decode => s.seeds.contains(&888),
    }));
    let sd = model();
    let good = request("a cat", 1, 3, SchedulerKind::Euler);
    let (reference, _) = alone(&sd, &good);
    let doomed = engine
        .submit(Job::new(request("a dog", 666, 4, SchedulerKind::Euler)))
        .unwrap();
    let other = engine.submit(Job::new(good.clone())).unwrap();
    match finish(doomed).await {
        Err(EngineError::OutOfMemory(what)) => assert_eq!(what, "denoising"),
        other => panic!("{:?}", other.err()),
    }
    let done = finish(other)
        .await
        .expect("the job batched with it finishes");
    assert_eq!(max_abs_diff(&done.latents, &reference), 0.0);
    let status = engine.status();
    assert_eq!(
        (status.oom_retries, status.oom_failures),
        (1, 1),
        "{status:?}"
    );

    for (seed, stage) in [(777, "encoding"), (888, "decoding")] {
        let err = finish(
            engine
                .submit(Job::new(request("x", seed, 2, SchedulerKind::Euler)))
                .unwrap(),
        )
        .await
        .err();
        match err {
            Some(EngineError::OutOfMemory(what)) => assert!(what.starts_with(stage), "{what}"),
            other => panic!("seed {seed}: {other:?}"),
        }
        let message = EngineError::OutOfMemory(stage.into()).to_string();
        assert!(message.contains("out of device memory"), "{message}");
    }
    assert_eq!(engine.status().oom_failures, 3);
    // A job submitted after them succeeds, bit-identical to its run alone.
    let done = finish(engine.submit(Job::new(good)).unwrap())
        .await
        .unwrap();
    assert_eq!(max_abs_diff(&done.latents, &reference), 0.0);
    assert_healthy(&engine).await;
    assert_eq!(engine.status().oom_failures, 3);
}

/// The lowered cap limits admission too, and grows back by one image after 25 calls at it.
#[tokio::test(flavor = "current_thread")]
async fn the_batch_cap_grows_back_after_calls_at_the_cap() {
    let engine = engine(2);
    assert_eq!(engine.status().batch_cap, 2);
    engine.inject_faults(hook(|s| s.stage == Stage::Denoise && s.jobs > 1));
    let handles: Vec<_> = (0..2)
        .map(|k| {
            engine
                .submit(Job::new(request("p", k, 2, SchedulerKind::Euler)))
                .unwrap()
        })
        .collect();
    for h in handles {
        finish(h).await.unwrap();
    }
    assert_eq!(engine.status().batch_cap, 1);
    engine.inject_faults(None);
    // Two jobs queued together now run one after the other (one image at a time)...
    let before = engine.status().steps_run;
    let handles: Vec<_> = (0..2)
        .map(|k| {
            engine
                .submit(Job::new(request("q", k, 3, SchedulerKind::Euler)))
                .unwrap()
        })
        .collect();
    for h in handles {
        finish(h).await.unwrap();
    }
    assert_eq!(engine.status().steps_run - before, 6);
    // ...and with the 4 calls after the failure, those 6 and 15 of the next job's make 25
    // calls at the cap of one image: it grows back to two.
    finish(
        engine
            .submit(Job::new(request("r", 9, 20, SchedulerKind::Euler)))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(engine.status().batch_cap, 2);
    assert_healthy(&engine).await;
}
