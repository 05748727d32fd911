//! Scheduler parity with diffusers 0.42.1 (fixtures written by
//! `tools/parity/make_scheduler_fixtures.py`), and the per-job contract the engine relies on.
mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixtures, rel_err};
use diffusion::schedulers::{
    self, NoiseSource, Scheduler, SchedulerConfig, SchedulerKind, SchedulerOptions, SeededNoise,
};
use std::collections::HashMap;

/// max |ours − diffusers| / max |diffusers|, over a whole denoising loop run on our own samples.
const BOUND: f64 = 1e-5;
/// |Δt| allowed for the only fractional timesteps not copied from numpy exactly (Euler, Karras).
const TIMESTEP_TOLERANCE: f64 = 1e-3;

struct Fixtures {
    tensors: HashMap<String, Tensor>,
    manifest: serde_json::Value,
}

impl Fixtures {
    fn load() -> Self {
        let dir = fixtures();
        let tensors =
            candle_core::safetensors::load(dir.join("schedulers.safetensors"), &Device::Cpu)
                .expect("scheduler fixtures (tools/parity/make_scheduler_fixtures.py)");
        let text = std::fs::read_to_string(dir.join("schedulers.json")).unwrap();
        Self {
            tensors,
            manifest: serde_json::from_str(&text).unwrap(),
        }
    }

    fn get(&self, name: &str) -> Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
            .clone()
    }

    fn vec(&self, name: &str) -> Vec<f32> {
        self.get(name).to_vec1().unwrap()
    }
}

/// Replays the noise diffusers was given, in order.
struct Replay {
    noise: Tensor,
    used: usize,
}

