//! `UniPCMultistepScheduler` (Zhao et al., arXiv 2302.04867): a multistep predictor (UniP)
//! whose result is refined by a corrector (UniC) once the model output at the new point is
//! known, i.e. at the start of the next step, at no extra model evaluation. Data prediction
//! (`predict_x0`), B(h) of type bh2.
use candle_core::Tensor;

use super::config::{unsupported, Field, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, alpha_sigma_t, lambda};
use super::{
    check_consecutive, check_steps, div, mul, vp_add_noise, vp_x0, NoiseSource, SchedulerKind,
    Solver, Steps,
};
use crate::Result;

const NAME: &str = "unipc";

pub(crate) struct UniPc {
    steps: Steps,
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

        let karras = config
            .use_karras_sigmas
            .unwrap_or(false)
            .then_some(f64::round_ties_even as fn(f64) -> f64);
        let (timesteps, sigmas) =
            schedule::multistep_schedule(NAME, config, &common, num_train, n, karras)?;
        Ok(Self {
            steps: Steps {
                kind: SchedulerKind::UniPc,
                timesteps,
                sigmas,
                init_noise_sigma: 1.0,
                scale_input: false,
            },
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
        let lambda_s0 = lambda(self.steps.sigmas[step - 1]);
        let c = Self::coefficients(self.steps.sigmas[step], self.steps.sigmas[step - 1]);
        let x_t_ = (mul(last_sample, c.ratio)? - mul(m0, c.alpha_t * c.h_phi_1)?)?;
        let d1_t = (model_t - m0)?;
        let correction = if order == 1 {
            mul(&d1_t, 0.5)?
        } else {
            let m1 = self.model_outputs[0]
                .as_ref()
                .expect("two previous outputs");
            let rk = (lambda(self.steps.sigmas[step - 2]) - lambda_s0) / c.h;
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
        let c = Self::coefficients(self.steps.sigmas[step + 1], self.steps.sigmas[step]);
        let x_t_ = (mul(x, c.ratio)? - mul(m0, c.alpha_t * c.h_phi_1)?)?;
        if order == 1 {
            return Ok(x_t_);
        }
        let m1 = self.model_outputs[0].as_ref().expect("a previous output");
        let rk = (lambda(self.steps.sigmas[step - 1]) - lambda(self.steps.sigmas[step])) / c.h;
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

impl Solver for UniPc {
    fn steps(&self) -> &Steps {
        &self.steps
    }

    fn step_f32(
        &mut self,
        m: &Tensor,
        step: usize,
        x: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.steps.timesteps.len();
        check_consecutive(self.steps.kind, self.next_step, step)?;
        let x0 = vp_x0(self.prediction_type, m, x, self.steps.sigmas[step])?;
        let use_corrector =
            step > 0 && !self.disable_corrector.contains(&(step - 1)) && self.last_sample.is_some();
        let x = if use_corrector {
            self.correct(&x0, step)?
        } else {
            x.clone()
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
        Ok(prev)
    }

    fn add_noise_f32(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        vp_add_noise(original, noise, self.steps.sigmas[step])
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
