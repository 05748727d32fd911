//! Stable Diffusion + ControlNet models in candle, numerically faithful to diffusers.
//!
//! Models know nothing of requests: they take tensors on the device they were loaded on and
//! return tensors there.
pub mod activations;
pub mod blocks;
pub mod clip;
pub mod config;
pub mod control;
pub mod controlnet;
pub mod conv;
pub mod denoise;
pub mod embedded;
pub mod fused_attention;
pub mod images;
pub mod ldm;
pub mod linear_bias;
pub mod pipeline;
pub mod profile;
pub mod prompt_syntax;
pub mod runtime;
pub mod schedulers;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod torch_pickle;
pub mod transfer;
pub mod unet;
pub mod vae;
pub mod vector_math;
pub mod weights;

pub use clip::{ClipTextConfig, ClipTextModel};
pub use config::{ControlNetConfig, UNetConfig};
pub use controlnet::{ControlNetModel, ControlResiduals};
pub use tokenizer::ClipTokenizer;
pub use unet::UNet2DConditionModel;
pub use vae::{AutoencoderKL, DiagonalGaussian, VaeConfig};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("weights: {0}")]
    Weights(String),
    /// A scheduler used out of its contract (step index out of range or out of order).
    #[error("scheduler: {0}")]
    Scheduler(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The weight file of a diffusers model folder, in diffusers' order of preference.
pub fn diffusers_weight_file(dir: &Path) -> Result<PathBuf> {
    first_file(
        dir,
        &[
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin",
        ],
    )
}

/// The first of `names` that is a file in `dir`, or an error listing them all.
pub(crate) fn first_file(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Weights(format!(
                "{}: no {} in this folder",
                dir.display(),
                names.join(" / ")
            ))
        })
}