impl NoiseSource for Replay {
    fn randn(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> diffusion::Result<Tensor> {
        let z = self.noise.i(self.used)?;
        assert_eq!(z.dims(), shape);
        self.used += 1;
        Ok(z.to_dtype(dtype)?.to_device(device)?)
    }
}

/// The SD 1.5 config with `fields` added, as JSON text: how a config file carrying them reads.
fn config_with(base: &serde_json::Value, fields: &serde_json::Value) -> SchedulerConfig {
    let mut cfg = base.clone();
    for (k, v) in fields.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    SchedulerConfig::from_json(&cfg.to_string()).unwrap()
}

#[derive(Default)]
struct Errors {
    sigmas: f64,
    init_noise_sigma: f64,
    add_noise: f64,
    scaled: f64,
    prev: f64,
    last: f64,
}

fn run_case(fx: &Fixtures, name: &str, case: &serde_json::Value) -> Errors {
    let kind: SchedulerKind = case["kind"].as_str().unwrap().parse().unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    let start = case["start"].as_u64().unwrap() as usize;
    let options = SchedulerOptions {
        eta: case["eta"].as_f64().unwrap(),
    };
    let config = config_with(&fx.manifest["base_config"], &case["fields"]);
    let mut s = schedulers::build(kind, &config, steps, &options).unwrap();
    let mut e = Errors::default();

    // Timesteps: exactly diffusers' (integers, or Euler's float32 values), except Euler's
    // fractional Karras timesteps, which go through numpy's CPU-dependent float32 log.
    let ts: Vec<f64> = fx
        .vec(&format!("{name}.timesteps"))
        .into_iter()
        .map(|t| t as f64)
        .collect();
    if kind == SchedulerKind::Euler && case["fields"]["use_karras_sigmas"] == true {
        assert_eq!(s.timesteps().len(), ts.len());
        for (a, b) in s.timesteps().iter().zip(&ts) {
            assert!((a - b).abs() <= TIMESTEP_TOLERANCE, "{name}: {a} vs {b}");
        }
    } else {
        assert_eq!(s.timesteps(), ts.as_slice(), "{name}: timesteps");
    }
    assert_eq!(s.num_steps(), steps);
    assert_eq!(s.order(), 1);

    match s.sigmas() {
        Some(ours) => {
            let reference = fx.get(&format!("{name}.sigmas"));
            let ours = Tensor::new(ours, &Device::Cpu).unwrap();
            e.sigmas = rel_err(&ours, &reference);
        }
        None => assert!(!fx.tensors.contains_key(&format!("{name}.sigmas"))),
    }
    let reference = fx.vec(&format!("{name}.init_noise_sigma"))[0] as f64;
    e.init_noise_sigma = (s.init_noise_sigma() - reference).abs() / reference;

    let original = fx.get("original");
    let noise = fx.get("add_noise");
    let mid = steps / 2;
    let noisy = s.add_noise(&original, &noise, mid).unwrap();
    e.add_noise = rel_err(&noisy, &fx.get(&format!("{name}.add_noise")));

    let mut sample = if start == 0 {
        (fx.get("sample") * s.init_noise_sigma()).unwrap()
    } else {
        let init = s.add_noise(&original, &noise, start).unwrap();
        e.add_noise = e
            .add_noise
            .max(rel_err(&init, &fx.get(&format!("{name}.init"))));
        init
    };
    let model_outputs = fx.get("model_outputs");
    let scaled_ref = fx.tensors.get(&format!("{name}.scaled"));
    let prev_ref = fx.get(&format!("{name}.prev"));
    let mut replay = Replay {
        noise: fx.get("step_noise"),
        used: 0,
    };
    for i in start..steps {
        let scaled = s.scale_model_input(&sample, i).unwrap();
        match scaled_ref {
            Some(r) => e.scaled = e.scaled.max(rel_err(&scaled, &r.i(i - start).unwrap())),
            None => assert_eq!(rel_err(&scaled, &sample), 0.0, "{name}: scaled input"),
        }
        let m = model_outputs.i(i).unwrap();
        sample = s.step(&m, i, &sample, &mut replay).unwrap();
        let err = rel_err(&sample, &prev_ref.i(i - start).unwrap());
        e.prev = e.prev.max(err);
        e.last = err;
    }
    assert_eq!(
        replay.used,
        case["noise_drawn"].as_u64().unwrap() as usize,
        "{name}: noise draws"
    );
    e
}

#[test]
fn schedulers_match_diffusers_over_whole_loops() {
    let fx = Fixtures::load();
    let cases = fx.manifest["cases"].as_object().unwrap().clone();
    assert!(cases.len() >= 25);
    let mut worst: HashMap<&str, f64> = HashMap::new();
    let mut failures = vec![];
    eprintln!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "case", "sigmas", "init σ", "add_noise", "scaled", "max step", "final"
    );
    for (name, case) in &cases {
        let e = run_case(&fx, name, case);
        eprintln!(
            "{name:<24} {:>9.1e} {:>9.1e} {:>9.1e} {:>9.1e} {:>9.1e} {:>9.1e}",
            e.sigmas, e.init_noise_sigma, e.add_noise, e.scaled, e.prev, e.last
        );
        let max = [e.sigmas, e.init_noise_sigma, e.add_noise, e.scaled, e.prev]
            .into_iter()
            .fold(0.0, f64::max);
        let kind = case["kind"].as_str().unwrap();
        let w = worst.entry(kind).or_default();
        *w = w.max(max);
        if max > BOUND {
            failures.push(format!("{name}: {max:.2e}"));
        }
    }
    let mut kinds: Vec<_> = worst.into_iter().collect();
    kinds.sort_by(|a, b| a.0.cmp(b.0));
    for (kind, err) in kinds {
        eprintln!("worst {kind:<16} {err:.2e}");
    }
    assert!(failures.is_empty(), "over {BOUND:e}: {failures:?}");
}

/// SD 1.5's `scheduler/scheduler_config.json`, verbatim.
const SD15_JSON: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}
"#;

