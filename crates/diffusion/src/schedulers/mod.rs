//! Diffusion schedulers (samplers), numerically faithful to diffusers 0.42.1.
//!
//! A batch served by one UNet call holds jobs at different steps, with different schedulers and
//! step counts, so a scheduler here is one job's: it owns that job's state (the previous model
//! outputs of the multistep solvers) and works on that job's latents `[n, 4, h, w]`. The step
//! index is passed in explicitly, so img2img can start at a later index (diffusers'
//! `get_timesteps(strength)` and `set_begin_index`), and noise comes from a source the caller
//! owns, so that seeding is the caller's business (and tests can inject diffusers' noise).
//!
//! Every scheduler is built from a diffusers `scheduler_config.json`, whatever class that file
//! was written for, like diffusers' `Scheduler.from_config(pipe.scheduler.config)`: fields a
//! scheduler knows override its defaults, the others are ignored (see [`SchedulerConfig`]).
//!
//! Arithmetic: tensors are computed in f32 whatever the sample's dtype and returned in the
//! sample's dtype, on the sample's device. (diffusers upcasts to f32 in the Euler family only;
//! its DDIM, DPM-Solver and UniPC steps compute in the sample's dtype. The pipeline keeps its
//! latents in f32, so here every step is f32.) Coefficients are applied as scalars (`affine`),
//! never uploaded: a step makes no host↔device copy ([`crate::transfer`]); the stochastic
//! schedulers' noise comes from the caller's [`NoiseSource`], which the pipeline fills before
//! the loop. The per-step scalar
//! coefficients are computed on the host in f32, in diffusers' order of operations: diffusers
//! computes them as float32 torch scalars, and some of them lose digits to cancellation (DPM's
//! and UniPC's `h = λ_t − λ_s`); computing them in f64 would be more accurate but further from
//! the reference.
mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod noise;
mod schedule;
mod unipc;

pub use config::{PredictionType, SchedulerConfig, TimestepSpacing, SD15_SCHEDULER_CONFIG};
pub use noise::SeededNoise;

