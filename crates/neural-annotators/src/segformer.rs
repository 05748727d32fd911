//! SegFormer semantic segmentation on the ADE20K palette (`seg_segformer`, our addition to A1111's
//! list), from the Hugging Face `nvidia/segformer-b{0..5}-finetuned-ade-{512-512,640-640}`
//! folders (`config.json` + `model.safetensors`, or the older `pytorch_model.bin`), as
//! transformers 5.24 runs them: `SegformerImageProcessor` (its default, torchvision backend),
//! `SegformerForSemanticSegmentation`, `post_process_semantic_segmentation`.
//!
//! # Reference steps, for the image at its detect size (`h`×`w`, RGB)
//!
//! 1. [`processor_resize`]: the uint8 image resized to the processor's `size` (512×512, or
//!    640×640 for the `-640-640` checkpoints; the aspect ratio is not kept) with
//!    `tvF.resize(…, BILINEAR, antialias=True)` on the uint8 tensor, which on x86 with AVX2 or
//!    AVX-512 (and on ARM) is torch's native uint8 kernel: separable (horizontal pass first, a
//!    uint8 intermediate), triangle filter widened by the downscale factor (PIL's "support"),
//!    weights normalised per output pixel and rounded to int16 fixed point with the largest
//!    precision that keeps the largest weight below 2^15, integer accumulation, `>> precision`,
//!    clamped to 0..255. Reproduced exactly here on the host. (On CPUs without AVX2 torchvision
//!    resizes in float32 and rounds instead, which can differ by one grey level; the PIL backend,
//!    `SegformerImageProcessorPil`, uses 22-bit weights and can differ likewise.)
//! 2. [`pixel_values`]: `(x − 255·mean) / (255·std)` in f32 with ImageNet's mean and std (the
//!    processor fuses rescale and normalise: `mean·(1/rescale_factor)` computed in f32), NCHW.
//! 3. [`Segformer::forward`]: the Mix Transformer encoder — per stage an overlapping patch
//!    embedding (conv `k`, stride `s`, padding `k/2`, then LayerNorm), blocks of efficient
//!    self-attention (keys and values from a `sr×sr`, stride-`sr` conv of the tokens plus
//!    LayerNorm when `sr > 1`; scores scaled by `head_dim^-½`, softmax) and Mix-FFN
//!    (`dense1`, 3×3 depthwise conv, exact erf GELU, `dense2`), pre-norm residuals, a final
//!    LayerNorm — and the all-MLP decode head: each stage projected to `decoder_hidden_size`,
//!    bilinearly resized (`align_corners=False`) to stage 1's size, concatenated deepest first,
//!    1×1 conv (no bias), BatchNorm, ReLU, 1×1 classifier conv (with bias) → logits at ¼ of
//!    the processor size. Every LayerNorm has torch's default ε = 1e-5 (the model never reads
//!    `config.layer_norm_eps`), the BatchNorm ε = 1e-5; dropout and drop-path are identities.
//! 4. [`labels_from_logits`]: the logits resized bilinearly (`align_corners=False`) to `h`×`w`,
//!    argmax over the classes (first maximum on ties, as torch).
//! 5. [`hint_from_labels`]: each pixel gets its class's ADE20K palette colour
//!    ([`crate::ade20k::PALETTE`], the same class order: the hub `id2label` is mmseg's ADE20K
//!    class list, 0 = wall … 149 = flag).
//!
//! Weight names are the hub checkpoints' (transformers 4.x) keys, `segformer.encoder.…` and
//! `decode_head.…`, which transformers 5 renames at load; `decode_head.batch_norm.
//! num_batches_tracked` is not read.
//!
//! candle-transformers 0.11.1's `models/segformer.rs` has the same key names but is not used:
//! it builds its LayerNorms and BatchNorm with `config.layer_norm_eps` (1e-6 instead of
//! 1e-5), upsamples the decode head's maps with nearest instead of bilinear, and builds the
//! classifier without its bias.
//!
//! Device and dtype: the weights live on `vb.device()` in `vb.dtype()` (the batch norm and the
//! `linear_c` projections are folded into `linear_fuse` at load, in f32: see
//! [`Segformer::forward`]); the resized uint8 image goes up once, normalisation and
//! the network run on the device, the logits are resized and argmaxed there in f32, and the
//! uint8 label map comes back once.
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use image::RgbImage;

