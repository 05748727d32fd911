//! How a ControlNet is applied at a step: its window, its control mode and the per-residual
//! weights these give. Pure rules, shared by the single-job pipeline and the batcher.
use std::str::FromStr;

use crate::controlnet::residual_weights;
use crate::{Error, Result};

/// The three control modes of the ControlNet 1.1 UI (A1111's names in the comments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ControlMode {
    /// "Balanced": every residual × scale, on both CFG halves.
    #[default]
    Balanced,
    /// "My prompt is more important": residual k × scale × 0.825^(n-1-k), on both halves.
    PromptMoreImportant,
    /// "ControlNet is more important": diffusers' guess mode, residual k × scale ×
    /// logspace(-1, 0, n)[k], on the conditional half only.
    ControlNetMoreImportant,
}

impl FromStr for ControlMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace(['-', '_', ' '], "").as_str() {
            "balanced" | "0" => Ok(Self::Balanced),
            "prompt" | "promptmoreimportant" | "mypromptismoreimportant" | "1" => {
                Ok(Self::PromptMoreImportant)
            }
            "controlnet"
            | "controlnetmoreimportant"
            | "controlnetismoreimportant"
            | "guess"
            | "2" => Ok(Self::ControlNetMoreImportant),
            _ => Err(Error::Config(format!(
                "unknown control mode {s:?} (expected balanced, prompt or controlnet)"
            ))),
        }
    }
}

/// diffusers' window rule: at step `i` of `n` a net runs unless `i/n < start` or
/// `(i+1)/n > end`.
pub fn is_active(step: usize, n_steps: usize, start: f64, end: f64) -> bool {
    let (i, n) = (step as f64, n_steps as f64);
    !(i / n < start || (i + 1.0) / n > end)
}

/// How one ControlNet acts on one sample at one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Application {
    /// Multiplier of each residual (down residuals, then mid).
    pub weights: Vec<f64>,
    /// Whether the unconditional half of CFG gets the residuals too.
    pub on_uncond: bool,
}

/// The weights and halves for a net with `n_residuals` outputs. Nets with global pooling (the
/// shuffle model) always act on the conditional half only, with uniform weights, as in
/// diffusers, whatever the mode.
pub fn application(
    mode: ControlMode,
    scale: f64,
    n_residuals: usize,
    global_pool: bool,
) -> Application {
    let (per_residual, on_uncond) = match mode {
        _ if global_pool => (residual_weights::uniform(n_residuals), false),
        ControlMode::Balanced => (residual_weights::uniform(n_residuals), true),
        ControlMode::PromptMoreImportant => {
            (residual_weights::prompt_more_important(n_residuals), true)
        }
        ControlMode::ControlNetMoreImportant => (residual_weights::guess_mode(n_residuals), false),
    };
    Application {
        weights: per_residual.iter().map(|w| w * scale).collect(),
        on_uncond,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_follows_diffusers() {
        // 10 steps, window [0.2, 0.8]: steps 2..=7 run.
        let active: Vec<usize> = (0..10).filter(|&i| is_active(i, 10, 0.2, 0.8)).collect();
        assert_eq!(active, vec![2, 3, 4, 5, 6, 7]);
        assert!((0..10).all(|i| is_active(i, 10, 0.0, 1.0)));
        assert!(!is_active(0, 10, 0.05, 1.0));
        assert!(!is_active(9, 10, 0.0, 0.95));
    }

    #[test]
    fn modes_weight_the_residuals() {
        let a = application(ControlMode::Balanced, 0.5, 13, false);
        assert!(a.on_uncond && a.weights.iter().all(|&w| w == 0.5));
        let p = application(ControlMode::PromptMoreImportant, 1.0, 13, false);
        assert!(p.on_uncond);
        assert!((p.weights[0] - 0.825f64.powi(12)).abs() < 1e-12);
        assert_eq!(p.weights[12], 1.0);
        let g = application(ControlMode::ControlNetMoreImportant, 2.0, 13, false);
        assert!(!g.on_uncond);
        assert!((g.weights[0] - 0.2).abs() < 1e-12 && (g.weights[12] - 2.0).abs() < 1e-12);
        // logspace: consecutive ratios are equal.
        let r = g.weights[1] / g.weights[0];
        assert!((g.weights[7] / g.weights[6] - r).abs() < 1e-12);
        let pooled = application(ControlMode::PromptMoreImportant, 0.7, 13, true);
        assert!(!pooled.on_uncond && pooled.weights.iter().all(|&w| w == 0.7));
    }

    #[test]
    fn mode_names() {
        assert_eq!(
            "My prompt is more important"
                .parse::<ControlMode>()
                .unwrap(),
            ControlMode::PromptMoreImportant
        );
        assert_eq!(
            "controlnet".parse::<ControlMode>().unwrap(),
            ControlMode::ControlNetMoreImportant
        );
        assert_eq!("0".parse::<ControlMode>().unwrap(), ControlMode::Balanced);
        assert!("loud".parse::<ControlMode>().is_err());
    }
}
