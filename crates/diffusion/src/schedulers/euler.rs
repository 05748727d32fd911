//! `EulerDiscreteScheduler` and the σ schedule it shares with Euler ancestral: Karras et al.'s
//! Algorithm 2 (arXiv 2206.00364) without churn, in σ space.
use candle_core::Tensor;

use super::config::{Common, Field, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{check_steps, div, mul, schedule, NoiseSource, SchedulerKind, Solver, Steps};
use crate::Result;

/// Euler or, by its kind, Euler ancestral (see `euler_ancestral.rs`): the same σ schedule.
pub(crate) struct Euler {
    pub(super) steps: Steps,
    prediction_type: PredictionType,
}

impl Euler {
    pub(crate) fn new(config: &SchedulerConfig, n: usize) -> Result<Self> {
        let kind = SchedulerKind::Euler;
        let common = config.common(kind.name(), TimestepSpacing::Linspace)?;
        check_steps(kind.name(), n, common.num_train_timesteps)?;
        config.refuse(
            kind.name(),
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
        Ok(Self::with_schedule(kind, &common, n, karras))
    }

    /// The Euler family's timesteps and σs. `karras`: diffusers' `use_karras_sigmas` (Euler
    /// only; Euler ancestral has no such field).
    pub(super) fn with_schedule(
        kind: SchedulerKind,
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
                schedule::karras_schedule(sigma_min, sigma_max, n, &table, |t| t as f32 as f64)
            }
        };
        let sigmas = schedule::with_final_zero(sigmas);
        let max = sigmas.iter().copied().fold(f32::MIN, f32::max);
        // Scaled so that the UNet input `x / √(σ² + 1)` has unit variance; "leading" schedules
        // start below σ_max, where diffusers uses √(σ_max² + 1) instead of σ_max.
        let init_noise_sigma = match common.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Self {
            steps: Steps {
                kind,
                timesteps,
                sigmas,
                init_noise_sigma: init_noise_sigma as f64,
                scale_input: true,
            },
            prediction_type: common.prediction_type,
        }
    }

    /// The denoised estimate x0 from the model output at σ (`x`, `m` in f32).
    pub(super) fn pred_x0(&self, x: &Tensor, m: &Tensor, sigma: f32) -> Result<Tensor> {
        Ok(match self.prediction_type {
            PredictionType::Epsilon => (x - mul(m, sigma)?)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (mul(m, -sigma / s2.sqrt())? + div(x, s2)?)?
            }
        })
    }
}

impl Solver for Euler {
    fn steps(&self) -> &Steps {
        &self.steps
    }

    fn step_f32(
        &mut self,
        m: &Tensor,
        step: usize,
        x: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if self.steps.kind == SchedulerKind::EulerAncestral {
            return self.ancestral_step(m, step, x, noise);
        }
        // No churn (diffusers' default s_churn = 0), so σ̂ = σ and no noise is drawn.
        let sigma = self.steps.sigmas[step];
        let pred_x0 = self.pred_x0(x, m, sigma)?;
        let derivative = div(&(x - pred_x0)?, sigma)?;
        let dt = self.steps.sigmas[step + 1] - sigma;
        Ok((x + mul(&derivative, dt)?)?)
    }

    /// `original + noise · σ`.
    fn add_noise_f32(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        Ok((original + mul(noise, self.steps.sigmas[step])?)?)
    }
}
