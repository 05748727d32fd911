//! `UniPCMultistepScheduler` (Zhao et al., arXiv 2302.04867): a multistep predictor (UniP)
//! whose result is refined by a corrector (UniC) once the model output at the new point is
//! known, i.e. at the start of the next step, at no extra model evaluation. Data prediction
//! (`predict_x0`), B(h) of type bh2.
use candle_core::Tensor;

use super::config::{unsupported, Field, PredictionType, SchedulerConfig, TimestepSpacing};
use super::dpm_solver::check_consecutive;
use super::euler::check_steps;
use super::schedule::{self, alpha_sigma_t, lambda};
use super::{check_step, div, f32_of, mul, NoiseSource, Scheduler, SchedulerKind};
use crate::Result;

const NAME: &str = "unipc";

pub(crate) struct UniPc {
    timesteps: Vec<f64>,
    /// One per step plus the final 0.
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// x0 predictions of the previous and current steps.
    model_outputs: [Option<Tensor>; 2],
    /// The (corrected) sample the previous predictor started from.
    last_sample: Option<Tensor>,
    /// The previous predictor's order, which the corrector uses.
    this_order: usize,
    lower_order_nums: usize,
    next_step: Option<usize>,
}

impl UniPc {
    pub(crate) fn new(config: &SchedulerConfig, n: usize) -> Result<Self> {
        let common = config.common(NAME, TimestepSpacing::Linspace)?;
        let num_train = common.num_train_timesteps;
        check_steps(NAME, n, num_train)?;
        config.refuse(
            NAME,
            &[
                Field::Thresholding,
                Field::ExponentialSigmas,
                Field::BetaSigmas,
                Field::FlowSigmas,
                Field::DynamicShifting,
                Field::FinalSigmasType,
            ],
        )?;
        if config.predict_x0 == Some(false) {
            return Err(unsupported(NAME, "predict_x0 = false"));
        }
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=2).contains(&solver_order) {
            return Err(unsupported(
                NAME,
                format!("solver_order = {solver_order} (1 and 2 are)"),
            ));
        }
        // diffusers maps DPM-Solver's solver types to "bh2". bh1 (B(h) = h) is refused: with the
        // final σ of 0, B(h) = −∞ and diffusers' last step computes −∞ · 0 = NaN.
        match config.solver_type.as_deref() {
            None | Some("bh2") | Some("midpoint") | Some("heun") | Some("logrho") => {}
            Some(other) => return Err(unsupported(NAME, format!("solver_type = {other:?}"))),
        }

        let table = schedule::sigma_table(&common.alphas_cumprod);
        let mut timesteps = schedule::multistep_timesteps(
            common.spacing,
            num_train,
            num_train,
            n,
            common.steps_offset,
        );
        let sigmas: Vec<f64> = if config.use_karras_sigmas.unwrap_or(false) {
            let log_sigmas = schedule::log_table(&table);
            let sigma_min = config.sigma_min.unwrap_or(table[0] as f64);
            let sigma_max = config.sigma_max.unwrap_or(table[num_train - 1] as f64);
            let sigmas = schedule::karras_sigmas(sigma_min, sigma_max, n);
            timesteps = sigmas
                .iter()
                .map(|&s| schedule::sigma_to_t(s, &log_sigmas).round_ties_even())
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| schedule::interp(t, &table))
                .collect()
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t >= num_train as f64) {
            return Err(unsupported(
                NAME,
                format!("steps_offset pushes timestep {t} past the training range"),
            ));
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            prediction_type: common.prediction_type,
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            model_outputs: [None, None],
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
            next_step: None,
        })
    }

    fn convert(&self, m: &Tensor, x: &Tensor, step: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[step]);
        Ok(match self.prediction_type {
            PredictionType::Epsilon => div(&(x - mul(m, sigma_t)?)?, alpha_t)?,
            PredictionType::VPrediction => (mul(x, alpha_t)? - mul(m, sigma_t)?)?,
        })
    }

    /// The coefficients shared by predictor and corrector for a step from σ_s0 to σ_t:
    /// σ_t/σ_s0, α_t, hφ₁ = e^{−h} − 1, B(h) = e^{−h} − 1 (bh2), h and −h.
    fn coefficients(sigma_t: f32, sigma_s0: f32) -> Coefficients {
        let (alpha_t, sigma_t_) = alpha_sigma_t(sigma_t);
        let (_, sigma_s0_) = alpha_sigma_t(sigma_s0);
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        Coefficients {
            ratio: sigma_t_ / sigma_s0_,
            alpha_t,
            h_phi_1,
            b_h,
            h,
            hh,
        }
    }

    /// UniC: the sample at step `step` again, recomputed from the previous predictor's start
    /// with the model's x0 at `step`, `model_t`, now known (it replaces the predictor's result).
    fn correct(&self, model_t: &Tensor, step: usize) -> Result<Tensor> {
        let order = self.this_order;
        let last_sample = self.last_sample.as_ref().expect("checked by the caller");
        let m0 = self.model_outputs[1]
            .as_ref()
            .expect("a previous output with a last sample");
        let lambda_s0 = lambda(self.sigmas[step - 1]);
        let c = Self::coefficients(self.sigmas[step], self.sigmas[step - 1]);
        let x_t_ = (mul(last_sample, c.ratio)? - mul(m0, c.alpha_t * c.h_phi_1)?)?;
        let d1_t = (model_t - m0)?;
        let correction = if order == 1 {
            mul(&d1_t, 0.5)?
        } else {
            let m1 = self.model_outputs[0]
                .as_ref()
                .expect("two previous outputs");
            let rk = (lambda(self.sigmas[step - 2]) - lambda_s0) / c.h;
            let d1 = div(&(m1 - m0)?, rk)?;
            // ρ solves R ρ = b with R = [[1, 1], [r_k, 1]] (powers of (r_k, 1)) and b from the
            // φ functions of −h (the paper's eq. 8 for B(h)).
            let h_phi_k = c.h_phi_1 / c.hh - 1.0;
            let b1 = h_phi_k / c.b_h;
            let h_phi_k = h_phi_k / c.hh - 0.5;
            let b2 = h_phi_k * 2.0 / c.b_h;
            let rhos = solve2([[1.0, 1.0], [rk, 1.0]], [b1, b2]);
            (mul(&d1, rhos[0])? + mul(&d1_t, rhos[1])?)?
        };
        Ok((x_t_ - mul(&correction, c.alpha_t * c.b_h)?)?)
    }

    /// UniP of order `order` from `x` at step `step` to step `step + 1`.
    fn predict(&self, x: &Tensor, order: usize, step: usize) -> Result<Tensor> {
        let m0 = self.model_outputs[1].as_ref().expect("the current output");
        let c = Self::coefficients(self.sigmas[step + 1], self.sigmas[step]);
        let x_t_ = (mul(x, c.ratio)? - mul(m0, c.alpha_t * c.h_phi_1)?)?;
        if order == 1 {
            return Ok(x_t_);
        }
        let m1 = self.model_outputs[0].as_ref().expect("a previous output");
        let rk = (lambda(self.sigmas[step - 1]) - lambda(self.sigmas[step])) / c.h;
        let d1 = div(&(m1 - m0)?, rk)?;
        // Order 2: ρ = 1/2.
        Ok((x_t_ - mul(&mul(&d1, 0.5)?, c.alpha_t * c.b_h)?)?)
    }
}

