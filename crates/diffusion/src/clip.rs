//! `CLIPTextModel` (transformers), the text encoder of SD 1.x (OpenAI CLIP ViT-L/14's text
//! tower, `quick_gelu`) and SD 2.x (OpenCLIP ViT-H/14's, converted to the same module layout,
//! exact-erf `gelu`).
//!
//! candle-transformers has a CLIP text model, but it is not used: its config cannot be read
//! from `config.json` (private fields, `layer_norm_eps` fixed), and it maps `hidden_act: "gelu"`
//! to the tanh approximation where transformers' `"gelu"` is the exact erf form, the same
//! mismatch that broke the UNet's parity (see `blocks.rs`).
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{self as nn, VarBuilder};
use serde::Deserialize;
use std::path::{Path, PathBuf};

use crate::blocks::LayerNorm;
use crate::tokenizer::{TokenChunk, WeightedChunk};
use crate::weights::WeightFile;
use crate::Error;

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    8
}
fn default_max_positions() -> usize {
    77
}
fn default_quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`, its names and defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

/// The MLP activation, by transformers' `ACT2FN` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)` (OpenAI CLIP, SD 1.x).
    QuickGelu,
    /// `gelu`: the exact erf form, `torch.nn.functional.gelu`'s default (SD 2.x).
    Gelu,
}

impl Activation {
    fn forward(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Gelu => xs.gelu_erf(),
        }
    }
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        crate::config::read_json(path)
    }

    /// SD 1.x's text encoder (`openai/clip-vit-large-patch14`'s text config).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }

    pub fn activation(&self) -> crate::Result<Activation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(Error::Config(format!(
                "unsupported text encoder hidden_act {other:?} (SD 1.x uses quick_gelu, SD 2.x gelu)"
            ))),
        }
    }

    fn check(&self) -> crate::Result<()> {
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            return Err(Error::Config(format!(
                "text encoder: hidden_size {} cannot be split into {heads} heads",
                self.hidden_size
            )));
        }
        self.activation().map(|_| ())
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: nn::linear(d, d, vb.pp("q_proj"))?,
            k_proj: nn::linear(d, d, vb.pp("k_proj"))?,
            v_proj: nn::linear(d, d, vb.pp("v_proj"))?,
            out_proj: nn::linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            scale: 1.0 / ((d / c.num_attention_heads) as f64).sqrt(),
        })
    }

    /// [B, T, H*Dh] -> [B, H, T, Dh]
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        xs.reshape((b, t, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `mask` is `[T, T]`, f32, 0 where attention is allowed and -inf elsewhere.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let q = self.split_heads(&self.q_proj.forward(xs)?)?;
        let k = self.split_heads(&self.k_proj.forward(xs)?)?;
        let v = self.split_heads(&self.v_proj.forward(xs)?)?;
        let dtype = q.dtype();
        // As transformers: (q kᵀ) · scale + mask, softmax in f32, back to the model's dtype.
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * self.scale)?;
        let probs = nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?.to_dtype(dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    activation: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &ClipTextConfig, activation: Activation) -> Result<Self> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::with_eps(vb.pp("layer_norm1"), d, eps)?,
            self_attn: Attention::new(vb.pp("self_attn"), c)?,
            layer_norm2: LayerNorm::with_eps(vb.pp("layer_norm2"), d, eps)?,
            fc1: nn::linear(d, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: nn::linear(c.intermediate_size, d, vb.pp("mlp.fc2"))?,
            activation,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (xs + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let h = self.fc2.forward(&self.activation.forward(&h)?)?;
        xs + h
    }
}

/// The CLIP text transformer: token + position embeddings, pre-norm encoder layers with a
/// causal mask, final layer norm. Its weights are named as in transformers' `CLIPTextModel`
/// without the `text_model.` level (`embeddings.*`, `encoder.layers.*`, `final_layer_norm.*`).
#[derive(Debug)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: nn::Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// The causal mask for the longest input, made once (an upload) and narrowed per call.
    mask: Tensor,
}

/// The weight file of a transformers model folder, in transformers' order of preference (and
/// diffusers' `fp16` variant names).
fn transformers_weight_file(dir: &Path) -> crate::Result<PathBuf> {
    crate::first_file(
        dir,
        &[
            "model.safetensors",
            "model.fp16.safetensors",
            "pytorch_model.bin",
            "pytorch_model.fp16.bin",
        ],
    )
}

