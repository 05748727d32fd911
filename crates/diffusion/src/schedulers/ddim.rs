//! `DDIMScheduler` (Song et al., arXiv 2010.02502), with η.
use candle_core::{DType, Tensor};

use super::config::{unsupported, Field, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{div, f32_of, mul, schedule, NoiseSource, SchedulerKind, Solver, Steps};
use crate::Result;

const NAME: &str = "ddim";

pub(crate) struct Ddim {
    /// No σs.
    steps: Steps,
    alphas_cumprod: Vec<f32>,
    /// ᾱ "before" the first training timestep, used by the last step.
    final_alpha_cumprod: f32,
    /// diffusers' `prev_timestep = t − T // n`, whatever the spacing.
    step_ratio: usize,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
    eta: f32,
}

impl Ddim {
    pub(crate) fn new(config: &SchedulerConfig, n: usize, eta: f64) -> Result<Self> {
        let common = config.common(NAME, TimestepSpacing::Leading)?;
        config.refuse(NAME, &[Field::Thresholding])?;
        let num_train = common.num_train_timesteps;
        if n > num_train {
            return Err(unsupported(
                NAME,
                format!("{n} steps (num_train_timesteps is {num_train})"),
            ));
        }
        let timesteps = schedule::single_step_timesteps(
            common.spacing,
            num_train,
            n,
            common.steps_offset,
            false,
        );
        if let Some(&t) = timesteps.iter().find(|&&t| t >= num_train as f64) {
            return Err(unsupported(
                NAME,
                format!(
                    "steps_offset {} pushes timestep {t} past the training range",
                    common.steps_offset
                ),
            ));
        }
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            common.alphas_cumprod[0]
        };
        let clip_sample = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Self {
            steps: Steps {
                kind: SchedulerKind::Ddim,
                timesteps,
                sigmas: Vec::new(),
                init_noise_sigma: 1.0,
                scale_input: false,
            },
            final_alpha_cumprod,
            step_ratio: num_train / n,
            prediction_type: common.prediction_type,
            clip_sample,
            alphas_cumprod: common.alphas_cumprod,
            eta: eta as f32,
        })
    }
}

impl Solver for Ddim {
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
        let t = self.steps.timesteps[step] as usize;
        // Not the next timestep of a "linspace" or "trailing" schedule: diffusers' choice, kept.
        let prev_t = t as i64 - self.step_ratio as i64;
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;

        let (pred_x0, pred_eps) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = div(&(x - mul(m, beta_t.sqrt())?)?, alpha_t.sqrt())?;
                (x0, m.clone())
            }
            PredictionType::VPrediction => {
                let x0 = (mul(x, alpha_t.sqrt())? - mul(m, beta_t.sqrt())?)?;
                let eps = (mul(m, alpha_t.sqrt())? + mul(x, beta_t.sqrt())?)?;
                (x0, eps)
            }
        };
        let pred_x0 = match self.clip_sample {
            // candle's `clamp` with scalars would upload them at every step.
            Some(r) => crate::transfer::clamp(&pred_x0, -r as f64, r as f64)?,
            None => pred_x0,
        };
        // σ_t(η) of the DDIM paper's eq. 16.
        let beta_prev = 1.0 - alpha_prev;
        let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.eta * variance.sqrt();
        let direction = mul(&pred_eps, (1.0 - alpha_prev - std_dev * std_dev).sqrt())?;
        let mut prev = (mul(&pred_x0, alpha_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let z = noise.randn(x.dims(), DType::F32, x.device())?;
            prev = (prev + mul(&f32_of(&z)?, std_dev)?)?;
        }
        Ok(prev)
    }

    fn add_noise_f32(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let alpha = self.alphas_cumprod[self.steps.timesteps[step] as usize];
        Ok((mul(original, alpha.sqrt())? + mul(noise, (1.0 - alpha).sqrt())?)?)
    }
}