#[test]
fn every_kind_builds_from_the_sd15_pndm_config() {
    let config = SchedulerConfig::from_json(SD15_JSON).unwrap();
    assert_eq!(config, SchedulerConfig::sd15());
    let path = std::env::temp_dir().join(format!("sd15-scheduler-{}.json", std::process::id()));
    std::fs::write(&path, SD15_JSON).unwrap();
    assert_eq!(SchedulerConfig::from_file(&path).unwrap(), config);
    std::fs::remove_file(&path).unwrap();
    for kind in SchedulerKind::ALL {
        let s = schedulers::build(kind, &config, 20, &SchedulerOptions::default()).unwrap();
        assert_eq!(s.kind(), kind);
        assert_eq!(s.timesteps().len(), 20);
        // DDIM keeps PNDM's "leading" (+ steps_offset); the others default to "linspace".
        let first = s.timesteps()[0];
        match kind {
            SchedulerKind::Ddim => assert_eq!(first, 951.0),
            _ => assert_eq!(first, 999.0, "{kind}"),
        }
    }
    let err = SchedulerConfig::from_file(std::path::Path::new("/nonexistent/scheduler.json"))
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/scheduler.json"),
        "{err}"
    );
}

#[test]
fn unsupported_configs_are_refused_by_name() {
    let base: serde_json::Value = serde_json::from_str(SD15_JSON).unwrap();
    let cases = [
        (
            SchedulerKind::Euler,
            r#"{"prediction_type": "sample"}"#,
            "prediction_type",
        ),
        (
            SchedulerKind::Ddim,
            r#"{"timestep_spacing": "karras"}"#,
            "timestep_spacing",
        ),
        (
            SchedulerKind::Ddim,
            r#"{"rescale_betas_zero_snr": true}"#,
            "rescale_betas_zero_snr",
        ),
        (
            SchedulerKind::DpmPP2M,
            r#"{"thresholding": true}"#,
            "thresholding",
        ),
        (
            SchedulerKind::DpmPP2MKarras,
            r#"{"use_lu_lambdas": true}"#,
            "use_lu_lambdas",
        ),
        (
            SchedulerKind::UniPc,
            r#"{"solver_type": "bh1"}"#,
            "solver_type",
        ),
        (
            SchedulerKind::UniPc,
            r#"{"solver_order": 3}"#,
            "solver_order",
        ),
        (
            SchedulerKind::Euler,
            r#"{"final_sigmas_type": "sigma_min"}"#,
            "final_sigmas_type",
        ),
    ];
    for (kind, fields, what) in cases {
        let config = config_with(&base, &serde_json::from_str(fields).unwrap());
        let err = schedulers::build(kind, &config, 10, &SchedulerOptions::default())
            .err()
            .unwrap_or_else(|| panic!("{kind} {fields} was accepted"));
        assert!(err.to_string().contains(what), "{err}");
    }
    let config = SchedulerConfig::sd15();
    assert!(schedulers::build(SchedulerKind::Euler, &config, 0, &Default::default()).is_err());
    let eta = SchedulerOptions { eta: -1.0 };
    assert!(schedulers::build(SchedulerKind::Ddim, &config, 10, &eta).is_err());
}

fn latents(seed: u64, n: usize) -> Tensor {
    SeededNoise::new(seed)
        .randn(&[n, 4, 3, 5], DType::F32, &Device::Cpu)
        .unwrap()
}

/// A fake model: a fixed function of the input and the step, so that runs can be compared.
fn fake_model(x: &Tensor, step: usize) -> Tensor {
    ((x * 0.3).unwrap().sin().unwrap() + (step as f64 * 0.01)).unwrap()
}

struct Job {
    scheduler: Box<dyn Scheduler>,
    noise: SeededNoise,
    sample: Tensor,
    step: usize,
}

impl Job {
    fn new(kind: SchedulerKind, steps: usize, start: usize, seed: u64, n: usize) -> Self {
        let options = SchedulerOptions { eta: 0.7 };
        let scheduler = schedulers::build(kind, &SchedulerConfig::sd15(), steps, &options).unwrap();
        let mut noise = SeededNoise::new(seed);
        let z = noise
            .randn(&[n, 4, 3, 5], DType::F32, &Device::Cpu)
            .unwrap();
        let sample = if start == 0 {
            (z * scheduler.init_noise_sigma()).unwrap()
        } else {
            scheduler
                .add_noise(&latents(seed + 1000, n), &z, start)
                .unwrap()
        };
        Self {
            scheduler,
            noise,
            sample,
            step: start,
        }
    }

