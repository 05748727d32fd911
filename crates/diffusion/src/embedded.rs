//! The built-in default model: SD 1.5-shaped but tiny, with weights generated from a seed at
//! start, so the service runs on a fresh machine with nothing downloaded. Random weights make
//! noise, not pictures: it exists to exercise every path (text, ControlNets, schedulers, VAE,
//! batching, the API), not to draw.
//!
//! The weights are a pure function of (seed, tensor name, shape): the same on every run, every
//! machine and every device, whatever order the model asks for them in.
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::config::{ControlNetConfig, UNetConfig};
use crate::controlnet::ControlNetModel;
use crate::pipeline::StableDiffusion;
use crate::schedulers::SchedulerConfig;
use crate::tokenizer::{ClipTokenizer, Family};
use crate::unet::UNet2DConditionModel;
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::Result;

/// The base model's seed; ControlNets take their own.
pub const BASE_SEED: u64 = 0x5D15;

/// Weights drawn from a seeded stream per tensor, following the init hints the model gives.
/// `zero_init: false` draws even the tensors a fresh model would have at zero (a ControlNet's
/// zero convolutions), so that a generated ControlNet acts as a trained one would.
pub struct SeededWeights {
    seed: u64,
    zero_init: bool,
}

/// FNV-1a: a stable hash (std's hasher may change between Rust versions).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

impl SeededWeights {
    pub fn new(seed: u64, zero_init: bool) -> Self {
        Self { seed, zero_init }
    }

    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn values(&self, shape: &Shape, name: &str, init: Init) -> Vec<f32> {
        let n = shape.elem_count();
        let dims = shape.dims();
        let fan_in = if dims.len() < 2 {
            1
        } else {
            dims[1..].iter().product::<usize>()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ fnv1a(name.as_bytes()));
        let normal = |rng: &mut rand_chacha::ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
            let d = Normal::new(mean, std).expect("finite std");
            (0..n).map(|_| d.sample(rng) as f32).collect()
        };
        match init {
            Init::Const(c) if c == 0.0 && !self.zero_init && dims.len() >= 2 => {
                normal(&mut rng, 0.0, 1.0 / (fan_in as f64).sqrt())
            }
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Uniform { lo, up } => {
                let d = Uniform::new(lo, up).expect("lo < up");
                (0..n).map(|_| d.sample(&mut rng) as f32).collect()
            }
            Init::Kaiming { .. } => normal(&mut rng, 0.0, 1.0 / (fan_in as f64).sqrt()),
        }
    }
}

impl SimpleBackend for SeededWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let values = self.values(&shape, name, init);
        Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the seeded weight source needs a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// SD 1.5's layout (cross-attention down blocks then a plain one), two levels of 32 and 64
/// channels. One head: SD's 8 heads are 40 wide, 8 heads of 4 would make the 4096-token
/// self-attention of a 512² image cost more than the rest of this tiny model together.
pub fn unet_config() -> UNetConfig {
    serde_json::from_value(serde_json::json!({
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 1,
        "sample_size": 64,
    }))
    .expect("a valid UNet config")
}

/// A ControlNet for [`unet_config`], with a narrow hint encoder (still 8× downscaling).
pub fn controlnet_config() -> ControlNetConfig {
    let mut config = ControlNetConfig::from_unet(&unet_config());
    config.conditioning_embedding_out_channels = vec![8, 8, 16, 16];
    config
}

/// Four levels, so 8× like SD's VAE.
pub fn vae_config() -> VaeConfig {
    serde_json::from_value(serde_json::json!({
        "block_out_channels": [8, 8, 16, 16],
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }))
    .expect("a valid VAE config")
}

/// CLIP's real vocabulary (the embedded tokenizer's), a tiny transformer.
pub fn clip_config() -> ClipTextConfig {
    ClipTextConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        ..ClipTextConfig::sd15()
    }
}

impl StableDiffusion {
    /// The built-in default model (see the module docs).
    pub fn embedded(dtype: DType, device: &Device) -> Result<Self> {
        let vb = |seed_offset: u64| {
            SeededWeights::new(BASE_SEED.wrapping_add(seed_offset), true).var_builder(dtype, device)
        };
        Ok(Self {
            unet: UNet2DConditionModel::new(vb(1), &unet_config())?,
            vae: AutoencoderKL::new(vb(2), &vae_config())?,
            text_encoder: ClipTextModel::new(vb(3), &clip_config())?,
            tokenizer: ClipTokenizer::embedded(Family::Sd1)?,
            scheduler_config: SchedulerConfig::sd15(),
        })
    }
}

/// A generated ControlNet for the embedded model: `seed` tells one from another.
pub fn controlnet(seed: u64, dtype: DType, device: &Device) -> Result<ControlNetModel> {
    ControlNetModel::from_source(
        SeededWeights::new(seed, false),
        &controlnet_config(),
        dtype,
        device,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Request;

    #[test]
    fn weights_are_a_function_of_seed_and_name() {
        let w = SeededWeights::new(7, true);
        let shape = Shape::from((4, 3, 3, 3));
        let a = w.values(&shape, "conv_in.weight", Init::Const(0.5));
        assert!(a.iter().all(|&v| v == 0.5));
        let kaiming = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let a = w.values(&shape, "conv_in.weight", kaiming);
        assert_eq!(a, w.values(&shape, "conv_in.weight", kaiming));
        assert_ne!(a, w.values(&shape, "conv_out.weight", kaiming));
        assert_ne!(
            a,
            SeededWeights::new(8, true).values(&shape, "conv_in.weight", kaiming)
        );
        // A "trained" source fills zero-initialised matrices, not vectors.
        let trained = SeededWeights::new(7, false);
        assert!(trained
            .values(&shape, "zero.weight", Init::Const(0.0))
            .iter()
            .any(|&v| v != 0.0));
        assert!(trained
            .values(&Shape::from(4), "zero.bias", Init::Const(0.0))
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn embedded_model_generates_the_same_image_twice() {
        let dev = Device::Cpu;
        let sd = StableDiffusion::embedded(DType::F32, &dev).unwrap();
        let net = std::sync::Arc::new(controlnet(11, DType::F32, &dev).unwrap());
        let mut req = Request::txt2img("a house by a lake", 64, 48);
        req.steps = 3;
        req.seed = 42;
        req.controls.push(crate::pipeline::ControlSpec {
            net,
            image: image::RgbImage::from_fn(32, 32, |x, y| {
                image::Rgb([(x * 8) as u8, (y * 8) as u8, 0])
            }),
            resize: crate::images::ResizeMode::CropAndResize,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            mode: Default::default(),
            mask_hint: false,
        });
        let a = sd.generate(&req, |_, _| {}).unwrap();
        let b = StableDiffusion::embedded(DType::F32, &dev)
            .unwrap()
            .generate(&req, |_, _| {})
            .unwrap();
        assert_eq!(a.images[0].dimensions(), (64, 48));
        assert_eq!(a.images[0], b.images[0]);
        req.seed = 43;
        let c = sd.generate(&req, |_, _| {}).unwrap();
        assert_ne!(a.images[0], c.images[0]);
    }
}