use crate::tensor_ops::{attention, ScaleAt};
use crate::{Detector, Result};

/// The preprocessor this network serves.
pub const PREPROCESSOR: &str = "seg_segformer";
/// `nn.LayerNorm`'s and `nn.BatchNorm2d`'s default ε, which every norm of the model uses.
const NORM_EPS: f64 = 1e-5;
/// ImageNet's mean and std (`IMAGENET_DEFAULT_MEAN`/`_STD`), in the processor's f32.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The architecture, as `SegformerConfig` (the hub's `config.json`), plus the size the image
/// processor resizes to (`preprocessor_config.json`'s `size`).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub num_channels: usize,
    pub num_encoder_blocks: usize,
    pub depths: Vec<usize>,
    pub sr_ratios: Vec<usize>,
    pub hidden_sizes: Vec<usize>,
    pub patch_sizes: Vec<usize>,
    pub strides: Vec<usize>,
    pub num_attention_heads: Vec<usize>,
    pub mlp_ratios: Vec<f64>,
    pub decoder_hidden_size: usize,
    /// Number of classes (`len(id2label)`; 150 for ADE20K).
    pub num_labels: usize,
    /// `(height, width)` of the processor's resize.
    pub processor_size: (usize, usize),
}

impl Config {
    /// MiT-b`n` with the ADE20K head (150 classes) and processor size 512×512; the sizes of
    /// SegFormer's paper (Table 6), which transformers' SegformerConfig defaults are for b0.
    fn mit(hidden_sizes: [usize; 4], depths: [usize; 4], decoder_hidden_size: usize) -> Self {
        Self {
            num_channels: 3,
            num_encoder_blocks: 4,
            depths: depths.to_vec(),
            sr_ratios: vec![8, 4, 2, 1],
            hidden_sizes: hidden_sizes.to_vec(),
            patch_sizes: vec![7, 3, 3, 3],
            strides: vec![4, 2, 2, 2],
            num_attention_heads: vec![1, 2, 5, 8],
            mlp_ratios: vec![4.0; 4],
            decoder_hidden_size,
            num_labels: 150,
            processor_size: (512, 512),
        }
    }

    /// `nvidia/segformer-b0-finetuned-ade-512-512`.
    pub fn b0() -> Self {
        Self::mit([32, 64, 160, 256], [2, 2, 2, 2], 256)
    }
    /// `nvidia/segformer-b1-finetuned-ade-512-512`.
    pub fn b1() -> Self {
        Self::mit([64, 128, 320, 512], [2, 2, 2, 2], 256)
    }
    /// `nvidia/segformer-b2-finetuned-ade-512-512`.
    pub fn b2() -> Self {
        Self::mit([64, 128, 320, 512], [3, 4, 6, 3], 768)
    }
    /// `nvidia/segformer-b3-finetuned-ade-512-512`.
    pub fn b3() -> Self {
        Self::mit([64, 128, 320, 512], [3, 4, 18, 3], 768)
    }
    /// `nvidia/segformer-b4-finetuned-ade-512-512`.
    pub fn b4() -> Self {
        Self::mit([64, 128, 320, 512], [3, 8, 27, 3], 768)
    }
    /// MiT-b5 with processor size 512×512 (use [`Config::ade_b5`] for the hub's ADE20K b5).
    pub fn b5() -> Self {
        Self::mit([64, 128, 320, 512], [3, 6, 40, 3], 768)
    }
    /// `nvidia/segformer-b5-finetuned-ade-640-640` (processor size 640×640): the default, and
    /// the one benchmarked.
    pub fn ade_b5() -> Self {
        Self::b5().with_processor_size(640, 640)
    }

    /// The same architecture with the processor resizing to `height`×`width`.
    pub fn with_processor_size(mut self, height: usize, width: usize) -> Self {
        self.processor_size = (height, width);
        self
    }