impl ClipTextModel {
    /// `vb` is at the model's root (inside `text_model.` when the file has that level).
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> crate::Result<Self> {
        config.check()?;
        let activation = config.activation()?;
        let d = config.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding = nn::embedding(config.vocab_size, d, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (config.max_position_embeddings, d),
            "position_embedding.weight",
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), config, activation))
            .collect::<Result<_>>()?;
        let final_layer_norm =
            LayerNorm::with_eps(vb.pp("final_layer_norm"), d, config.layer_norm_eps)?;
        let mask = causal_mask(config.max_position_embeddings, vb.device())?;
        Ok(Self {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            mask,
        })
    }

    /// Loads a diffusers `text_encoder/` folder (`config.json` and `model.safetensors`, or
    /// the `.fp16.safetensors` / `pytorch_model.bin` variants). Both key layouts load: with the
    /// `text_model.` level (everything saved before transformers 5.6, e.g. every SD repository)
    /// and without it (transformers >= 5.6, which flattened `CLIPTextModel`).
    pub fn from_diffusers_dir(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let weights = WeightFile::open(&transformers_weight_file(dir)?)?;
        let root = text_model_root(&weights)?;
        let vb = weights.into_var_builder(dtype, device);
        Self::new(if root.is_empty() { vb } else { vb.pp(root) }, &config)
    }

    /// Loads the text encoder of an original SD 1.x single-file checkpoint
    /// (`v1-5-pruned-emaonly.safetensors`, keys `cond_stage_model.transformer.*`). `config`
    /// defaults to the one read off the tensor shapes (see [`crate::ldm::infer_clip_config`]).
    pub fn from_single_file(
        path: &Path,
        config: Option<ClipTextConfig>,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        let file = WeightFile::open(path)?;
        let config = match config {
            Some(c) => c,
            None => crate::ldm::infer_clip_config(&file)?,
        };
        let renames = crate::ldm::clip_renames(&file)?;
        let vb = file
            .with_renames(renames, crate::ldm::ORIGINAL_SD_LAYOUT)
            .into_var_builder(dtype, device);
        Self::new(vb, &config)
    }

    pub fn dtype(&self) -> DType {
        self.position_embedding.dtype()
    }

    pub fn device(&self) -> &Device {
        self.position_embedding.device()
    }

    /// The last hidden state after `final_layer_norm`, `[B, T, D]`, for token ids `[B, T]`
    /// (u32 or i64, T at most `max_position_embeddings`). What diffusers conditions on.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_clip_skip(input_ids, 0)
    }

    /// diffusers' `clip_skip`: the hidden state `clip_skip` layers before the last, through
    /// `final_layer_norm` (`hidden_states[-(clip_skip + 1)]`); 0 is [`Self::forward`].
    ///
    /// A1111's "Clip skip" setting counts differently: its 1 is the normal output and its 2
    /// (the usual choice for anime-style SD 1.x models) is diffusers' `clip_skip = 1`, so
    /// diffusers' value is A1111's minus one.
    ///
    /// The ids are checked against the vocabulary, which reads them back (a device→host copy);
    /// [`Self::encode_chunks`] checks them on the host instead.
    pub fn forward_with_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let ids = input_ids.to_dtype(DType::U32)?;
        let ids_host = crate::transfer::download::<u32>(&ids)?;
        self.check_ids(&ids_host)?;
        self.run(&ids, clip_skip)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&top) = ids.iter().max() {
            if top as usize >= self.config.vocab_size {
                candle_core::bail!(
                    "token id {top} is outside the text encoder's vocabulary of {}",
                    self.config.vocab_size
                )
            }
        }
        Ok(())
    }

    /// [`Self::forward_with_clip_skip`] for u32 ids already checked.
    fn run(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let n_layers = self.layers.len();
        if clip_skip > n_layers {
            candle_core::bail!("clip_skip {clip_skip} is more than the {n_layers} encoder layers")
        }
        let (_, t) = ids.dims2()?;
        let max = self.config.max_position_embeddings;
        if t > max {
            candle_core::bail!("{t} tokens, the text encoder takes at most {max}")
        }
        let positions = self.position_embedding.narrow(0, 0, t)?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&positions)?;
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        for layer in &self.layers[..n_layers - clip_skip] {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// The conditioning of a chunked prompt (see
    /// [`crate::tokenizer::ClipTokenizer::encode_chunks`]): every chunk encoded on its own, the
    /// results concatenated along the sequence axis, `[1, 77 · chunks, D]`.
    pub fn encode_chunks(&self, chunks: &[TokenChunk], clip_skip: usize) -> Result<Tensor> {
        if chunks.is_empty() {
            candle_core::bail!("no token chunks to encode")
        }
        let flat: Vec<u32> = chunks.iter().flatten().copied().collect();
        self.check_ids(&flat)?;
        let ids = crate::transfer::upload(flat, (chunks.len(), chunks[0].len()), self.device())?;
        let out = self.run(&ids, clip_skip)?;
        let (n, t, d) = out.dims3()?;
        out.reshape((1, n * t, d))
    }

    /// The conditioning of a prompt in A1111's syntax (see
    /// [`crate::tokenizer::ClipTokenizer::encode_weighted_chunks`]): [`Self::encode_chunks`],
    /// then each chunk's emphasis applied ([`apply_emphasis`]). Chunks whose weights are all 1
    /// are left as encoded, so a prompt without emphasis gives exactly what
    /// [`Self::encode_chunks`] gives for the same tokens.
    pub fn encode_weighted_chunks(
        &self,
        chunks: &[WeightedChunk],
        clip_skip: usize,
    ) -> Result<Tensor> {
        let tokens: Vec<TokenChunk> = chunks.iter().map(|c| c.tokens).collect();
        let z = self.encode_chunks(&tokens, clip_skip)?;
        let plain = |c: &WeightedChunk| c.weights.iter().all(|&w| w == 1.0);
        if chunks.iter().all(plain) {
            return Ok(z);
        }
        let t = chunks[0].tokens.len();
        let parts = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let zi = z.narrow(1, i * t, t)?;
                if plain(c) {
                    Ok(zi)
                } else {
                    apply_emphasis(&zi, &c.weights)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }
}

/// Below this fraction of the chunk's mean absolute value, a mean is too close to zero for
/// [`apply_emphasis`] to divide by.
pub const EMPHASIS_MEAN_FLOOR: f64 = 1e-4;

/// A1111's emphasis ("Original") on one encoded chunk `z` `[1, T, D]` with a weight per
/// position: z · weight (per token), then scaled by mean(z) / mean(z · weight) so that the mean
/// over the whole chunk is what it was. Computed in f32, returned in `z`'s dtype, on the device
/// (nothing is read back). Differences from A1111: it rounds the original mean to the model's
/// dtype first (a relative scale error of up to 2⁻¹¹ in f16), this does not; and when either
/// mean is within [`EMPHASIS_MEAN_FLOOR`] × mean |z · weight| of zero (a text encoder whose
/// final layer norm has no bias, like the built-in random model's: A1111's ratio is then noise
/// and can overflow), the mean is not restored.
pub fn apply_emphasis(z: &Tensor, weights: &[f32]) -> Result<Tensor> {
    let (_, t, _) = z.dims3()?;
    if weights.len() != t {
        candle_core::bail!("{} weights for {t} positions", weights.len())
    }
    let z32 = z.to_dtype(DType::F32)?;
    let original = z32.mean_all()?;
    let w = crate::transfer::upload(weights.to_vec(), (1, t, 1), z.device())?;
    let weighted = z32.broadcast_mul(&w)?;
    let new = weighted.mean_all()?;
    let floor = weighted
        .abs()?
        .mean_all()?
        .affine(EMPHASIS_MEAN_FLOOR, 0.0)?;
    let usable = original.abs()?.minimum(&new.abs()?)?.gt(&floor)?;
    let ratio = usable.where_cond(
        &(original / new)?,
        &Tensor::ones((), DType::F32, z.device())?,
    )?;
    weighted.broadcast_mul(&ratio)?.to_dtype(z.dtype())
}

/// 0 on and below the diagonal, -inf above: token i sees tokens 0..=i.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    crate::transfer::upload(mask, (t, t), device)
}