struct Coefficients {
    ratio: f32,
    alpha_t: f32,
    h_phi_1: f32,
    b_h: f32,
    h: f32,
    hh: f32,
}

/// A 2×2 linear solve in f32 by LU with partial pivoting, as LAPACK's `sgesv` (which is what
/// `torch.linalg.solve` runs on the CPU).
fn solve2(a: [[f32; 2]; 2], b: [f32; 2]) -> [f32; 2] {
    let (p, q) = if a[1][0].abs() > a[0][0].abs() {
        (1, 0)
    } else {
        (0, 1)
    };
    let l = a[q][0] * (1.0 / a[p][0]);
    let u11 = a[q][1] - l * a[p][1];
    let y1 = b[q] - l * b[p];
    let x1 = y1 / u11;
    let x0 = (b[p] - a[p][1] * x1) / a[p][0];
    [x0, x1]
}

impl Scheduler for UniPc {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::UniPc
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        check_step(self.kind(), step, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        check_step(self.kind(), step, n)?;
        check_consecutive(self.kind(), self.next_step, step)?;
        let x = f32_of(sample)?;
        let m = f32_of(model_output)?;
        let x0 = self.convert(&m, &x, step)?;
        let use_corrector =
            step > 0 && !self.disable_corrector.contains(&(step - 1)) && self.last_sample.is_some();
        let x = if use_corrector {
            self.correct(&x0, step)?
        } else {
            x
        };
        self.model_outputs.rotate_left(1);
        self.model_outputs[1] = Some(x0);
        let order = if self.lower_order_final {
            self.solver_order.min(n - step)
        } else {
            self.solver_order
        };
        // Warm-up: no more history than the steps run so far.
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(&x, self.this_order, step)?;
        self.last_sample = Some(x);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step = Some(step + 1);
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        check_step(self.kind(), step, self.timesteps.len())?;
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[step]);
        let noisy = (mul(&f32_of(original)?, alpha_t)? + mul(&f32_of(noise)?, sigma_t)?)?;
        Ok(noisy.to_dtype(original.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::solve2;

    #[test]
    fn solve2_solves_with_either_pivot() {
        for (a, b) in [
            ([[1.0f32, 1.0], [-0.5, 1.0]], [1.5f32, 0.0]),
            ([[1.0f32, 1.0], [-2.0, 1.0]], [3.0f32, -3.0]),
        ] {
            let x = solve2(a, b);
            for i in 0..2 {
                let r = a[i][0] * x[0] + a[i][1] * x[1];
                assert!((r - b[i]).abs() < 1e-6, "{a:?} {b:?} {x:?}");
            }
        }
    }
}