    /// Parses a hub `config.json` (a `SegformerConfig`; absent fields take its defaults).
    /// The processor size is 512×512; see [`Config::with_preprocessor_json`].
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let err = |m: String| diffusion::Error::Config(format!("segformer config.json: {m}"));
        let json =
            serde_json::from_str::<serde_json::Value>(text).map_err(|e| err(e.to_string()))?;
        let d = Self::b0();
        let usize_of = |key: &str, default: usize| -> Result<usize> {
            match json.get(key) {
                None => Ok(default),
                Some(v) => {
                    as_usize(v).ok_or_else(|| err(format!("`{key}` is not a non-negative integer")))
                }
            }
        };
        let list_of = |key: &str, default: &[usize]| -> Result<Vec<usize>> {
            match json.get(key) {
                None => Ok(default.to_vec()),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(as_usize).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| err(format!("`{key}` is not a list of integers"))),
            }
        };
        if let Some(t) = json.get("model_type").and_then(|v| v.as_str()) {
            if t != "segformer" {
                return Err(err(format!("model_type `{t}`, expected `segformer`")));
            }
        }
        let act = json
            .get("hidden_act")
            .map(|v| v.as_str().unwrap_or("?"))
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(err(format!(
                "hidden_act `{act}` (only `gelu` is supported)"
            )));
        }
        if let Some(v) = json.get("reshape_last_stage") {
            if v.as_bool() != Some(true) {
                return Err(err("reshape_last_stage must be true".into()));
            }
        }
        let mlp_ratios = match json.get("mlp_ratios") {
            None => d.mlp_ratios.clone(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<_>>>())
                .ok_or_else(|| err("`mlp_ratios` is not a list of numbers".into()))?,
        };
        let num_labels = match (json.get("id2label"), json.get("num_labels")) {
            (Some(m), _) => m
                .as_object()
                .map(|o| o.len())
                .ok_or_else(|| err("`id2label` is not an object".into()))?,
            (None, Some(n)) => {
                as_usize(n).ok_or_else(|| err("`num_labels` is not an integer".into()))?
            }
            // PretrainedConfig's default.
            (None, None) => 2,
        };
        let cfg = Self {
            num_channels: usize_of("num_channels", d.num_channels)?,
            num_encoder_blocks: usize_of("num_encoder_blocks", d.num_encoder_blocks)?,
            depths: list_of("depths", &d.depths)?,
            sr_ratios: list_of("sr_ratios", &d.sr_ratios)?,
            hidden_sizes: list_of("hidden_sizes", &d.hidden_sizes)?,
            patch_sizes: list_of("patch_sizes", &d.patch_sizes)?,
            strides: list_of("strides", &d.strides)?,
            num_attention_heads: list_of("num_attention_heads", &d.num_attention_heads)?,
            mlp_ratios,
            decoder_hidden_size: usize_of("decoder_hidden_size", d.decoder_hidden_size)?,
            num_labels,
            processor_size: d.processor_size,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Takes the processor size from a hub `preprocessor_config.json`: `size` as an integer
    /// (square, as the old `SegformerFeatureExtractor` files have it) or `{height, width}`.
    pub fn with_preprocessor_json(self, text: &str) -> Result<Self> {
        let err =
            |m: String| diffusion::Error::Config(format!("segformer preprocessor_config: {m}"));
        let json =
            serde_json::from_str::<serde_json::Value>(text).map_err(|e| err(e.to_string()))?;
        let size = match json.get("size") {
            None => return Ok(self),
            Some(s) => s,
        };
        if let Some(n) = as_usize(size) {
            return Ok(self.with_processor_size(n, n));
        }
        match (
            size.get("height").and_then(as_usize),
            size.get("width").and_then(as_usize),
        ) {
            (Some(h), Some(w)) => Ok(self.with_processor_size(h, w)),
            _ => Err(err(
                "`size` is neither an integer nor {height, width}".into()
            )),
        }
    }

    fn validate(&self) -> Result<()> {
        let n = self.num_encoder_blocks;
        let lists = [
            ("depths", self.depths.len()),
            ("sr_ratios", self.sr_ratios.len()),
            ("hidden_sizes", self.hidden_sizes.len()),
            ("patch_sizes", self.patch_sizes.len()),
            ("strides", self.strides.len()),
            ("num_attention_heads", self.num_attention_heads.len()),
            ("mlp_ratios", self.mlp_ratios.len()),
        ];
        for (name, len) in lists {
            if len < n {
                return Err(diffusion::Error::Config(format!(
                    "segformer config: `{name}` has {len} entries for {n} encoder blocks"
                )));
            }
        }
        for i in 0..n {
            if self.num_attention_heads[i] == 0
                || !self.hidden_sizes[i].is_multiple_of(self.num_attention_heads[i])
            {
                return Err(diffusion::Error::Config(format!(
                    "segformer config: hidden size {} not a multiple of {} heads",
                    self.hidden_sizes[i], self.num_attention_heads[i]
                )));
            }
            if self.strides[i] == 0 || self.sr_ratios[i] == 0 {
                return Err(diffusion::Error::Config(
                    "segformer config: zero stride or sr_ratio".into(),
                ));
            }
        }
        if n == 0 || self.num_labels == 0 {
            return Err(diffusion::Error::Config(
                "segformer config: no encoder block or no label".into(),
            ));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::ade_b5()
    }
}

/// A dense convolution `(out, in, k, k)` with bias, as `nn.Conv2d`.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, k: usize, stride: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: vb.get(cout, "bias")?.reshape((1, cout, 1, 1))?,
            stride,
            padding: k / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
            .broadcast_add(&self.bias)
    }
}

