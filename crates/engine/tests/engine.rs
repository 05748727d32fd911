//! The engine on the embedded model: batching keeps each job's result; admission, priorities,
//! deadlines and cancellation behave; adapters load, evict, unload and hot-swap under traffic.
use candle_core::{DType, Device, Tensor};
use diffusion::control::ControlMode;
use diffusion::images::ResizeMode;
use diffusion::pipeline::{ControlSpec, Request, StableDiffusion};
use diffusion::schedulers::SchedulerKind;
use engine::{
    AdapterRegistry, AdapterSettings, Engine, EngineConfig, EngineError, Event, Job, JobHandle,
    NamedControl, Priority,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

fn hint() -> image::RgbImage {
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 9]))
}

fn control(adapter: &str, scale: f64, end: f64) -> NamedControl {
    NamedControl {
        adapter: adapter.into(),
        image: hint(),
        resize: ResizeMode::JustResize,
        scale,
        start: 0.0,
        end,
        mode: ControlMode::Balanced,
        mask_hint: false,
    }
}

/// The same control with the adapter given as a model, for runs without the engine.
fn as_spec(c: &NamedControl, seed: u64) -> ControlSpec {
    ControlSpec {
        net: Arc::new(diffusion::embedded::controlnet(seed, DType::F32, &Device::Cpu).unwrap()),
        image: c.image.clone(),
        resize: c.resize,
        scale: c.scale,
        start: c.start,
        end: c.end,
        mode: c.mode,
        mask_hint: c.mask_hint,
    }
}

fn engine_with(
    config: EngineConfig,
    budget: Option<u64>,
    roots: Vec<std::path::PathBuf>,
) -> Engine {
    let registry = AdapterRegistry::new(AdapterSettings {
        roots,
        budget_bytes: budget,
        dtype: DType::F32,
        device: Device::Cpu,
    })
    .unwrap();
    Engine::start(vec![("tiny".into(), model())], Arc::new(registry), config)
}

fn config(max_queue: usize, max_batch: usize) -> EngineConfig {
    EngineConfig {
        max_queue,
        max_batch,
        ..EngineConfig::default()
    }
}

struct Finished {
    images: Vec<image::RgbImage>,
    latents: Tensor,
    steps: usize,
}

/// Waits for the job's end: its images, or its error.
async fn finish(mut handle: JobHandle) -> Result<Finished, EngineError> {
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
}

async fn until_step(handle: &mut JobHandle) {
    loop {
        match handle.events.recv().await {
            Some(Event::Step { .. }) => return,
            Some(Event::Failed(e)) => panic!("{e}"),
            Some(_) => {}
            None => panic!("the job ended early"),
        }
    }
}

/// The job run alone, outside the engine: its final latents and images.
fn alone(sd: &StableDiffusion, req: &Request) -> (Tensor, Vec<image::RgbImage>) {
    let mut job = sd.new_job(req).unwrap();
    while !job.is_done() {
        diffusion::denoise::step_batch(&sd.unet, &mut [&mut job]).unwrap();
    }
    let images = sd.decode(&job.latents).unwrap();
    (job.latents, images)
}

fn identical(a: &Tensor, b: &Tensor) -> bool {
    let bits = |t: &Tensor| -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    };
    a.dims() == b.dims() && bits(a) == bits(b)
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

