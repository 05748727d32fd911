//! `scheduler_config.json`, read once for whichever scheduler is built from it.
//!
//! diffusers' `Scheduler.from_config(pipe.scheduler.config)` builds any scheduler from any
//! scheduler's config: the fields the target class knows are passed to it, the others ignored,
//! and a field *absent from the file* takes the target class's own default, not the default of
//! the class the file was written for (diffusers tracks this as `_use_default_values`). So
//! every field here is an `Option`, and each scheduler applies its own defaults: SD 1.5's PNDM
//! config has no `timestep_spacing`, which makes DDIM "leading" but Euler, DPM-Solver and UniPC
//! "linspace", exactly as in diffusers.
use serde::Deserialize;
use std::path::Path;

use super::schedule;
use crate::{Error, Result};

/// The raw fields of a diffusers scheduler config that any of our schedulers reads. Unknown
/// fields (`skip_prk_steps`, `_class_name`, …) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct SchedulerConfig {
    // Every scheduler: the training noise schedule and how inference timesteps are picked.
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub thresholding: Option<bool>,
    // DDIM.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub set_alpha_to_one: Option<bool>,
    // Sigma schedules (Euler, DPM-Solver, UniPC).
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: Option<String>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    // Multistep solvers (DPM-Solver, UniPC).
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub predict_x0: Option<bool>,
    pub disable_corrector: Option<Vec<usize>>,
    pub use_dynamic_shifting: Option<bool>,
}

/// Stable Diffusion 1.5's `scheduler/scheduler_config.json`, as shipped.
pub const SD15_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Config(format!("scheduler config: {e}")))
    }

    /// Stable Diffusion 1.5's scheduler config.
    pub fn sd15() -> Self {
        Self::from_json(SD15_SCHEDULER_CONFIG).expect("the built-in SD 1.5 config parses")
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise (SD 1.x, SD 2.x base).
    Epsilon,
    /// v = α·ε − σ·x0 (SD 2.x 768 models).
    VPrediction,
}

/// How inference timesteps are spread over the training timesteps (table 2 of "Common
/// Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The fields all our schedulers share, resolved with one scheduler's defaults.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub num_train_timesteps: usize,
    /// ᾱ_t for t = 0..num_train_timesteps, float32 as diffusers computes them.
    pub alphas_cumprod: Vec<f32>,
    pub prediction_type: PredictionType,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
}

/// An error for a config value this implementation does not support.
pub(crate) fn unsupported(scheduler: &str, what: impl std::fmt::Display) -> Error {
    Error::Config(format!("{scheduler}: unsupported scheduler config: {what}"))
}

impl SchedulerConfig {
    /// The shared fields with the defaults every diffusers class here has (β from 0.0001 to
    /// 0.02, linear, epsilon, no offset) and `spacing` when the config has none.
    pub(crate) fn common(
        &self,
        scheduler: &str,
        default_spacing: TimestepSpacing,
    ) -> Result<Common> {
        let n = self.num_train_timesteps.unwrap_or(1000);
        if n < 2 {
            return Err(Error::Config(format!(
                "{scheduler}: num_train_timesteps = {n} (need at least 2)"
            )));
        }
        if self.rescale_betas_zero_snr == Some(true) {
            return Err(unsupported(scheduler, "rescale_betas_zero_snr = true"));
        }
        let betas = match (&self.trained_betas, self.beta_schedule.as_deref()) {
            (Some(b), _) if b.len() != n => {
                return Err(Error::Config(format!(
                    "{scheduler}: trained_betas has {} values, num_train_timesteps is {n}",
                    b.len()
                )))
            }
            (Some(b), _) => b.iter().map(|&b| b as f32).collect(),
            (None, schedule) => {
                let start = self.beta_start.unwrap_or(0.0001);
                let end = self.beta_end.unwrap_or(0.02);
                match schedule.unwrap_or("linear") {
                    "linear" => schedule::torch_linspace_f32(start, end, n),
                    "scaled_linear" => schedule::torch_linspace_f32(start.sqrt(), end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect(),
                    "squaredcos_cap_v2" => schedule::squaredcos_cap_v2(n),
                    other => {
                        return Err(unsupported(scheduler, format!("beta_schedule = {other:?}")))
                    }
                }
            }
        };
        let prediction_type = match self.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            other => {
                return Err(unsupported(
                    scheduler,
                    format!("prediction_type = {other:?} (epsilon and v_prediction are)"),
                ))
            }
        };
        let spacing = match self.timestep_spacing.as_deref() {
            None => default_spacing,
            Some("leading") => TimestepSpacing::Leading,
            Some("trailing") => TimestepSpacing::Trailing,
            Some("linspace") => TimestepSpacing::Linspace,
            Some(other) => {
                return Err(unsupported(
                    scheduler,
                    format!("timestep_spacing = {other:?}"),
                ))
            }
        };
        Ok(Common {
            num_train_timesteps: n,
            alphas_cumprod: schedule::alphas_cumprod(&betas),
            prediction_type,
            spacing,
            steps_offset: self.steps_offset.unwrap_or(0),
        })
    }

