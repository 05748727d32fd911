//! `DPMSolverMultistepScheduler` as DPM-Solver++(2M) (Lu et al., arXiv 2211.01095): a second
//! order multistep solver in λ (half log-SNR) on the data prediction x0.
use candle_core::Tensor;

use super::config::{unsupported, Field, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{self, alpha_sigma_t, lambda};
use super::{
    check_consecutive, check_steps, mul, vp_add_noise, vp_x0, NoiseSource, SchedulerKind, Solver,
    Steps,
};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub(crate) struct DpmSolver {
    steps: Steps,
    prediction_type: PredictionType,
    solver_type: SolverType,
    /// The converted model outputs (x0 predictions) of the previous and current steps.
    model_outputs: [Option<Tensor>; 2],
    /// How many steps have run (capped at 2): the first step has no history.
    lower_order_nums: usize,
    next_step: Option<usize>,
}

impl DpmSolver {
    /// The kind names the algorithm, so `algorithm_type` ("dpmsolver++"), `solver_order` (2)
    /// and `use_karras_sigmas` come from it, not from the config: as diffusers' pipelines are
    /// set up with `from_config(config, algorithm_type=…, solver_order=2, use_karras_sigmas=…)`.
    pub(crate) fn new(config: &SchedulerConfig, n: usize, karras: bool) -> Result<Self> {
        let kind = if karras {
            SchedulerKind::DpmPP2MKarras
        } else {
            SchedulerKind::DpmPP2M
        };
        let name = kind.name();
        let common = config.common(name, TimestepSpacing::Linspace)?;
        let num_train = common.num_train_timesteps;
        check_steps(name, n, num_train)?;
        config.refuse(
            name,
            &[
                Field::Thresholding,
                Field::ExponentialSigmas,
                Field::BetaSigmas,
                Field::LuLambdas,
                Field::FlowSigmas,
                Field::DynamicShifting,
                Field::FinalSigmasType,
                Field::VarianceType,
            ],
        )?;
        // diffusers maps UniPC's solver types to "midpoint".
        let solver_type = match config.solver_type.as_deref() {
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => {
                SolverType::Midpoint
            }
            Some("heun") => SolverType::Heun,
            Some(other) => return Err(unsupported(name, format!("solver_type = {other:?}"))),
        };

        let last_timestep = match config.lambda_min_clipped {
            Some(clip) if clip.is_finite() => {
                // The schedule stops where λ_t falls below the clip (searchsorted on the
                // increasing λ of the reversed table).
                let clipped = common
                    .alphas_cumprod
                    .iter()
                    .rev()
                    .position(|&a| {
                        let l = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                        l as f64 >= clip
                    })
                    .unwrap_or(num_train);
                num_train - clipped
            }
            _ => num_train,
        };
        if last_timestep < n + 1 {
            return Err(Error::Config(format!(
                "{name}: lambda_min_clipped leaves {last_timestep} timesteps for {n} steps"
            )));
        }
        // diffusers does not round the Karras timesteps of the cosine schedule, and casts them
        // to int64.
        let karras = karras.then_some(
            if config.beta_schedule.as_deref() == Some("squaredcos_cap_v2") {
                f64::trunc as fn(f64) -> f64
            } else {
                f64::round_ties_even
            },
        );
        let (timesteps, sigmas) =
            schedule::multistep_schedule(name, config, &common, last_timestep, n, karras)?;
        Ok(Self {
            steps: Steps {
                kind,
                timesteps,
                sigmas,
                init_noise_sigma: 1.0,
                scale_input: false,
            },
            prediction_type: common.prediction_type,
            solver_type,
            model_outputs: [None, None],
            lower_order_nums: 0,
            next_step: None,
        })
    }
}

impl Solver for DpmSolver {
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
        let sigmas = &self.steps.sigmas;
        check_consecutive(self.steps.kind, self.next_step, step)?;
        // The final σ is 0 (`final_sigmas_type = "zero"`), which makes diffusers' last step
        // first order whatever `lower_order_final` and `euler_at_final` say.
        let last = step == self.steps.timesteps.len() - 1;
        let x0 = vp_x0(self.prediction_type, m, x, sigmas[step])?;
        self.model_outputs.rotate_left(1);
        self.model_outputs[1] = Some(x0.clone());

        let sigma_t = sigmas[step + 1];
        let sigma_s0 = sigmas[step];
        let (alpha_t, sigma_t_) = alpha_sigma_t(sigma_t);
        let (_, sigma_s0_) = alpha_sigma_t(sigma_s0);
        let lambda_t = lambda(sigma_t);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda_t - lambda_s0;
        let phi = alpha_t * ((-h).exp() - 1.0);
        // x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·D0 (− the second-order term).
        let first = (mul(x, sigma_t_ / sigma_s0_)? - mul(&x0, phi)?)?;
        let prev = if self.lower_order_nums < 1 || last {
            first
        } else {
            let m1 = self.model_outputs[0]
                .as_ref()
                .expect("a previous output after the first step");
            let lambda_s1 = lambda(sigmas[step - 1]);
            let h_0 = lambda_s0 - lambda_s1;
            let r0 = h_0 / h;
            let d1 = mul(&(&x0 - m1)?, 1.0 / r0)?;
            match self.solver_type {
                SolverType::Midpoint => (first - mul(&d1, 0.5 * phi)?)?,
                SolverType::Heun => {
                    let c = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
                    (first + mul(&d1, c)?)?
                }
            }
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        self.next_step = Some(step + 1);
        Ok(prev)
    }

    fn add_noise_f32(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        vp_add_noise(original, noise, self.steps.sigmas[step])
    }
}