/// The image as diffusers returns it in f32 (`output_type="np"`): VAE output mapped to 0..1.
fn image_f32(sd: &StableDiffusion, latents: &Tensor) -> Tensor {
    let pixels = sd.vae.decode_latents(latents).unwrap();
    ((pixels / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
}

/// max |a − b| / max |b|: latents of random tiny models run up to ~50, so absolute
/// differences there say little.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let scale: f32 = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    max_abs_diff(a, b) / scale
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
async fn jobs_in_a_shared_batch_get_what_they_get_alone() {
    let engine = engine_with(config(16, 16), None, vec![]);
    engine.adapters().put("edges", "embedded:3").unwrap();
    engine.adapters().put("depth", "embedded:5").unwrap();
    // Different prompts, seeds, step counts, schedulers, guidance (one without CFG, one of
    // two images), ControlNets and windows: they join while others run and leave at their
    // own step.
    let mut jobs: Vec<(Request, Vec<(NamedControl, u64)>)> = Vec::new();
    jobs.push((
        request("a tower", 1, 6, SchedulerKind::UniPc),
        vec![(control("edges", 0.9, 0.8), 3)],
    ));
    let mut two = request("a river", 2, 3, SchedulerKind::EulerAncestral);
    two.num_images = 2;
    jobs.push((
        two,
        vec![
            (control("depth", 1.2, 1.0), 5),
            (control("edges", 0.5, 0.5), 3),
        ],
    ));
    let mut plain = request("a forest at dusk", 3, 4, SchedulerKind::Ddim);
    plain.guidance_scale = 1.0;
    jobs.push((plain, vec![]));
    jobs.push((
        request("a lamp", 4, 2, SchedulerKind::DpmPP2M),
        vec![(control("edges", 1.0, 1.0), 3)],
    ));
    jobs.push((request("a tower", 5, 5, SchedulerKind::Euler), vec![]));

    let sd = model();
    let references: Vec<(Tensor, Vec<image::RgbImage>)> = jobs
        .iter()
        .map(|(req, controls)| {
            let mut req = req.clone();
            req.controls = controls.iter().map(|(c, seed)| as_spec(c, *seed)).collect();
            alone(&sd, &req)
        })
        .collect();

    // Two jobs start; the rest join after the first step.
    let mut handles = Vec::new();
    for (k, (req, controls)) in jobs.iter().enumerate() {
        let mut job = Job::new(req.clone());
        job.controls = controls.iter().map(|(c, _)| c.clone()).collect();
        handles.push(engine.submit(job).unwrap());
        if k == 1 {
            until_step(&mut handles[0]).await;
        }
    }
    let mut total_steps = 0;
    for (k, (handle, (latents, images))) in handles.into_iter().zip(&references).enumerate() {
        let done = finish(handle).await.unwrap();
        let steps = jobs[k].0.steps;
        total_steps += steps;
        // Job 0's first Step event was taken by until_step.
        assert_eq!(done.steps + usize::from(k == 0), steps, "job {k}");
        let d = max_abs_diff(&image_f32(&sd, &done.latents), &image_f32(&sd, latents));
        eprintln!(
            "job {k}: f32 image differs by {d:e}, latents by {:e} relative",
            rel_err(&done.latents, latents)
        );
        // To the bit, denoised and decoded in batches here, alone there (the README's "Seeds").
        assert!(d == 0.0, "job {k}: f32 image differs by {d}");
        assert!(identical(&done.latents, latents), "job {k}: latents differ");
        assert_eq!(done.images.len(), images.len());
        for (a, b) in done.images.iter().zip(images) {
            assert!(
                a == b,
                "job {k}: pixels differ by up to {}",
                max_pixel_diff(a, b)
            );
        }
    }
    // They did share UNet calls.
    let run = engine.status().steps_run as usize;
    assert!(
        run < total_steps,
        "{run} UNet calls for {total_steps} job steps"
    );
    assert_eq!(engine.status().prompt_cache_hits, 1, "\"a tower\" twice");
}

#[test]
fn decoding_a_batch_equals_decoding_each() {
    let sd = model();
    let a = Tensor::randn(0f32, 1.0, (1, 4, 6, 8), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (2, 4, 6, 8), &Device::Cpu).unwrap();
    let both = sd
        .vae
        .decode_latents(&Tensor::cat(&[&a, &b], 0).unwrap())
        .unwrap();
    let each = Tensor::cat(
        &[
            sd.vae.decode_latents(&a).unwrap(),
            sd.vae.decode_latents(&b).unwrap(),
        ],
        0,
    )
    .unwrap();
    // To the bit: the decoder computes each image on its own.
    let d = max_abs_diff(&both, &each);
    assert!(d == 0.0 && identical(&both, &each), "{d}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_is_refused_at_once() {
    let engine = Engine::single(model(), config(1, 1));
    let mut accepted = Vec::new();
    let mut refused = 0;
    for k in 0..4 {
        let start = Instant::now();
        match engine.submit(Job::new(request("x", k, 30, SchedulerKind::Euler))) {
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
async fn cancelling_frees_the_slot_within_one_step() {
    let engine = Engine::single(model(), config(4, 1));
    for drop_it in [false, true] {
        let mut long = engine
            .submit(Job::new(request("long", 1, 1000, SchedulerKind::Euler)))
            .unwrap();
        until_step(&mut long).await;
        let short = engine
            .submit(Job::new(request("short", 2, 2, SchedulerKind::Euler)))
            .unwrap();
        let before = engine.status().steps_run;
        let long = if drop_it {
            drop(long);
            None
        } else {
            long.cancel();
            Some(long)
        };
        // Read after the cancel: the worker saw it before its next step, or finished the one
        // it was in.
        let at_cancel = engine.status().steps_run;
        let done = tokio::time::timeout(Duration::from_secs(60), finish(short))
            .await
            .expect("the short job ran")
            .unwrap();
        assert_eq!(done.steps, 2);
        let after = engine.status().steps_run;
        // The long job ran at most one more step, then the short job's two.
        assert!(after <= at_cancel + 3, "{before} {at_cancel} {after}");
        if let Some(long) = long {
            let rest = tokio::time::timeout(Duration::from_secs(30), finish(long))
                .await
                .expect("the cancelled job's stream ends");
            assert!(
                matches!(rest, Err(EngineError::Cancelled)),
                "{:?}",
                rest.err()
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_bad_request_fails_alone() {
    let engine = Engine::single(model(), EngineConfig::default());
    let mut bad = request("x", 1, 2, SchedulerKind::Euler);
    bad.width = 30;
    let bad = engine.submit(Job::new(bad)).unwrap();
    let good = engine
        .submit(Job::new(request("y", 2, 2, SchedulerKind::Euler)))
        .unwrap();
    assert!(matches!(finish(bad).await, Err(EngineError::Invalid(_))));
    assert!(finish(good).await.is_ok());
    // Unknown names are refused at submit.
    let mut job = Job::new(request("z", 3, 2, SchedulerKind::Euler));
    job.controls.push(control("nope", 1.0, 1.0));
    assert!(matches!(engine.submit(job), Err(EngineError::UnknownAdapter(n)) if n == "nope"));
    let mut job = Job::new(request("z", 3, 2, SchedulerKind::Euler));
    job.model = Some("sdxl".into());
    assert!(matches!(
        engine.submit(job),
        Err(EngineError::UnknownModel(_))
    ));
}

#[tokio::test(flavor = "current_thread")]
async fn high_priority_jobs_start_first() {
    let engine = Engine::single(model(), config(8, 1));
    let mut first = engine
        .submit(Job::new(request("first", 1, 3, SchedulerKind::Euler)))
        .unwrap();
    until_step(&mut first).await;
    let normal = engine
        .submit(Job::new(request("normal", 2, 2, SchedulerKind::Euler)))
        .unwrap();
    let mut urgent = Job::new(request("urgent", 3, 2, SchedulerKind::Euler));
    urgent.priority = Priority::High;
    let mut urgent = engine.submit(urgent).unwrap();
    // One batch slot: when the normal job is done, the urgent one (queued after it) has
    // already run.
    finish(normal).await.unwrap();
    let mut urgent_done = false;
    while let Ok(e) = urgent.events.try_recv() {
        urgent_done |= matches!(e, Event::Done { .. });
    }
    assert!(urgent_done);
}

#[tokio::test(flavor = "current_thread")]
async fn deadlines_end_jobs_running_or_waiting() {
    let engine = Engine::single(model(), config(8, 1));
    let mut running = Job::new(request("slow", 1, 1000, SchedulerKind::Euler));
    running.deadline = Some(Instant::now() + Duration::from_millis(300));
    let running = engine.submit(running).unwrap();
    let mut waiting = Job::new(request("late", 2, 2, SchedulerKind::Euler));
    waiting.deadline = Some(Instant::now() + Duration::from_millis(100));
    let mut waiting = engine.submit(waiting).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), finish(running))
        .await
        .unwrap();
    assert!(matches!(r, Err(EngineError::Timeout)), "{:?}", r.err());
    let mut started = false;
    let mut timed_out = false;
    while let Some(e) = waiting.events.recv().await {
        started |= matches!(e, Event::Started);
        timed_out |= matches!(e, Event::Failed(EngineError::Timeout));
    }
    assert!(timed_out && !started);
}

#[tokio::test(flavor = "current_thread")]
async fn an_idle_worker_holds_a_partial_batch_for_max_queue_delay() {
    for (delay, batched) in [(Duration::from_millis(1500), true), (Duration::ZERO, false)] {
        let engine = Engine::single(
            model(),
            EngineConfig {
                max_queue_delay: delay,
                ..config(8, 4)
            },
        );
        let mut handles = Vec::new();
        for k in 0..3 {
            handles.push(
                engine
                    .submit(Job::new(request("p", k, 6, SchedulerKind::Euler)))
                    .unwrap(),
            );
            std::thread::sleep(Duration::from_millis(150));
        }
        for h in handles {
            finish(h).await.unwrap();
        }
        let run = engine.status().steps_run;
        if batched {
            assert_eq!(run, 6, "all three started together");
        } else {
            assert!(
                run > 6,
                "without a delay the first job starts alone ({run})"
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn unloading_an_adapter_in_use_loses_no_job() {
    let engine = engine_with(config(8, 8), None, vec![]);
    engine.adapters().put("edges", "embedded:3").unwrap();
    let sd = model();
    let mut handles = Vec::new();
    let mut references = Vec::new();
    for (k, steps) in [5, 3, 4].into_iter().enumerate() {
        let req = request("a bridge", k as u64, steps, SchedulerKind::Ddim);
        let c = control("edges", 1.0, 1.0);
        let mut reference = req.clone();
        reference.controls = vec![as_spec(&c, 3)];
        references.push(image_f32(&sd, &alone(&sd, &reference).0));
        let mut job = Job::new(req);
        job.controls.push(c);
        handles.push(engine.submit(job).unwrap());
    }
    until_step(&mut handles[0]).await;
    engine.adapters().remove("edges").unwrap();
    assert!(engine.adapters().get("edges").is_none());
    // New jobs cannot name it; the admitted ones all finish, with its weights.
    let mut late = Job::new(request("late", 9, 2, SchedulerKind::Ddim));
    late.controls.push(control("edges", 1.0, 1.0));
    assert!(matches!(
        engine.submit(late),
        Err(EngineError::UnknownAdapter(_))
    ));
    for (k, (h, reference)) in handles.into_iter().zip(&references).enumerate() {
        let done = finish(h).await.unwrap();
        let d = max_abs_diff(&image_f32(&sd, &done.latents), reference);
        assert!(d <= 1e-5, "job {k}: {d:e}");
    }
    // Its weights were counted until the last job let go, then freed.
    assert_eq!(engine.adapters().counters().bytes_held, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn hot_replacing_an_adapter_splits_jobs_before_and_after() {
    let engine = engine_with(config(8, 8), None, vec![]);
    let old = engine.adapters().put("edges", "embedded:3").unwrap();
    let sd = model();
    let req = request("a harbour", 7, 4, SchedulerKind::UniPc);
    let c = control("edges", 1.0, 1.0);
    let with = |seed| {
        let mut r = req.clone();
        r.controls = vec![as_spec(&c, seed)];
        image_f32(&sd, &alone(&sd, &r).0)
    };
    let (old_ref, new_ref) = (with(3), with(4));
    assert!(
        max_abs_diff(&old_ref, &new_ref) > 1e-3,
        "the two adapters differ"
    );

    let submit = || {
        let mut job = Job::new(req.clone());
        job.controls.push(c.clone());
        engine.submit(job).unwrap()
    };
    let mut before = submit();
    until_step(&mut before).await;
    let new = engine.adapters().put("edges", "embedded:4").unwrap();
    assert!(new.generation > old.generation);
    let after = submit();
    let (before, after) = (finish(before).await.unwrap(), finish(after).await.unwrap());
    let before = max_abs_diff(&image_f32(&sd, &before.latents), &old_ref);
    let after = max_abs_diff(&image_f32(&sd, &after.latents), &new_ref);
    assert!(before <= 1e-5, "admitted before: old weights ({before:e})");
    assert!(after <= 1e-5, "admitted after: new weights ({after:e})");
}

#[tokio::test(flavor = "current_thread")]
async fn the_memory_budget_evicts_idle_adapters_least_recently_used() {
    let one = diffusion::embedded::controlnet(1, DType::F32, &Device::Cpu)
        .unwrap()
        .size_in_bytes() as u64;
    assert!(one > 0);
    // Room for two adapters.
    let engine = engine_with(config(8, 8), Some(2 * one + one / 2), vec![]);
    let reg = engine.adapters().clone();
    reg.put("a", "embedded:1").unwrap();
    reg.put("b", "embedded:2").unwrap();
    // "a" is in use by a long job (so more recently used than "b" too).
    let mut job = Job::new(request("busy", 1, 1000, SchedulerKind::Euler));
    job.controls.push(control("a", 1.0, 1.0));
    let mut busy = engine.submit(job).unwrap();
    until_step(&mut busy).await;
    reg.put("c", "embedded:3").unwrap();
    let resident = |n: &str| reg.get(n).unwrap().resident;
    assert!(
        resident("a") && !resident("b") && resident("c"),
        "{:?}",
        reg.list()
    );
    assert_eq!(reg.counters().evictions, 1);
    // "a" stays while in use, even when it is the least recently used.
    reg.try_acquire("c").unwrap();
    reg.put("d", "embedded:4").unwrap();
    assert!(
        resident("a") && !resident("c") && resident("d"),
        "{:?}",
        reg.list()
    );
    // Nothing idle to evict but "d": a third adapter in use would not fit.
    let mut held = Job::new(request("busy too", 2, 1000, SchedulerKind::Euler));
    held.controls.push(control("d", 1.0, 1.0));
    let held = engine.submit(held).unwrap();
    assert!(matches!(
        reg.put("e", "embedded:5"),
        Err(EngineError::MemoryBudget(_))
    ));
    drop(held);
    drop(busy);
    // An evicted adapter is loaded again when a job names it (on the loader thread).
    let mut job = Job::new(request("again", 3, 2, SchedulerKind::Euler));
    job.controls.push(control("b", 1.0, 1.0));
    let h = engine.submit(job).unwrap();
    tokio::time::timeout(Duration::from_secs(60), finish(h))
        .await
        .unwrap()
        .unwrap();
    assert!(resident("b"));
    assert!(reg.counters().bytes_held <= 2 * one + one / 2);
}

#[test]
fn adapters_come_only_from_the_roots() {
    let base = std::env::temp_dir().join(format!("cn-roots-{}", std::process::id()));
    let root = base.join("root");
    let outside = base.join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    // A diffusers-layout ControlNet (folder with its config) from the parity fixtures.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../diffusion/tests/fixtures/controlnet_sd15");
    for dir in [
        root.join("canny.safetensors"),
        outside.join("secret.safetensors"),
    ] {
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
        }
    }
    std::os::unix::fs::symlink(
        outside.join("secret.safetensors"),
        root.join("link.safetensors"),
    )
    .unwrap();
    let reg = AdapterRegistry::new(AdapterSettings {
        roots: vec![root.clone()],
        budget_bytes: None,
        dtype: DType::F32,
        device: Device::Cpu,
    })
    .unwrap();
    let info = reg.put("canny", "canny.safetensors").unwrap();
    assert!(info.resident && info.bytes.unwrap() > 0);
    let abs = root.join("canny.safetensors");
    assert!(reg.put("canny2", abs.to_str().unwrap()).is_ok());
    for bad in [
        "../outside/secret.safetensors".to_string(),
        outside.join("secret.safetensors").display().to_string(),
        "link.safetensors".to_string(),
    ] {
        assert!(
            matches!(reg.put("x", &bad), Err(EngineError::Forbidden(_))),
            "{bad} was let through"
        );
    }
    assert!(matches!(
        reg.put("x", "missing.safetensors"),
        Err(EngineError::NotFound(_))
    ));
    assert!(matches!(
        reg.put("../x", "canny.safetensors"),
        Err(EngineError::Invalid(_))
    ));
    // Not a ControlNet: a load error naming the adapter, and the registry unchanged.
    std::fs::write(root.join("junk.safetensors"), b"not weights").unwrap();
    match reg.put("junk", "junk.safetensors") {
        Err(EngineError::AdapterLoad(m)) => assert!(m.contains("junk"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(reg.list().len(), 2);
    std::fs::remove_dir_all(&base).unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn each_base_model_keeps_its_own_jobs() {
    // Two resident base models: the embedded one, and one whose UNet weights differ (another
    // seed): a job names its model and gets that model's result, and the two never share a
    // UNet call.
    let other = {
        let mut sd = model();
        sd.unet = diffusion::unet::UNet2DConditionModel::new(
            diffusion::embedded::SeededWeights::new(99, false)
                .var_builder(DType::F32, &Device::Cpu),
            &diffusion::embedded::unet_config(),
        )
        .unwrap();
        sd
    };
    let req = request("a garden", 3, 3, SchedulerKind::Ddim);
    let (first_ref, other_ref) = (alone(&model(), &req).0, alone(&other, &req).0);
    assert!(
        max_abs_diff(&first_ref, &other_ref) > 1e-3,
        "the models differ"
    );
    let registry = AdapterRegistry::new(AdapterSettings {
        roots: vec![],
        budget_bytes: None,
        dtype: DType::F32,
        device: Device::Cpu,
    })
    .unwrap();
    let engine = Engine::start(
        vec![("first".into(), model()), ("other".into(), other)],
        Arc::new(registry),
        config(8, 8),
    );
    assert_eq!(engine.models().len(), 2);
    let submit = |name: Option<&str>| {
        let mut job = Job::new(req.clone());
        job.model = name.map(String::from);
        engine.submit(job).unwrap()
    };
    let (a, b, c) = (submit(None), submit(Some("other")), submit(Some("first")));
    let (a, b, c) = (
        finish(a).await.unwrap(),
        finish(b).await.unwrap(),
        finish(c).await.unwrap(),
    );
    let sd = model();
    for (name, got, want) in [
        ("default", &a, &first_ref),
        ("other", &b, &other_ref),
        ("first", &c, &first_ref),
    ] {
        let d = max_abs_diff(&image_f32(&sd, &got.latents), &image_f32(&sd, want));
        assert!(d <= 1e-5, "{name}: {d:e}");
    }
    // Three jobs of 3 steps on two models: at least two UNet calls per step.
    assert!(engine.status().steps_run >= 6);
}