    /// Refuses the options among `fields` (those the scheduler's diffusers class knows; the
    /// others it ignores, so we do) that are set to something we do not implement.
    pub(crate) fn refuse(&self, scheduler: &str, fields: &[Field]) -> Result<()> {
        fn flag(v: Option<bool>) -> Option<String> {
            (v == Some(true)).then(|| "true".into())
        }
        fn other_than(v: &Option<String>, default: &str) -> Option<String> {
            v.as_deref()
                .filter(|v| *v != default)
                .map(|v| format!("{v:?}"))
        }
        for field in fields {
            let bad = match field {
                Field::Thresholding => flag(self.thresholding),
                Field::ExponentialSigmas => flag(self.use_exponential_sigmas),
                Field::BetaSigmas => flag(self.use_beta_sigmas),
                Field::LuLambdas => flag(self.use_lu_lambdas),
                Field::FlowSigmas => flag(self.use_flow_sigmas),
                Field::DynamicShifting => flag(self.use_dynamic_shifting),
                Field::FinalSigmasType => other_than(&self.final_sigmas_type, "zero"),
                Field::InterpolationType => other_than(&self.interpolation_type, "linear"),
                Field::TimestepType => other_than(&self.timestep_type, "discrete"),
                Field::VarianceType => self.variance_type.as_ref().map(|v| format!("{v:?}")),
            };
            if let Some(value) = bad {
                return Err(unsupported(
                    scheduler,
                    format!("{} = {value}", field.name()),
                ));
            }
        }
        Ok(())
    }
}

/// Config fields some diffusers schedulers have and we support only at their default.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Field {
    /// Dynamic thresholding: for pixel-space models, not latent diffusion.
    Thresholding,
    ExponentialSigmas,
    BetaSigmas,
    LuLambdas,
    FlowSigmas,
    DynamicShifting,
    FinalSigmasType,
    InterpolationType,
    TimestepType,
    VarianceType,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Thresholding => "thresholding",
            Field::ExponentialSigmas => "use_exponential_sigmas",
            Field::BetaSigmas => "use_beta_sigmas",
            Field::LuLambdas => "use_lu_lambdas",
            Field::FlowSigmas => "use_flow_sigmas",
            Field::DynamicShifting => "use_dynamic_shifting",
            Field::FinalSigmasType => "final_sigmas_type",
            Field::InterpolationType => "interpolation_type",
            Field::TimestepType => "timestep_type",
            Field::VarianceType => "variance_type",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_config_parses_and_keeps_absent_fields_absent() {
        let c = SchedulerConfig::sd15();
        assert_eq!(c.num_train_timesteps, Some(1000));
        assert_eq!(c.beta_schedule.as_deref(), Some("scaled_linear"));
        assert_eq!(c.beta_start, Some(0.00085));
        assert_eq!(c.beta_end, Some(0.012));
        assert_eq!(c.steps_offset, Some(1));
        assert_eq!(c.set_alpha_to_one, Some(false));
        assert_eq!(c.clip_sample, Some(false));
        assert_eq!(c.trained_betas, None);
        // Absent: each scheduler's own default applies.
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(c.prediction_type, None);
        let ddim = c.common("ddim", TimestepSpacing::Leading).unwrap();
        let euler = c.common("euler", TimestepSpacing::Linspace).unwrap();
        assert_eq!(ddim.spacing, TimestepSpacing::Leading);
        assert_eq!(euler.spacing, TimestepSpacing::Linspace);
        assert_eq!(ddim.prediction_type, PredictionType::Epsilon);
        assert_eq!(ddim.alphas_cumprod.len(), 1000);
    }

    #[test]
    fn known_fields_override_defaults_and_bad_values_are_named() {
        let text = SD15_SCHEDULER_CONFIG.replace(
            "\"clip_sample\": false",
            "\"clip_sample\": false, \"prediction_type\": \"v_prediction\", \
             \"timestep_spacing\": \"trailing\", \"solver_p\": null",
        );
        let c = SchedulerConfig::from_json(&text).unwrap();
        let common = c.common("euler", TimestepSpacing::Linspace).unwrap();
        assert_eq!(common.prediction_type, PredictionType::VPrediction);
        assert_eq!(common.spacing, TimestepSpacing::Trailing);

        let text = SD15_SCHEDULER_CONFIG.replace("\"scaled_linear\"", "\"sigmoid\"");
        let err = SchedulerConfig::from_json(&text)
            .unwrap()
            .common("ddim", TimestepSpacing::Leading)
            .unwrap_err();
        assert!(err.to_string().contains("beta_schedule"), "{err}");
        let text = SD15_SCHEDULER_CONFIG.replace("\"steps_offset\": 1", "\"steps_offset\": \"1\"");
        assert!(SchedulerConfig::from_json(&text).is_err());
    }
}