/// `(B, C, H, W)` → `(B, H·W, C)`.
fn to_tokens(x: &Tensor) -> candle_core::Result<Tensor> {
    x.flatten_from(2)?.transpose(1, 2)?.contiguous()
}

/// `(B, H·W, C)` → `(B, C, H, W)`.
fn to_map(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))
}

/// `SegformerEfficientSelfAttention` + `SegformerSelfOutput` (hub names `attention.self.*`,
/// `attention.output.dense`).
#[derive(Debug, Clone)]
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    /// Sequence reduction: the `sr×sr` stride-`sr` conv and its LayerNorm.
    sr: Option<(Conv, LayerNorm)>,
    dense: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: usize, heads: usize, sr: usize) -> Result<Self> {
        let s = vb.pp("self");
        let sr = if sr > 1 {
            let mut conv = Conv::new(s.pp("sr"), c, c, sr, sr)?;
            conv.padding = 0;
            Some((
                conv,
                candle_nn::layer_norm(c, NORM_EPS, s.pp("layer_norm"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            query: candle_nn::linear(c, c, s.pp("query"))?,
            key: candle_nn::linear(c, c, s.pp("key"))?,
            value: candle_nn::linear(c, c, s.pp("value"))?,
            sr,
            dense: candle_nn::linear(c, c, vb.pp("output").pp("dense"))?,
            heads,
            head_dim: c / heads,
        })
    }

    /// `(B, N, C)` → `(B, heads, N, head_dim)`.
    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let q = self.split_heads(&self.query.forward(x)?)?;
        let kv = match &self.sr {
            Some((conv, ln)) => ln.forward(&to_tokens(&conv.forward(&to_map(x, h, w)?)?)?)?,
            None => x.clone(),
        };
        let k = self.split_heads(&self.key.forward(&kv)?)?;
        let v = self.split_heads(&self.value.forward(&kv)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let y = attention(&q, &k, &v, scale, ScaleAt::Scores)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, c))?;
        self.dense.forward(&y)
    }
}

/// `SegformerMixFFN`: `dense1`, 3×3 depthwise conv (`dwconv.dwconv`), erf GELU, `dense2`.
#[derive(Debug, Clone)]
struct MixFfn {
    dense1: Linear,
    /// The depthwise kernel's nine taps, each `(hidden,)`, row-major over `(ky, kx)`.
    taps: Vec<Tensor>,
    dw_bias: Tensor,
    dense2: Linear,
}