use candle_core::{DType, Device, Tensor};
use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// The schedulers the service offers, by the names the CLI and the API use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler` (deterministic with `eta = 0`).
    Ddim,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler`: draws noise at every step.
    EulerAncestral,
    /// `DPMSolverMultistepScheduler`, `algorithm_type = "dpmsolver++"`, `solver_order = 2`.
    DpmPP2M,
    /// The same with `use_karras_sigmas = true`.
    DpmPP2MKarras,
    /// `UniPCMultistepScheduler` (bh2, predicting x0): the diffusers ControlNet pipelines'
    /// usual choice.
    UniPc,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPP2M,
        SchedulerKind::DpmPP2MKarras,
        SchedulerKind::UniPc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPP2M => "dpmpp-2m",
            SchedulerKind::DpmPP2MKarras => "dpmpp-2m-karras",
            SchedulerKind::UniPc => "unipc",
        }
    }

    /// Whether `step` draws from the noise source (with these options).
    pub fn is_stochastic(self, options: &SchedulerOptions) -> bool {
        match self {
            SchedulerKind::EulerAncestral => true,
            SchedulerKind::Ddim => options.eta > 0.0,
            _ => false,
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
                Error::Config(format!(
                    "unknown scheduler {s:?} (expected one of {})",
                    names.join(", ")
                ))
            })
    }
}

/// Per-job options that are not part of the model's scheduler config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerOptions {
    /// DDIM's η: 0 is deterministic DDIM, 1 is DDPM-like. Other schedulers ignore it.
    pub eta: f64,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self { eta: 0.0 }
    }
}

/// Where the stochastic schedulers get their noise from: standard normal samples.
pub trait NoiseSource {
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;

    /// The samples `randn` would give, as f32 on the host (row-major), so that several draws
    /// can be uploaded in one copy. The default reads `randn`'s back (a counted download);
    /// sources that draw on the host override it.
    fn randn_host(&mut self, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.randn(shape, DType::F32, &Device::Cpu)?;
        Ok(crate::transfer::download(&t)?)
    }
}

/// One job's scheduler. `step` indices are positions in [`Scheduler::timesteps`].
pub trait Scheduler: Send {
    fn kind(&self) -> SchedulerKind;

    /// The model timesteps, one per UNet call, in order: what the UNet's per-sample timestep
    /// gets. Integers for DDIM, DPM-Solver and UniPC; Euler's may be fractional (they are
    /// diffusers' float32 values).
    fn timesteps(&self) -> &[f64];

    /// The noise levels (σ) of the sigma-parametrised schedulers, one per step plus the final
    /// one, as diffusers stores them (float32). `None` for DDIM.
    fn sigmas(&self) -> Option<&[f32]>;

    /// What the initial Gaussian latents are multiplied by (txt2img).
    fn init_noise_sigma(&self) -> f64;

    /// The UNet input for `sample` at step index `step`.
    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor>;

    /// One denoising step: the sample for step index `step + 1` from the model's output at
    /// `step`. Multistep schedulers must be stepped at consecutive indices (they keep the
    /// previous outputs); the first call may be at any index (img2img).
    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;

    /// img2img: `original` noised with `noise` to the level of step index `step` (diffusers'
    /// `add_noise` at `timesteps[step]`, with the begin index set to `step`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor>;

    /// UNet calls per step (diffusers' `order`): 1 for every scheduler here.
    fn order(&self) -> usize {
        1
    }

    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }
}

/// A scheduler of `kind` with `num_inference_steps` steps, configured from `config`.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
    options: &SchedulerOptions,
) -> Result<Box<dyn Scheduler>> {
    if num_inference_steps == 0 {
        return Err(Error::Config(
            "num_inference_steps must be at least 1".into(),
        ));
    }
    if !options.eta.is_finite() || options.eta < 0.0 {
        return Err(Error::Config(format!(
            "eta must be a non-negative number, got {}",
            options.eta
        )));
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, num_inference_steps, options.eta)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(config, num_inference_steps)?),
        SchedulerKind::EulerAncestral => {
            Box::new(euler::Euler::ancestral(config, num_inference_steps)?)
        }
        SchedulerKind::DpmPP2M => Box::new(dpm_solver::DpmSolver::new(
            config,
            num_inference_steps,
            false,
        )?),
        SchedulerKind::DpmPP2MKarras => Box::new(dpm_solver::DpmSolver::new(
            config,
            num_inference_steps,
            true,
        )?),
        SchedulerKind::UniPc => Box::new(unipc::UniPc::new(config, num_inference_steps)?),
    })
}

/// The first step index of img2img at `strength` (diffusers' `get_timesteps`): the job runs
/// steps `start..num_inference_steps`, from the image latents noised to step `start`.
pub fn img2img_start_step(num_inference_steps: usize, strength: f64) -> usize {
    // `int(num_inference_steps * strength)`: truncation, as in Python.
    let init =
        ((num_inference_steps as f64 * strength.clamp(0.0, 1.0)) as usize).min(num_inference_steps);
    num_inference_steps - init
}

/// What every scheduler steps through: its kind (for error messages), its timesteps and σs, and
/// how the UNet input and the initial latents are scaled.
pub(crate) struct Steps {
    pub kind: SchedulerKind,
    pub timesteps: Vec<f64>,
    /// One per step plus the final 0; empty for DDIM, which has none.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f64,
    /// The UNet input is `sample / √(σ² + 1)` (the Euler family), not the sample itself.
    pub scale_input: bool,
}

impl Steps {
    fn check(&self, step: usize) -> Result<()> {
        let n = self.timesteps.len();
        if step >= n {
            return Err(Error::Scheduler(format!(
                "{}: step index {step} is out of range ({n} steps)",
                self.kind
            )));
        }
        Ok(())
    }
}

/// One scheduler's own arithmetic, on f32 tensors at step indices already checked. Every
/// `Solver` is a [`Scheduler`]: that checks the step index and computes in f32 around it.
pub(crate) trait Solver: Send {
    fn steps(&self) -> &Steps;

    /// [`Scheduler::step`] for the f32 model output `m` and sample `x`.
    fn step_f32(
        &mut self,
        m: &Tensor,
        step: usize,
        x: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;

    /// [`Scheduler::add_noise`] for f32 tensors.
    fn add_noise_f32(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor>;
}

impl<S: Solver> Scheduler for S {
    fn kind(&self) -> SchedulerKind {
        self.steps().kind
    }

    fn timesteps(&self) -> &[f64] {
        &self.steps().timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        let sigmas = &self.steps().sigmas;
        (!sigmas.is_empty()).then_some(sigmas.as_slice())
    }

    fn init_noise_sigma(&self) -> f64 {
        self.steps().init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        let steps = self.steps();
        steps.check(step)?;
        if !steps.scale_input {
            return Ok(sample.clone());
        }
        let sigma = steps.sigmas[step];
        let scaled = div(&f32_of(sample)?, (sigma * sigma + 1.0).sqrt())?;
        Ok(scaled.to_dtype(sample.dtype())?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        self.steps().check(step)?;
        let prev = self.step_f32(&f32_of(model_output)?, step, &f32_of(sample)?, noise)?;
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        self.steps().check(step)?;
        let noisy = self.add_noise_f32(&f32_of(original)?, &f32_of(noise)?, step)?;
        Ok(noisy.to_dtype(original.dtype())?)
    }
}

/// At most `num_train` inference steps (DDIM words its own error).
fn check_steps(name: &str, n: usize, num_train: usize) -> Result<()> {
    if n > num_train {
        return Err(Error::Config(format!(
            "{name}: {n} steps (num_train_timesteps is {num_train})"
        )));
    }
    Ok(())
}

/// Multistep solvers keep the previous outputs: a step out of sequence would silently use
/// the wrong ones.
fn check_consecutive(kind: SchedulerKind, expected: Option<usize>, step: usize) -> Result<()> {
    match expected {
        Some(e) if e != step => Err(Error::Scheduler(format!(
            "{kind}: step {step} after step {} (multistep schedulers step in order)",
            e - 1
        ))),
        _ => Ok(()),
    }
}

/// The data prediction x0 of the multistep solvers (diffusers' `convert_model_output`) from the
/// model output `m` for the sample `x` at noise level σ, in the variance-preserving form.
fn vp_x0(prediction_type: PredictionType, m: &Tensor, x: &Tensor, sigma: f32) -> Result<Tensor> {
    let (alpha_t, sigma_t) = schedule::alpha_sigma_t(sigma);
    Ok(match prediction_type {
        PredictionType::Epsilon => div(&(x - mul(m, sigma_t)?)?, alpha_t)?,
        PredictionType::VPrediction => (mul(x, alpha_t)? - mul(m, sigma_t)?)?,
    })
}

/// `α_t · original + σ_t · noise` at noise level σ (the multistep solvers' `add_noise`).
fn vp_add_noise(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    let (alpha_t, sigma_t) = schedule::alpha_sigma_t(sigma);
    Ok((mul(original, alpha_t)? + mul(noise, sigma_t)?)?)
}

/// `t * c` (f32 `c`, exact: candle's affine casts the factor back to the tensor's f32).
fn mul(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok(t.affine(c as f64, 0.0)?)
}

/// `t / c`. candle has no tensor-by-scalar division, so this multiplies by the f32 reciprocal:
/// within one rounding of diffusers' division.
fn div(t: &Tensor, c: f32) -> Result<Tensor> {
    mul(t, 1.0 / c)
}

fn f32_of(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.to_string().parse::<SchedulerKind>().unwrap(), kind);
        }
        assert_eq!(
            "dpmpp-2m-karras".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::DpmPP2MKarras
        );
        assert_eq!(SchedulerKind::EulerAncestral.to_string(), "euler-a");
    }

    #[test]
    fn unknown_kind_is_an_error_listing_the_names() {
        for bad in ["pndm", "Euler", "", "dpm++2m"] {
            let err = bad.parse::<SchedulerKind>().unwrap_err().to_string();
            assert!(err.contains("unknown scheduler"), "{err}");
            assert!(err.contains("dpmpp-2m-karras"), "{err}");
        }
    }

    #[test]
    fn img2img_start_matches_diffusers_get_timesteps() {
        assert_eq!(img2img_start_step(10, 1.0), 0);
        assert_eq!(img2img_start_step(10, 0.75), 3); // int(7.5) = 7 steps run
        assert_eq!(img2img_start_step(25, 0.5), 13);
        assert_eq!(img2img_start_step(10, 0.0), 10);
        // 100 * 0.29 = 28.999999999999996 in f64: 28 steps run, as in Python.
        assert_eq!(img2img_start_step(100, 0.29), 72);
    }
}