    fn done(&self) -> bool {
        self.step == self.scheduler.num_steps()
    }

    fn advance(&mut self) {
        let input = self
            .scheduler
            .scale_model_input(&self.sample, self.step)
            .unwrap();
        let out = fake_model(&input, self.step);
        self.sample = self
            .scheduler
            .step(&out, self.step, &self.sample, &mut self.noise)
            .unwrap();
        self.step += 1;
    }

    fn values(&self) -> Vec<f32> {
        self.sample.flatten_all().unwrap().to_vec1().unwrap()
    }
}

#[test]
fn interleaved_jobs_give_the_same_results_as_each_alone() {
    // Different kinds, step counts, starts and batch sizes, including the stateful multistep
    // solvers and both stochastic schedulers (each job owns its noise stream).
    let specs = [
        (SchedulerKind::DpmPP2M, 12, 0, 1, 1),
        (SchedulerKind::UniPc, 9, 2, 2, 2),
        (SchedulerKind::DpmPP2MKarras, 7, 0, 3, 1),
        (SchedulerKind::EulerAncestral, 10, 0, 4, 3),
        (SchedulerKind::Ddim, 8, 3, 5, 1),
        (SchedulerKind::UniPc, 15, 0, 6, 1),
        (SchedulerKind::Euler, 5, 0, 7, 2),
    ];
    let alone: Vec<Vec<f32>> = specs
        .iter()
        .map(|&(kind, steps, start, seed, n)| {
            let mut job = Job::new(kind, steps, start, seed, n);
            while !job.done() {
                job.advance();
            }
            job.values()
        })
        .collect();
    let mut jobs: Vec<Job> = specs
        .iter()
        .map(|&(kind, steps, start, seed, n)| Job::new(kind, steps, start, seed, n))
        .collect();
    // Round-robin in a shifting order, as a step-level batcher would.
    let mut round = 0;
    while jobs.iter().any(|j| !j.done()) {
        let k = jobs.len();
        for i in 0..k {
            let job = &mut jobs[(i + round) % k];
            if !job.done() {
                job.advance();
            }
        }
        round += 1;
    }
    for (i, job) in jobs.iter().enumerate() {
        assert_eq!(job.values(), alone[i], "job {i} ({})", specs[i].0);
        assert!(job.values().iter().all(|v| v.is_finite()));
    }
}

#[test]
fn multistep_schedulers_refuse_steps_out_of_order() {
    let config = SchedulerConfig::sd15();
    for kind in [SchedulerKind::DpmPP2M, SchedulerKind::UniPc] {
        let mut s = schedulers::build(kind, &config, 10, &Default::default()).unwrap();
        let mut noise = SeededNoise::new(0);
        let x = latents(1, 1);
        let x = s.step(&fake_model(&x, 2), 2, &x, &mut noise).unwrap();
        let err = s.step(&fake_model(&x, 4), 4, &x, &mut noise).unwrap_err();
        assert!(err.to_string().contains("in order"), "{err}");
        let err = s.step(&x, 10, &x, &mut noise).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }
}

#[test]
fn half_precision_samples_stay_half() {
    let config = SchedulerConfig::sd15();
    for kind in SchedulerKind::ALL {
        let mut s = schedulers::build(kind, &config, 4, &Default::default()).unwrap();
        let mut noise = SeededNoise::new(3);
        let x32 = (latents(2, 1) * s.init_noise_sigma()).unwrap();
        let x = x32.to_dtype(DType::F16).unwrap();
        let input = s.scale_model_input(&x, 0).unwrap();
        assert_eq!(input.dtype(), DType::F16);
        let out = s
            .step(
                &fake_model(&input.to_dtype(DType::F32).unwrap(), 0),
                0,
                &x,
                &mut noise,
            )
            .unwrap();
        assert_eq!(out.dtype(), DType::F16, "{kind}");
        let noisy = s.add_noise(&x, &x, 1).unwrap();
        assert_eq!(noisy.dtype(), DType::F16);
    }
}