impl MixFfn {
    fn new(vb: VarBuilder, c: usize, hidden: usize) -> Result<Self> {
        let dw = vb.pp("dwconv").pp("dwconv");
        let wt = dw.get((hidden, 1, 3, 3), "weight")?.reshape((hidden, 9))?;
        let taps = (0..9)
            .map(|t| wt.narrow(1, t, 1)?.flatten_all()?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            dense1: candle_nn::linear(c, hidden, vb.pp("dense1"))?,
            taps,
            dw_bias: dw.get(hidden, "bias")?,
            dense2: candle_nn::linear(hidden, c, vb.pp("dense2"))?,
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let y = self.dense1.forward(x)?;
        let hidden = y.dim(2)?;
        let y = depthwise3x3_nhwc(&y.reshape((b, h, w, hidden))?, &self.taps, &self.dw_bias)?;
        let y = y.gelu_erf()?.reshape((b, n, hidden))?;
        self.dense2.forward(&y)
    }
}

/// A 3×3 depthwise convolution (padding 1, stride 1) with bias on a channels-last `(B, H, W, C)`
/// tensor, as nine shifted multiply-adds (candle runs grouped convolutions one group at a time).
/// On the zero-padded map flattened to `(B, (H+2)·(W+2) + 2, C)`, tap `(ky, kx)` of every output
/// pixel is one contiguous slice starting at `ky·(W+2) + kx` (outputs laid out `H × (W+2)`;
/// the two extra columns are dropped at the end).
fn depthwise3x3_nhwc(x: &Tensor, taps: &[Tensor], bias: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let wp = w + 2;
    let xp = x
        .pad_with_zeros(1, 1, 1)?
        .pad_with_zeros(2, 1, 1)?
        .reshape((b, (h + 2) * wp, c))?
        .pad_with_zeros(1, 0, 2)?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..3 {
        for kx in 0..3 {
            let t = xp
                .narrow(1, ky * wp + kx, h * wp)?
                .broadcast_mul(&taps[ky * 3 + kx])?;
            acc = Some(match acc {
                None => t,
                Some(a) => (a + t)?,
            });
        }
    }
    acc.expect("nine taps")
        .broadcast_add(bias)?
        .reshape((b, h, wp, c))?
        .narrow(2, 0, w)?
        .contiguous()
}

/// `SegformerLayer`: pre-norm attention and Mix-FFN, each with a residual.
#[derive(Debug, Clone)]
struct Layer {
    norm1: LayerNorm,
    attention: Attention,
    norm2: LayerNorm,
    mlp: MixFfn,
}

impl Layer {
    fn new(vb: VarBuilder, c: usize, heads: usize, sr: usize, mlp_ratio: f64) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::layer_norm(c, NORM_EPS, vb.pp("layer_norm_1"))?,
            attention: Attention::new(vb.pp("attention"), c, heads, sr)?,
            norm2: candle_nn::layer_norm(c, NORM_EPS, vb.pp("layer_norm_2"))?,
            // `int(hidden_size * mlp_ratio)`.
            mlp: MixFfn::new(vb.pp("mlp"), c, (c as f64 * mlp_ratio) as usize)?,
        })
    }

    fn forward(&self, x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
        let x = (self.attention.forward(&self.norm1.forward(x)?, h, w)? + x)?;
        self.mlp.forward(&self.norm2.forward(&x)?, h, w)? + x
    }
}

/// One encoder stage: overlapping patch embedding, blocks, final LayerNorm.
#[derive(Debug, Clone)]
struct Stage {
    proj: Conv,
    embed_norm: LayerNorm,
    blocks: Vec<Layer>,
    norm: LayerNorm,
}

impl Stage {
    /// `(B, C_in, H, W)` → `(B, C, H', W')`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.proj.forward(x)?;
        let (_, _, h, w) = y.dims4()?;
        let mut t = self.embed_norm.forward(&to_tokens(&y)?)?;
        for block in &self.blocks {
            t = block.forward(&t, h, w)?;
        }
        to_map(&self.norm.forward(&t)?, h, w)
    }
}

/// `SegformerForSemanticSegmentation`, weights named as the hub checkpoints' state dict.
#[derive(Debug, Clone)]
pub struct Segformer {
    stages: Vec<Stage>,
    /// Per stage, `linear_fuse`'s block for that stage (with the batch norm's scale) times
    /// `decode_head.linear_c.{i}.proj`'s weight: `(D, C_i)`.
    head_weights: Vec<Tensor>,
    /// Every bias before the ReLU: `linear_fuse · (proj biases)` and the batch norm's shift,
    /// `(1, D, 1)`.
    head_bias: Tensor,
    /// The classifier as `(L, D)` and `(1, L, 1)`.
    cls_weight: Tensor,
    cls_bias: Tensor,
    cfg: Config,
    device: Device,
    dtype: DType,
}

