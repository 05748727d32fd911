//! `EulerDiscreteScheduler` and the σ schedule it shares with Euler ancestral: Karras et al.'s
//! Algorithm 2 (arXiv 2206.00364) without churn, in σ space.
use candle_core::Tensor;

use super::config::{Common, Field, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{check_step, div, f32_of, mul, schedule, NoiseSource, Scheduler, SchedulerKind};
use crate::{Error, Result};

/// Timesteps and σs of the Euler-family schedulers.
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One per step plus the final 0.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
    pub prediction_type: PredictionType,
}

impl SigmaSchedule {
    /// `karras`: diffusers' `use_karras_sigmas` (Euler only; Euler ancestral has no such field).
    pub(crate) fn new(
        common: &Common,
        n: usize,
        karras: Option<(Option<f64>, Option<f64>)>,
    ) -> Self {
        let num_train = common.num_train_timesteps;
        let table = schedule::sigma_table(&common.alphas_cumprod);
        // diffusers keeps these float32 (its numpy timesteps are float32 arrays).
        let timesteps = schedule::single_step_timesteps(
            common.spacing,
            num_train,
            n,
            common.steps_offset,
            true,
        );
        let interpolated: Vec<f64> = timesteps
            .iter()
            .map(|&t| schedule::interp(t, &table))
            .collect();
        let (timesteps, sigmas) = match karras {
            None => (timesteps, interpolated),
            Some((sigma_min, sigma_max)) => {
                // Karras σs between the interpolated schedule's ends, mapped back to
                // fractional timesteps (float32, unrounded: Euler's UNet timesteps are floats).
                let sigma_min = sigma_min.unwrap_or(interpolated[n - 1]);
                let sigma_max = sigma_max.unwrap_or(interpolated[0]);
                let sigmas = schedule::karras_sigmas(sigma_min, sigma_max, n);
                let log_sigmas = schedule::log_table(&table);
                let timesteps = sigmas
                    .iter()
                    .map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32 as f64)
                    .collect();
                (timesteps, sigmas)
            }
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(f32::MIN, f32::max);
        // Scaled so that the UNet input `x / √(σ² + 1)` has unit variance; "leading" schedules
        // start below σ_max, where diffusers uses √(σ_max² + 1) instead of σ_max.
        let init_noise_sigma = match common.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: common.prediction_type,
        }
    }

    /// `sample / √(σ² + 1)`.
    pub(crate) fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        let sigma = self.sigmas[step];
        let scaled = div(&f32_of(sample)?, (sigma * sigma + 1.0).sqrt())?;
        Ok(scaled.to_dtype(sample.dtype())?)
    }

    /// The denoised estimate x0 from the model output at σ (`x`, `m` in f32).
    pub(crate) fn pred_x0(&self, x: &Tensor, m: &Tensor, sigma: f32) -> Result<Tensor> {
        Ok(match self.prediction_type {
            PredictionType::Epsilon => (x - mul(m, sigma)?)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (mul(m, -sigma / s2.sqrt())? + div(x, s2)?)?
            }
        })
    }

    /// `original + noise · σ`.
    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step: usize,
    ) -> Result<Tensor> {
        let noisy = (f32_of(original)? + mul(&f32_of(noise)?, self.sigmas[step])?)?;
        Ok(noisy.to_dtype(original.dtype())?)
    }
}

pub(crate) fn check_steps(name: &str, n: usize, num_train: usize) -> Result<()> {
    if n > num_train {
        return Err(Error::Config(format!(
            "{name}: {n} steps (num_train_timesteps is {num_train})"
        )));
    }
    Ok(())
}

pub(crate) struct Euler {
    schedule: SigmaSchedule,
}

impl Euler {
    pub(crate) fn new(config: &SchedulerConfig, n: usize) -> Result<Self> {
        const NAME: &str = "euler";
        let common = config.common(NAME, TimestepSpacing::Linspace)?;
        check_steps(NAME, n, common.num_train_timesteps)?;
        config.refuse(
            NAME,
            &[
                Field::ExponentialSigmas,
                Field::BetaSigmas,
                Field::FinalSigmasType,
                Field::InterpolationType,
                Field::TimestepType,
            ],
        )?;
        let karras = config
            .use_karras_sigmas
            .unwrap_or(false)
            .then_some((config.sigma_min, config.sigma_max));
        Ok(Self {
            schedule: SigmaSchedule::new(&common, n, karras),
        })
    }
}

impl Scheduler for Euler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.schedule.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        check_step(self.kind(), step, self.schedule.timesteps.len())?;
        self.schedule.scale_model_input(sample, step)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        check_step(self.kind(), step, self.schedule.timesteps.len())?;
        // No churn (diffusers' default s_churn = 0), so σ̂ = σ and no noise is drawn.
        let sigma = self.schedule.sigmas[step];
        let x = f32_of(sample)?;
        let m = f32_of(model_output)?;
        let pred_x0 = self.schedule.pred_x0(&x, &m, sigma)?;
        let derivative = div(&(&x - pred_x0)?, sigma)?;
        let dt = self.schedule.sigmas[step + 1] - sigma;
        let prev = (x + mul(&derivative, dt)?)?;
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        check_step(self.kind(), step, self.schedule.timesteps.len())?;
        self.schedule.add_noise(original, noise, step)
    }
}
