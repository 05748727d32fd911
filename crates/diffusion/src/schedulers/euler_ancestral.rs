//! `EulerAncestralDiscreteScheduler`: an Euler step down to σ_down, then fresh noise up to
//! σ_next (k-diffusion's `sample_euler_ancestral`, η = 1).
use candle_core::{DType, Tensor};

use super::config::{SchedulerConfig, TimestepSpacing};
use super::euler::{check_steps, SigmaSchedule};
use super::{check_step, div, f32_of, mul, NoiseSource, Scheduler, SchedulerKind};
use crate::Result;

pub(crate) struct EulerAncestral {
    schedule: SigmaSchedule,
}

impl EulerAncestral {
    pub(crate) fn new(config: &SchedulerConfig, n: usize) -> Result<Self> {
        const NAME: &str = "euler-a";
        let common = config.common(NAME, TimestepSpacing::Linspace)?;
        check_steps(NAME, n, common.num_train_timesteps)?;
        // diffusers' EulerAncestralDiscreteScheduler has none of the alternative σ schedules
        // (not even `use_karras_sigmas`) nor thresholding: such fields are ignored, as there.
        Ok(Self {
            schedule: SigmaSchedule::new(&common, n, None),
        })
    }
}

impl Scheduler for EulerAncestral {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        check_step(self.kind(), step, self.schedule.timesteps.len())?;
        let sigma_from = self.schedule.sigmas[step];
        let sigma_to = self.schedule.sigmas[step + 1];
        let x = f32_of(sample)?;
        let m = f32_of(model_output)?;
        let pred_x0 = self.schedule.pred_x0(&x, &m, sigma_from)?;
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = div(&(&x - pred_x0)?, sigma_from)?;
        let prev = (&x + mul(&derivative, sigma_down - sigma_from)?)?;
        let z = noise.randn(x.dims(), DType::F32, x.device())?;
        let prev = (prev + mul(&f32_of(&z)?, sigma_up)?)?;
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        check_step(self.kind(), step, self.schedule.timesteps.len())?;
        self.schedule.add_noise(original, noise, step)
    }
}