impl Segformer {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.num_encoder_blocks;
        let enc = vb.pp("segformer").pp("encoder");
        let mut stages = Vec::with_capacity(n);
        for i in 0..n {
            let c = cfg.hidden_sizes[i];
            let cin = if i == 0 {
                cfg.num_channels
            } else {
                cfg.hidden_sizes[i - 1]
            };
            let pe = enc.pp("patch_embeddings").pp(i);
            let blocks = (0..cfg.depths[i])
                .map(|j| {
                    Layer::new(
                        enc.pp("block").pp(i).pp(j),
                        c,
                        cfg.num_attention_heads[i],
                        cfg.sr_ratios[i],
                        cfg.mlp_ratios[i],
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            stages.push(Stage {
                proj: Conv::new(pe.pp("proj"), cin, c, cfg.patch_sizes[i], cfg.strides[i])?,
                embed_norm: candle_nn::layer_norm(c, NORM_EPS, pe.pp("layer_norm"))?,
                blocks,
                norm: candle_nn::layer_norm(c, NORM_EPS, enc.pp("layer_norm").pp(i))?,
            });
        }
        let head = vb.pp("decode_head");
        let d = cfg.decoder_hidden_size;
        let f32w = |vb: &VarBuilder, shape: &[usize], name: &str| {
            vb.get_with_hints_dtype(shape, name, Default::default(), DType::F32)
        };
        // torch's eval batch norm: y = x·α + β, α = γ / sqrt(var + ε), β = b − mean·α.
        let fuse = f32w(&head.pp("linear_fuse"), &[d, d * n, 1, 1], "weight")?;
        let bn = head.pp("batch_norm");
        let gamma = f32w(&bn, &[d], "weight")?;
        let beta = f32w(&bn, &[d], "bias")?;
        let mean = f32w(&bn, &[d], "running_mean")?;
        let var = f32w(&bn, &[d], "running_var")?;
        let alpha = gamma.div(&(var + NORM_EPS)?.sqrt()?)?;
        let fuse = fuse
            .reshape((d, d * n))?
            .broadcast_mul(&alpha.reshape((d, 1))?)?;
        let mut bias = (beta - mean.mul(&alpha)?)?.reshape((d, 1))?;
        let dtype = vb.dtype();
        let mut head_weights = Vec::with_capacity(n);
        for i in 0..n {
            let proj = head.pp("linear_c").pp(i).pp("proj");
            let w = f32w(&proj, &[d, cfg.hidden_sizes[i]], "weight")?;
            let b = f32w(&proj, &[d], "bias")?.reshape((d, 1))?;
            // The concatenation puts the deepest stage first.
            let block = fuse.narrow(1, (n - 1 - i) * d, d)?;
            head_weights.push(block.matmul(&w)?.to_dtype(dtype)?);
            bias = (bias + block.matmul(&b)?)?;
        }
        let cls = head.pp("classifier");
        let l = cfg.num_labels;
        Ok(Self {
            stages,
            head_weights,
            head_bias: bias.reshape((1, d, 1))?.to_dtype(dtype)?,
            cls_weight: cls.get((l, d, 1, 1), "weight")?.reshape((l, d))?,
            cls_bias: cls.get(l, "bias")?.reshape((1, l, 1))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The logits `(B, num_labels, H₁, W₁)` (stage 1's size, ¼ of the input) for
    /// `pixel_values` `(B, 3, H, W)` (normalised, on the network's device and dtype).
    ///
    /// The decode head runs in an equivalent order: the reference projects each stage with
    /// `linear_c`, resizes it to stage 1's size, concatenates and applies `linear_fuse`; all
    /// three are linear and the bilinear weights of each output pixel sum to one, so each stage
    /// is mapped with `linear_fuse`'s block times `linear_c` (one `(D, C_i)` matrix) at its own
    /// size, resized, and the four summed. Same function; ~15× fewer operations for b5 at 640
    /// (the 4D→D 1×1 conv at stage 1's size dominated), and f32 outputs within ~1e-6 of the
    /// reference's.
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = pixel_values.clone();
        let mut maps = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            x = stage.forward(&x)?;
            maps.push(x.clone());
        }
        let (b, _, h1, w1) = maps[0].dims4()?;
        let d = self.cfg.decoder_hidden_size;
        let mut sum: Option<Tensor> = None;
        for (map, weight) in maps.iter().zip(&self.head_weights).rev() {
            let (_, c, h, w) = map.dims4()?;
            let y = weight.broadcast_matmul(&map.reshape((b, c, h * w))?)?;
            let y = if (h, w) == (h1, w1) {
                y
            } else {
                let y = y.reshape((b, d, h, w))?;
                crate::tensor_ops::interpolate_bilinear(&y, (h1, w1), false)?.reshape((
                    b,
                    d,
                    h1 * w1,
                ))?
            };
            sum = Some(match sum {
                None => y,
                Some(s) => (s + y)?,
            });
        }
        let y = sum
            .expect("at least one stage")
            .broadcast_add(&self.head_bias)?
            .relu()?;
        let logits = self
            .cls_weight
            .broadcast_matmul(&y)?
            .broadcast_add(&self.cls_bias)?;
        logits.reshape((b, self.cfg.num_labels, h1, w1))
    }

    /// Steps 1–3: the logits for `image` (at its detect size), on the device.
    pub fn logits(&self, image: &RgbImage) -> Result<Tensor> {
        let (ph, pw) = self.cfg.processor_size;
        let resized = processor_resize(image, ph, pw);
        let x = pixel_values(&resized, &self.device)?.to_dtype(self.dtype)?;
        Ok(self.forward(&x)?)
    }
}

impl Detector for Segformer {
    fn detect(&self, preprocessor: &str, image: &RgbImage, _params: &[f64]) -> Result<RgbImage> {
        if preprocessor != PREPROCESSOR {
            return Err(diffusion::Error::Config(format!(
                "SegFormer does not serve `{preprocessor}`"
            )));
        }
        let (w, h) = (image.width() as usize, image.height() as usize);
        let logits = self.logits(image)?;
        let labels = labels_from_logits(&logits, h, w)?;
        Ok(hint_from_labels(&labels, w, h))
    }
}

/// Step 2: the processor's `pixel_values` `(1, 3, h, w)` f32 on `device` for the resized image:
/// `(x − mean·255) / (std·255)` per channel, in f32 as torch computes it.
pub fn pixel_values(resized: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (resized.width() as usize, resized.height() as usize);
    let x = Tensor::from_vec(resized.as_raw().clone(), (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_dtype(DType::F32)?;
    let mean: Vec<f32> = MEAN.iter().map(|m| m * 255.0).collect();
    let std: Vec<f32> = STD.iter().map(|s| s * 255.0).collect();
    let mean = Tensor::from_vec(mean, (1, 3, 1, 1), device)?;
    let std = Tensor::from_vec(std, (1, 3, 1, 1), device)?;
    Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?.contiguous()?)
}

/// Step 4: the class map (`height`×`width`, row-major) from logits `(1, L, h, w)` (any dtype,
/// on any device): bilinear resize in f32 (`align_corners=False`), argmax over the classes. Only
/// the `u8` map is copied to the host.
pub fn labels_from_logits(logits: &Tensor, height: usize, width: usize) -> Result<Vec<u8>> {
    let (b, l, _, _) = logits.dims4()?;
    if b != 1 || l == 0 || l > 256 {
        return Err(diffusion::Error::Config(format!(
            "segformer: logits of shape {:?}, expected (1, 1..=256, h, w)",
            logits.dims()
        )));
    }
    let up = crate::tensor_ops::interpolate_bilinear(
        &logits.to_dtype(DType::F32)?,
        (height, width),
        false,
    )?;
    let labels = up.argmax_keepdim(1)?.to_dtype(DType::U8)?;
    Ok(labels
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1::<u8>()?)
}

/// Step 5: the hint, each pixel its class's ADE20K palette colour.
pub fn hint_from_labels(labels: &[u8], width: usize, height: usize) -> RgbImage {
    crate::ade20k::colorize(labels, width, height)
}

/// Step 1: torch's uint8 antialiased bilinear resize (`F.interpolate(…, mode="bilinear",
/// antialias=True, align_corners=False)` on a uint8 tensor, as torchvision calls it) of `image`
/// to `width`×`height`: horizontal pass first, uint8 in between, each pass skipped when its
/// size does not change.
pub fn processor_resize(image: &RgbImage, height: usize, width: usize) -> RgbImage {
    let (w0, h0) = (image.width() as usize, image.height() as usize);
    let mut data = image.as_raw().clone();
    if width != w0 {
        let ax = AxisWeights::new(w0, width);
        let mut out = vec![0u8; h0 * width * 3];
        for y in 0..h0 {
            let src = &data[y * w0 * 3..(y + 1) * w0 * 3];
            let dst = &mut out[y * width * 3..(y + 1) * width * 3];
            for x in 0..width {
                let (start, ks) = ax.taps(x);
                for c in 0..3 {
                    let acc = ks.iter().enumerate().fold(ax.round, |a, (j, &k)| {
                        a + src[(start + j) * 3 + c] as i32 * k as i32
                    });
                    dst[x * 3 + c] = ax.finish(acc);
                }
            }
        }
        data = out;
    }
    if height != h0 {
        let ax = AxisWeights::new(h0, height);
        let row = width * 3;
        let mut out = vec![0u8; height * row];
        for y in 0..height {
            let (start, ks) = ax.taps(y);
            for i in 0..row {
                let acc = ks.iter().enumerate().fold(ax.round, |a, (j, &k)| {
                    a + data[(start + j) * row + i] as i32 * k as i32
                });
                out[y * row + i] = ax.finish(acc);
            }
        }
        data = out;
    }
    RgbImage::from_raw(width as u32, height as u32, data).expect("buffer size")
}

/// torch's `_compute_index_ranges_int16_weights` for the antialiased linear filter along one
/// axis: for each output index the first source index, and the int16 fixed-point weights.
struct AxisWeights {
    start: Vec<usize>,
    weights: Vec<Vec<i16>>,
    precision: u32,
    round: i32,
}

impl AxisWeights {
    fn new(n_in: usize, n_out: usize) -> Self {
        let scale = n_in as f64 / n_out as f64;
        // Bilinear's interp_size is 2: support = (2 / 2) · scale when downscaling.
        let support = if scale >= 1.0 { scale } else { 1.0 };
        let max_size = support.ceil() as i64 * 2 + 1;
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let filter = |x: f64| {
            let x = x.abs();
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        };
        let mut start = Vec::with_capacity(n_out);
        let mut float_weights = Vec::with_capacity(n_out);
        let mut wt_max = 0f64;
        for i in 0..n_out {
            let center = scale * (i as f64 + 0.5);
            // C's float → int64 conversion truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xsize =
                (((center + support + 0.5) as i64).min(n_in as i64) - xmin).clamp(0, max_size);
            let mut ws: Vec<f64> = (0..xsize)
                .map(|j| filter(((j + xmin) as f64 - center + 0.5) * invscale))
                .collect();
            let total: f64 = ws.iter().fold(0.0, |a, w| a + w);
            if total != 0.0 {
                for w in ws.iter_mut() {
                    *w /= total;
                    wt_max = wt_max.max(*w);
                }
            }
            start.push(xmin as usize);
            float_weights.push(ws);
        }
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + wt_max * (1i64 << (precision + 1)) as f64) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let unit = (1i64 << precision) as f64;
        let weights = float_weights
            .iter()
            .map(|ws| {
                ws.iter()
                    .map(|w| {
                        let v = w * unit;
                        (if v < 0.0 { -0.5 + v } else { 0.5 + v }) as i32 as i16
                    })
                    .collect()
            })
            .collect();
        Self {
            start,
            weights,
            precision,
            round: 1 << (precision - 1),
        }
    }

    fn taps(&self, i: usize) -> (usize, &[i16]) {
        (self.start[i], &self.weights[i])
    }

    fn finish(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// A JSON value as a `usize` (hub configs write sizes as integers).
fn as_usize(v: &serde_json::Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_identity_and_constant() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]));
        assert_eq!(processor_resize(&img, 5, 7), img);
        let flat = RgbImage::from_pixel(13, 9, image::Rgb([200, 3, 77]));
        let r = processor_resize(&flat, 4, 31);
        assert!(r.pixels().all(|p| p.0 == [200, 3, 77]));
    }
}
