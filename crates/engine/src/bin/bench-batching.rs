//! Benchmark (not a test): 32 concurrent jobs on the embedded tiny model, mixed step counts and
//! ControlNet adapters, run through the engine at several `max_batch` values. Prints images/s
//! and p50/p99 latency (submit → done) per setting, with the ratio to max batch 1.
//!
//! `cargo run --release -p engine --bin bench-batching -- [--jobs 32] [--size 128]
//!  [--batches 1,4,8,16]`
use candle_core::{DType, Device};
use diffusion::control::ControlMode;
use diffusion::images::ResizeMode;
use diffusion::pipeline::{Request, StableDiffusion};
use diffusion::schedulers::SchedulerKind;
use engine::{AdapterRegistry, AdapterSettings, Engine, EngineConfig, Event, Job, NamedControl};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    jobs: usize,
    size: usize,
    batches: Vec<usize>,
}

fn args() -> Args {
    let mut a = Args {
        jobs: 32,
        size: 128,
        batches: vec![1, 4, 8, 16],
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--jobs" => a.jobs = value.parse().expect("--jobs N"),
            "--size" => a.size = value.parse().expect("--size N"),
            "--batches" => {
                a.batches = value
                    .split(',')
                    .map(|b| b.parse().expect("--batches 1,4,8"))
                    .collect()
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

/// Job k: 4 to 12 steps, a scheduler, and no ControlNet, one, or two of three adapters.
fn job(k: usize, size: usize, hint: &image::RgbImage) -> Job {
    let mut req = Request::txt2img(&format!("a test picture number {}", k % 5), size, size);
    req.steps = 4 + (k * 5) % 9;
    req.seed = k as u64;
    req.scheduler = [
        SchedulerKind::UniPc,
        SchedulerKind::Euler,
        SchedulerKind::Ddim,
    ][k % 3];
    let mut job = Job::new(req);
    let names = ["canny", "depth", "pose"];
    for c in 0..(k % 3) {
        job.controls.push(NamedControl {
            adapter: names[(k + c) % 3].into(),
            image: hint.clone(),
            resize: ResizeMode::JustResize,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            mode: ControlMode::Balanced,
            mask_hint: false,
        });
    }
    job
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    diffusion::runtime::keep_freed_memory();
    let args = args();
    let device = Device::Cpu;
    let hint = image::RgbImage::from_fn(args.size as u32, args.size as u32, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 7) as u8, ((x ^ y) * 5) as u8])
    });
    println!(
        "{} jobs, {}x{} px, embedded tiny model, f32, CPU ({} threads)",
        args.jobs,
        args.size,
        args.size,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut rows = Vec::new();
    for &max_batch in &args.batches {
        let registry = Arc::new(
            AdapterRegistry::new(AdapterSettings {
                roots: Vec::new(),
                budget_bytes: None,
                dtype: DType::F32,
                device: device.clone(),
            })
            .unwrap(),
        );
        for (name, seed) in [("canny", 1), ("depth", 2), ("pose", 3)] {
            registry.put(name, &format!("embedded:{seed}")).unwrap();
        }
        let model = StableDiffusion::embedded(DType::F32, &device).unwrap();
        let engine = Engine::start(
            vec![("tiny".into(), model)],
            registry,
            EngineConfig {
                max_queue: args.jobs,
                max_batch,
                max_queue_delay: Duration::ZERO,
                prompt_cache: 256,
            },
        );
        let started = Instant::now();
        let waiters: Vec<_> = (0..args.jobs)
            .map(|k| {
                let submitted = Instant::now();
                let mut handle = engine.submit(job(k, args.size, &hint)).unwrap();
                std::thread::spawn(move || loop {
                    match handle.events.blocking_recv() {
                        Some(Event::Done { images, .. }) => {
                            return (submitted.elapsed().as_secs_f64(), images.len())
                        }
                        Some(Event::Failed(e)) => panic!("job {k}: {e}"),
                        Some(_) => {}
                        None => panic!("job {k}: stream ended"),
                    }
                })
            })
            .collect();
        let mut latencies = Vec::new();
        let mut images = 0;
        for w in waiters {
            let (latency, n) = w.join().unwrap();
            latencies.push(latency);
            images += n;
        }
        let wall = started.elapsed().as_secs_f64();
        latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let status = engine.status();
        rows.push((
            max_batch,
            images as f64 / wall,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            status.steps_run,
        ));
        eprintln!("max batch {max_batch}: {wall:.1} s");
    }
    let base = rows[0];
    println!();
    println!(
        "| max batch | images/s | × batch {} | p50 latency s | p99 latency s | UNet calls |",
        base.0
    );
    println!("|---|---|---|---|---|---|");
    for (b, ips, p50, p99, calls) in &rows {
        println!(
            "| {b} | {ips:.2} | {:.2} | {p50:.2} | {p99:.2} | {calls} |",
            ips / base.1
        );
    }
}
