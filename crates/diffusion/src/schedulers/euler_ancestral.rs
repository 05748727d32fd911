//! `EulerAncestralDiscreteScheduler`: an Euler step down to σ_down, then fresh noise up to
//! σ_next (k-diffusion's `sample_euler_ancestral`, η = 1).
use candle_core::{DType, Tensor};

use super::config::{SchedulerConfig, TimestepSpacing};
use super::euler::Euler;
use super::{check_steps, div, f32_of, mul, NoiseSource, SchedulerKind};
use crate::Result;

impl Euler {
    /// Euler ancestral: Euler's σ schedule, stepped by [`Euler::ancestral_step`].
    pub(crate) fn ancestral(config: &SchedulerConfig, n: usize) -> Result<Self> {
        let kind = SchedulerKind::EulerAncestral;
        let common = config.common(kind.name(), TimestepSpacing::Linspace)?;
        check_steps(kind.name(), n, common.num_train_timesteps)?;
        // diffusers' EulerAncestralDiscreteScheduler has none of the alternative σ schedules
        // (not even `use_karras_sigmas`) nor thresholding: such fields are ignored, as there.
        Ok(Self::with_schedule(kind, &common, n, None))
    }

    /// The ancestral step (f32 `m` and `x`, a checked `step`).
    pub(super) fn ancestral_step(
        &self,
        m: &Tensor,
        step: usize,
        x: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma_from = self.steps.sigmas[step];
        let sigma_to = self.steps.sigmas[step + 1];
        let pred_x0 = self.pred_x0(x, m, sigma_from)?;
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = div(&(x - pred_x0)?, sigma_from)?;
        let prev = (x + mul(&derivative, sigma_down - sigma_from)?)?;
        let z = noise.randn(x.dims(), DType::F32, x.device())?;
        Ok((prev + mul(&f32_of(&z)?, sigma_up)?)?)
    }
}
