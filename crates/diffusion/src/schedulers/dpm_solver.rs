//! `DPMSolverMultistepScheduler` as DPM-Solver++(2M) (Lu et al., arXiv 2211.01095): a second
//! order multistep solver in λ (half log-SNR) on the data prediction x0.
use candle_core::Tensor;

use super::config::{unsupported, Field, PredictionType, SchedulerConfig, TimestepSpacing};
use super::euler::check_steps;
use super::schedule::{self, alpha_sigma_t, lambda};
use super::{check_step, div, f32_of, mul, NoiseSource, Scheduler, SchedulerKind};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub(crate) struct DpmSolver {
    kind: SchedulerKind,
    timesteps: Vec<f64>,
    /// One per step plus the final 0.
    sigmas: Vec<f32>,
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

        let table = schedule::sigma_table(&common.alphas_cumprod);
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
        let mut timesteps = schedule::multistep_timesteps(
            common.spacing,
            num_train,
            last_timestep,
            n,
            common.steps_offset,
        );
        let sigmas: Vec<f64> = if karras {
            let log_sigmas = schedule::log_table(&table);
            let sigma_min = config.sigma_min.unwrap_or(table[0] as f64);
            let sigma_max = config.sigma_max.unwrap_or(table[num_train - 1] as f64);
            let sigmas = schedule::karras_sigmas(sigma_min, sigma_max, n);
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = schedule::sigma_to_t(s, &log_sigmas);
                    if config.beta_schedule.as_deref() == Some("squaredcos_cap_v2") {
                        t.trunc() // diffusers does not round these, and casts to int64
                    } else {
                        t.round_ties_even()
                    }
                })
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
                name,
                format!("steps_offset pushes timestep {t} past the training range"),
            ));
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        Ok(Self {
            kind,
            timesteps,
            sigmas,
            prediction_type: common.prediction_type,
            solver_type,
            model_outputs: [None, None],
            lower_order_nums: 0,
            next_step: None,
        })
    }

    /// x0 from the model output at step `step` (diffusers' `convert_model_output`).
    fn convert(&self, m: &Tensor, x: &Tensor, step: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[step]);
        Ok(match self.prediction_type {
            PredictionType::Epsilon => div(&(x - mul(m, sigma_t)?)?, alpha_t)?,
            PredictionType::VPrediction => (mul(x, alpha_t)? - mul(m, sigma_t)?)?,
        })
    }
}

impl Scheduler for DpmSolver {
    fn kind(&self) -> SchedulerKind {
        self.kind
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
        check_step(self.kind, step, self.timesteps.len())?;
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
        check_step(self.kind, step, n)?;
        check_consecutive(self.kind, self.next_step, step)?;
        // The final σ is 0 (`final_sigmas_type = "zero"`), which makes diffusers' last step
        // first order whatever `lower_order_final` and `euler_at_final` say.
        let last = step == n - 1;
        let x = f32_of(sample)?;
        let m = f32_of(model_output)?;
        let x0 = self.convert(&m, &x, step)?;
        self.model_outputs.rotate_left(1);
        self.model_outputs[1] = Some(x0.clone());

        let sigma_t = self.sigmas[step + 1];
        let sigma_s0 = self.sigmas[step];
        let (alpha_t, sigma_t_) = alpha_sigma_t(sigma_t);
        let (_, sigma_s0_) = alpha_sigma_t(sigma_s0);
        let lambda_t = lambda(sigma_t);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda_t - lambda_s0;
        let phi = alpha_t * ((-h).exp() - 1.0);
        // x_t = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·D0 (− the second-order term).
        let first = (mul(&x, sigma_t_ / sigma_s0_)? - mul(&x0, phi)?)?;
        let prev = if self.lower_order_nums < 1 || last {
            first
        } else {
            let m1 = self.model_outputs[0]
                .as_ref()
                .expect("a previous output after the first step");
            let lambda_s1 = lambda(self.sigmas[step - 1]);
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
        Ok(prev.to_dtype(sample.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        check_step(self.kind, step, self.timesteps.len())?;
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sigmas[step]);
        let noisy = (mul(&f32_of(original)?, alpha_t)? + mul(&f32_of(noise)?, sigma_t)?)?;
        Ok(noisy.to_dtype(original.dtype())?)
    }
}

/// Multistep solvers keep the previous outputs: a step out of sequence would silently use
/// the wrong ones.
pub(crate) fn check_consecutive(
    kind: SchedulerKind,
    expected: Option<usize>,
    step: usize,
) -> Result<()> {
    match expected {
        Some(e) if e != step => Err(Error::Scheduler(format!(
            "{kind}: step {step} after step {} (multistep schedulers step in order)",
            e - 1
        ))),
        _ => Ok(()),
    }
}