/// `"text_model"` or `""`: where the weights of a transformers CLIP text model file start.
fn text_model_root(file: &WeightFile) -> crate::Result<&'static str> {
    const PROBE: &str = "embeddings.token_embedding.weight";
    if file.stored_shape(&format!("text_model.{PROBE}")).is_some() {
        Ok("text_model")
    } else if file.stored_shape(PROBE).is_some() {
        Ok("")
    } else {
        Err(Error::Weights(format!(
            "{}: not a CLIP text model (neither `text_model.{PROBE}` nor `{PROBE}`)",
            file.path().display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The activations against values of transformers' definitions: `gelu` is the exact erf
    /// form (the tanh approximation is ~1.5e-4 off at x = 1), `quick_gelu` is x·σ(1.702x).
    /// The fixture's small model alone tells erf from tanh by only a few times its bound.
    #[test]
    fn activations_are_transformers_definitions() {
        let xs = Tensor::new(&[1.0f64, -1.5, 2.0], &Device::Cpu).unwrap();
        let values = |a: Activation| a.forward(&xs).unwrap().to_vec1::<f64>().unwrap();
        // 0.5·x·(1 + erf(x/√2)), from torch.nn.functional.gelu in float64.
        let gelu = [
            0.841_344_746_068_543,
            -0.100_210_801_903_287_05,
            1.954_499_736_103_641_6,
        ];
        for (a, b) in values(Activation::Gelu).iter().zip(gelu) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        let quick = [1.0, -1.5, 2.0].map(|x: f64| x / (1.0 + (-1.702 * x).exp()));
        for (a, b) in values(Activation::QuickGelu).iter().zip(quick) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
    }

    #[test]
    fn causal_mask_lets_each_token_see_itself_and_the_past() {
        let m = causal_mask(3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[1][..2], [0.0, 0.0]);
        assert_eq!(m[1][2], f32::NEG_INFINITY);
        assert_eq!(m[2], [0.0; 3]);
    }
}
