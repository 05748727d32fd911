//! The UNet's building blocks, by their diffusers names.
//!
//! candle-transformers' blocks are not reused. Its GEGLU uses the tanh approximation of GELU
//! where diffusers uses the exact erf form (a ~1e-3 difference that breaks parity), so the
//! attention stack is ours. Its resnet block, sinusoidal timestep embedding and timestep MLP are
//! ours too, for half precision, for the device and for batch invariance (see below).
//!
//! Half precision (f16 / bf16), as PyTorch and diffusers compute it:
//! - the sinusoidal timestep embedding in f32 ([`Timesteps`]), cast to the model's dtype before
//!   the time MLP (diffusers' `t_emb.to(dtype=sample.dtype)`, UNet and ControlNet alike);
//! - group norm and layer norm with their statistics and their affine in f32, rounded once to
//!   the input's dtype ([`GroupNorm`], [`LayerNorm`]: torch's kernels accumulate in f32);
//! - attention: the softmax always in f32, the scores too with `upcast_attention`. diffusers runs
//!   these through `scaled_dot_product_attention`, whose fused kernels keep the scores in f32 and
//!   round the probabilities to half before `P·V`; here the scores `q·kᵀ` are rounded to half
//!   first (without `upcast_attention`), a relative error of 2⁻¹¹ (f16) on each score, then
//!   scaled and soft-maxed in f32, the probabilities rounded to half for `P·V` as in SDPA.
//!
//! Nothing here copies between host and device per call: constants (the timestep frequencies)
//! are uploaded when the model is built.
//!
//! Batch invariance (the README's "Seeds"): on the CPU, what these blocks compute for one
//! batch element is bit-for-bit what they compute for it alone, whatever else is in the batch.
//! Convolutions, norms, softmax and element-wise ops work image by image (or row by row) in
//! candle's CPU backend, and a batched matmul (attention's) is a loop of per-element matmuls.
//! Two things did depend on the batch, both through the `gemm` crate behind candle's CPU
//! matmul, which picks its kernel, and with it the order in which each output sums its
//! products, by the shape of the call:
//! - a linear layer folds the batch into the rows of one matmul. Within gemm's blocked kernels
//!   an output row's sums do not depend on the number of rows, but too few rows go to other
//!   kernels: one row to a matrix-vector kernel, up to 256 outputs to dot-product kernels, and
//!   up to 64×64 outputs block their depth by 512 where the blocked kernels may not. So the time
//!   embedding (one row per batch element) of a batch of one was not summed as in a batch of
//!   two, nor a tiny model's of two as of four. [`Linear`] pads such calls with zero rows
//!   ([`gemm_min_rows`]); a test pins gemm's behaviour for the models' shapes.
//! - [`attention`] slices its queries to bound the score tensor; the slices were sized for the
//!   whole batch, so an image's matmuls had fewer rows the more images shared its batch. They
//!   are sized for one image now, and the batch is cut into groups of images instead. (On the
//!   CPU in f32 the fused attention does the same: blocks of one image's queries, sized by the
//!   sequence lengths alone.)
//!
//! On the CPU in f32 the linear layers with a bias, attention, SiLU and GEGLU take fused ops
//! (`linear_bias`, `fused_attention`, `activations`); the README's "Benchmarks" says why.
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{self as nn, VarBuilder};

use crate::config::{AttentionSpec, EncoderSpec};
use crate::conv::{conv2d, Conv2d};

fn conv3x3(vb: VarBuilder, c_in: usize, c_out: usize, stride: usize) -> Result<Conv2d> {
    let cfg = nn::Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    conv2d(c_in, c_out, 3, cfg, vb)
}

/// The fewest rows for which gemm 0.19 computes a `[m, k] × [k, n]` product with its blocked
/// kernels, whose sums for an output row do not depend on `m` (see the module header): two or
/// more rows (one is a matrix-vector product), more than 256 outputs (up to 256 take the
/// dot-product kernels), and more than 64 rows when `n ≤ 64` and `k > 512` (up to 64×64
/// outputs are summed in depth blocks of 512, the blocked kernels' depth blocking depends on
/// the cache sizes). `linear_rows_do_not_depend_on_the_batch` checks this on the models' shapes.
pub(crate) fn gemm_min_rows(n: usize, k: usize) -> usize {
    let mut rows = 2.max(256 / n.max(1) + 1);
    if n <= 64 && k > 512 {
        rows = rows.max(65);
    }
    rows
}

/// candle_nn's linear layer (`x·Wᵀ + b`, leading dimensions folded into the rows of one
/// matmul, as it does), batch-invariant on the CPU: a call with fewer rows than
/// [`gemm_min_rows`] is padded with zero rows, so that every call, alone or batched, takes
/// gemm's blocked kernels. Costs nothing measurable: only the time embedding (a row per batch
/// element) and tiny models' layers are that small.
#[derive(Debug, Clone)]
pub struct Linear(nn::Linear);

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(nn::linear(in_dim, out_dim, vb)?))
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(nn::linear_no_bias(in_dim, out_dim, vb)?))
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _timing = crate::profile::scope("linear (attention projections, feed-forward)");
        let (out_dim, k) = self.0.weight().dims2()?;
        let rows = xs.elem_count() / k.max(1);
        let min_rows = gemm_min_rows(out_dim, k);
        if !xs.device().is_cpu() || rows >= min_rows {
            return self.rows_forward(xs);
        }
        let padded = xs
            .reshape((rows, k))?
            .pad_with_zeros(0, 0, min_rows - rows)?;
        let mut dims = xs.dims().to_vec();
        *dims
            .last_mut()
            .expect("a linear layer's input has dimensions") = out_dim;
        self.rows_forward(&padded)?
            .narrow(0, 0, rows)?
            .reshape(dims)
    }
}

impl Linear {
    /// The layer on `xs` as it comes: with a bias on the CPU in f32, one gemm call adding the
    /// product into the bias ([`crate::linear_bias`]); otherwise candle_nn's.
    fn rows_forward(&self, xs: &Tensor) -> Result<Tensor> {
        let weight = self.0.weight();
        match self.0.bias() {
            Some(bias) if crate::linear_bias::applies(xs, weight, bias) => {
                let (out_dim, k) = weight.dims2()?;
                let mut dims = xs.dims().to_vec();
                *dims
                    .last_mut()
                    .expect("a linear layer's input has dimensions") = out_dim;
                let rows = xs.reshape(((), k))?;
                crate::linear_bias::linear_with_bias(&rows, weight, bias)?.reshape(dims)
            }
            _ => self.0.forward(xs),
        }
    }
}

/// diffusers' `TimestepEmbedding` (`linear_1`, SiLU, `linear_2`) with [`Linear`]s: its input
/// has a row per batch element, the calls most in need of padding.
#[derive(Debug)]
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, channels: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(channels, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&crate::activations::silu(&self.linear_1.forward(xs)?)?)
    }
}

/// Multi-head attention (`attn1`/`attn2` in diffusers' `BasicTransformerBlock`).
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    /// diffusers' `upcast_attention`: compute the scores in f32 (SD 2.1 overflows in f16).
    upcast: bool,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        upcast: bool,
    ) -> Result<Self> {
        let head_dim = query_dim / heads;
        Ok(Self {
            to_q: linear_no_bias(query_dim, query_dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, query_dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, query_dim, vb.pp("to_v"))?,
            to_out: linear(query_dim, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
        })
    }

    /// [B, N, H*D] -> [B, H, N, D], a view ([`attention`] copies what it needs to).
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        xs.reshape((b, n, self.heads, c / self.heads))?
            .transpose(1, 2)
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let context = context.unwrap_or(xs);
        let q = self.split_heads(&self.to_q.forward(xs)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let out = attention(&q, &k, &v, self.scale, self.upcast)?
            .transpose(1, 2)?
            .reshape((b, n, c))?;
        self.to_out.forward(&out)
    }
}

/// Score tensors above this many elements are computed a slice at a time. At SD's 64×64
/// latent a full `[2·8, 4096, 4096]` score tensor is 1 GiB; slices keep the working set small
/// (and off the allocator's page-faulting path).
const SCORE_ELEMENTS: usize = 1 << 22;

/// softmax(q·kᵀ·scale)·v on `[B, H, N, D]`. Scores are computed in f32 when `upcast` (diffusers'
/// `upcast_attention`), the softmax always in f32. The fused softmax has no backward, so the
/// composed one is used when a gradient is being taken.
///
/// On the CPU in f32 this is [`crate::fused_attention`], which reads q, k and v through their
/// strides and returns a view whose heads merge back without a copy.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, upcast: bool) -> Result<Tensor> {
    let _timing = crate::profile::scope("attention (q·kᵀ, softmax, ·v)");
    if crate::fused_attention::applies(q, k, v) {
        return crate::fused_attention::attention(q, k, v, scale);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    attention_sliced(&q, &k, &v, scale, upcast, SCORE_ELEMENTS)
}

fn attention_sliced(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    upcast: bool,
    max_scores: usize,
) -> Result<Tensor> {
    let (b, h, nq, _) = q.dims4()?;
    let nk = k.dim(2)?;
    let dtype = q.dtype();
    let needs_grad = q.track_op() || k.track_op() || v.track_op();
    let upcast = upcast && dtype != DType::F32;
    let kt = if upcast {
        k.to_dtype(DType::F32)?.t()?
    } else {
        k.t()?
    };
    // Slices of one image's queries, then groups of images: a slice's size, and with it the
    // rows of every matmul an image's queries take part in (one per head and image: candle
    // loops over them), does not depend on the batch (the module header).
    let chunk = (max_scores / (h * nk).max(1)).clamp(1, nq);
    let group = (max_scores / (h * chunk * nk).max(1)).clamp(1, b);
    let mut images = Vec::with_capacity(b.div_ceil(group));
    for first in (0..b).step_by(group) {
        let n_images = group.min(b - first);
        let kt = kt.narrow(0, first, n_images)?;
        let v = v.narrow(0, first, n_images)?;
        let mut outs = Vec::with_capacity(nq.div_ceil(chunk));
        for start in (0..nq).step_by(chunk) {
            let q_part = q
                .narrow(0, first, n_images)?
                .narrow(2, start, chunk.min(nq - start))?;
            let q_part = if upcast {
                q_part.to_dtype(DType::F32)?
            } else {
                q_part
            };
            let scores = (q_part.matmul(&kt)?.to_dtype(DType::F32)? * scale)?;
            let probs = if needs_grad {
                nn::ops::softmax(&scores, D::Minus1)?
            } else {
                nn::ops::softmax_last_dim(&scores)?
            };
            outs.push(probs.to_dtype(dtype)?.matmul(&v)?);
        }
        images.push(if outs.len() == 1 {
            outs.pop().expect("one chunk")
        } else {
            Tensor::cat(&outs, 2)?
        });
    }
    if images.len() == 1 {
        Ok(images.pop().expect("one group"))
    } else {
        Tensor::cat(&images, 0)
    }
}

/// `FeedForward` with a GEGLU input projection (`ff.net.0.proj`, `ff.net.2`).
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Exact (erf) GELU, as torch.nn.functional.gelu's default.
        let h = crate::activations::geglu(&self.proj_in.forward(xs)?)?;
        self.proj_out.forward(&h)
    }
}

/// LayerNorm over the last dimension, computed in f32 from primitive ops (candle's fused
/// layer-norm op has no backward; see [`Attention::forward`]): statistics and affine in f32,
/// the result rounded once to the input's dtype, as torch's layer norm does in half precision.
#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Self::with_eps(vb, dim, 1e-5)
    }

    pub(crate) fn with_eps(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb
                .get_with_hints(dim, "weight", nn::Init::Const(1.0))?
                .to_dtype(DType::F32)?,
            bias: vb
                .get_with_hints(dim, "bias", nn::Init::Const(0.0))?
                .to_dtype(DType::F32)?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _timing = crate::profile::scope("layer norm");
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let centered = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?
            .to_dtype(dtype)
    }
}

/// `torch.nn.GroupNorm` as torch computes it in half precision: the statistics and the affine
/// in f32, the result rounded once to the input's dtype. (candle_nn's group norm takes its
/// statistics in f32 too, but rounds the normalised values to half before the affine: three
/// roundings where torch has one.) In f32 it computes what candle_nn's does, op for op.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// f32, whatever the model's dtype.
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels")
    }
    let weight = vb.get_with_hints(channels, "weight", nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", nn::Init::Const(0.0))?;
    Ok(GroupNorm {
        weight: weight.to_dtype(DType::F32)?,
        bias: bias.to_dtype(DType::F32)?,
        groups,
        eps,
    })
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _timing = crate::profile::scope("group norm");
        let dims = x.dims();
        if dims.len() < 3 {
            candle_core::bail!("GroupNorm: input of rank {} (at least 3)", dims.len())
        }
        let (b, c) = (dims[0], dims[1]);
        if c != self.weight.dim(0)? {
            candle_core::bail!("GroupNorm: {c} channels, {} expected", self.weight.dim(0)?)
        }
        let n = dims[2..].iter().product::<usize>() * c / self.groups;
        let dtype = x.dtype();
        let xs = x.reshape((b, self.groups, n))?.to_dtype(DType::F32)?;
        let mean = (xs.sum_keepdim(2)? / n as f64)?;
        let centered = xs.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(2)? / n as f64)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut w_dims = vec![1; dims.len()];
        w_dims[1] = c;
        normed
            .reshape(dims)?
            .broadcast_mul(&self.weight.reshape(w_dims.clone())?)?
            .broadcast_add(&self.bias.reshape(w_dims)?)?
            .to_dtype(dtype)
    }
}

/// diffusers' `ResnetBlock2D` (the `default` time-embedding norm, SiLU, no up/down sampling):
/// `(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    time_emb_proj: Option<Linear>,
    /// A 1×1 conv when the channel count changes.
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(crate) fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = if c_in != c_out {
            let cfg = Default::default();
            Some(conv2d(c_in, c_out, 1, cfg, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, c_in, eps, vb.pp("norm1"))?,
            conv1: conv3x3(vb.pp("conv1"), c_in, c_out, 1)?,
            norm2: group_norm(groups, c_out, eps, vb.pp("norm2"))?,
            conv2: conv3x3(vb.pp("conv2"), c_out, c_out, 1)?,
            time_emb_proj: temb_channels
                .map(|t| linear(t, c_out, vb.pp("time_emb_proj")))
                .transpose()?,
            conv_shortcut,
            output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self
            .conv1
            .forward(&crate::activations::silu(&self.norm1.forward(xs)?)?)?;
        if let (Some(temb), Some(proj)) = (temb, &self.time_emb_proj) {
            let t = proj.forward(&crate::activations::silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?;
        }
        let h = self
            .conv2
            .forward(&crate::activations::silu(&self.norm2.forward(&h)?)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        (shortcut + h)? / self.output_scale_factor
    }
}

/// diffusers' `Timesteps` (`get_timestep_embedding` with `scale = 1`, `max_period = 10000`):
/// `[sin(t·f), cos(t·f)]` (cos first with `flip_sin_to_cos`) for the frequencies
/// `f_i = exp(−ln(10000)·i / (half − shift))`, in f32 whatever the timesteps' dtype: the
/// arguments reach ~1000 rad, where half precision would be off by a quarter turn.
#[derive(Debug)]
pub struct Timesteps {
    /// `[1, half]`, f32, on the model's device (uploaded once, here).
    freqs: Tensor,
    flip_sin_to_cos: bool,
    odd: bool,
}

impl Timesteps {
    pub fn new(
        num_channels: usize,
        flip_sin_to_cos: bool,
        freq_shift: f64,
        device: &Device,
    ) -> Result<Self> {
        let half = num_channels / 2;
        // diffusers' float32 ops: −ln(10000) · arange(half), divided by (half − shift) (as a
        // multiplication by the f32 reciprocal, which is what candle's scalar division does and
        // the parity fixtures were matched with), then exp.
        let neg_log = -(10000f64.ln()) as f32;
        let inv = (1.0 / (half as f64 - freq_shift)) as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((neg_log * i as f32) * inv).exp())
            .collect();
        Ok(Self {
            freqs: crate::transfer::upload(freqs, (1, half), device)?,
            flip_sin_to_cos,
            odd: num_channels % 2 == 1,
        })
    }

    /// `[B]` timesteps (any dtype) → `[B, num_channels]`, f32.
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        let args = timesteps
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&self.freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[&cos, &sin], D::Minus1)?
        } else {
            Tensor::cat(&[&sin, &cos], D::Minus1)?
        };
        if self.odd {
            emb.pad_with_zeros(D::Minus1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}

#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(vb: VarBuilder, dim: usize, spec: AttentionSpec, upcast: bool) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, spec.heads, upcast)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim)?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                spec.cross_attention_dim,
                spec.heads,
                upcast,
            )?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel` (continuous input): the `attentions.{i}` of a block.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    fn new(
        vb: VarBuilder,
        channels: usize,
        spec: AttentionSpec,
        enc: &EncoderSpec,
    ) -> Result<Self> {
        let norm = group_norm(enc.norm_num_groups, channels, 1e-6, vb.pp("norm"))?;
        let (proj_in, proj_out) = if enc.use_linear_projection {
            (
                Projection::Linear(linear(channels, channels, vb.pp("proj_in"))?),
                Projection::Linear(linear(channels, channels, vb.pp("proj_out"))?),
            )
        } else {
            let cfg = Default::default();
            (
                Projection::Conv(conv2d(channels, channels, 1, cfg, vb.pp("proj_in"))?),
                Projection::Conv(conv2d(channels, channels, 1, cfg, vb.pp("proj_out"))?),
            )
        };
        let blocks = (0..spec.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    channels,
                    spec,
                    enc.upcast_attention,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut xs = match &self.proj_in {
            Projection::Conv(p) => to_tokens(&p.forward(&xs)?)?,
            Projection::Linear(p) => p.forward(&to_tokens(&xs)?)?,
        };
        for block in &self.blocks {
            xs = block.forward(&xs, context)?;
        }
        let to_map = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let xs = match &self.proj_out {
            Projection::Conv(p) => p.forward(&to_map(&xs)?)?,
            Projection::Linear(p) => to_map(&p.forward(&xs)?)?,
        };
        xs + residual
    }
}

fn resnet(
    vb: VarBuilder,
    c_in: usize,
    c_out: usize,
    enc: &EncoderSpec,
    output_scale_factor: f64,
) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        c_in,
        c_out,
        Some(enc.time_embed_dim()),
        enc.norm_num_groups,
        enc.norm_eps,
        output_scale_factor,
    )
}

/// A down block (`DownBlock2D` or `CrossAttnDownBlock2D`): resnets, each optionally followed by
/// a transformer, then an optional stride-2 conv.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<(Conv2d, usize)>,
}

impl DownBlock {
    fn new(vb: VarBuilder, enc: &EncoderSpec, index: usize) -> Result<Self> {
        let spec = &enc.blocks[index];
        let c_out = spec.out_channels;
        let c_in = if index == 0 {
            c_out
        } else {
            enc.blocks[index - 1].out_channels
        };
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..spec.layers {
            let c = if j == 0 { c_in } else { c_out };
            resnets.push(resnet(vb.pp(format!("resnets.{j}")), c, c_out, enc, 1.0)?);
            if let Some(att) = spec.attention {
                attentions.push(Transformer2D::new(
                    vb.pp(format!("attentions.{j}")),
                    c_out,
                    att,
                    enc,
                )?);
            }
        }
        let downsampler = if index + 1 < enc.blocks.len() {
            let cfg = nn::Conv2dConfig {
                stride: 2,
                padding: enc.downsample_padding,
                ..Default::default()
            };
            let conv = conv2d(c_out, c_out, 3, cfg, vb.pp("downsamplers.0.conv"))?;
            Some((conv, enc.downsample_padding))
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the skip tensors it contributes.
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut xs = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(att) = self.attentions.get(j) {
                xs = att.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some((conv, padding)) = &self.downsampler {
            // diffusers pads right/bottom by one when the conv itself has no padding.
            xs = if *padding == 0 {
                conv.forward(&xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(
                    D::Minus2,
                    0,
                    1,
                )?)?
            } else {
                conv.forward(&xs)?
            };
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

impl MidBlock {
    fn new(vb: VarBuilder, enc: &EncoderSpec) -> Result<Self> {
        let c = enc
            .blocks
            .last()
            .expect("resolved config has blocks")
            .out_channels;
        let scale = enc.mid_block_scale_factor;
        Ok(Self {
            resnets: vec![
                resnet(vb.pp("resnets.0"), c, c, enc, scale)?,
                resnet(vb.pp("resnets.1"), c, c, enc, scale)?,
            ],
            attentions: vec![Transformer2D::new(
                vb.pp("attentions.0"),
                c,
                enc.mid_attention,
                enc,
            )?],
        })
    }

    fn forward(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, Some(temb))?;
        for (att, res) in self.attentions.iter().zip(&self.resnets[1..]) {
            xs = res.forward(&att.forward(&xs, context)?, Some(temb))?;
        }
        Ok(xs)
    }
}

/// An up block (`UpBlock2D` or `CrossAttnUpBlock2D`): `layers + 1` resnets, each eating one
/// skip tensor (concatenated on channels), each optionally followed by a transformer, then an
/// optional nearest-neighbour ×2 upsample and conv.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    /// `i` counts up blocks from the bottom (0 mirrors the last down block).
    pub(crate) fn new(vb: VarBuilder, enc: &EncoderSpec, i: usize) -> Result<Self> {
        let n = enc.blocks.len();
        let level = n - 1 - i;
        let spec = &enc.blocks[level];
        let c_out = spec.out_channels;
        let c_prev = if i == 0 {
            c_out
        } else {
            enc.blocks[level + 1].out_channels
        };
        // The skips this block eats come from the down block one level up (or conv_in).
        let c_skip_last = enc.blocks[level.saturating_sub(1)].out_channels;
        let n_layers = spec.layers + 1;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..n_layers {
            let c_res = if j == n_layers - 1 {
                c_skip_last
            } else {
                c_out
            };
            let c_in = if j == 0 { c_prev } else { c_out };
            resnets.push(resnet(
                vb.pp(format!("resnets.{j}")),
                c_in + c_res,
                c_out,
                enc,
                1.0,
            )?);
            if let Some(att) = spec.attention {
                attentions.push(Transformer2D::new(
                    vb.pp(format!("attentions.{j}")),
                    c_out,
                    att,
                    enc,
                )?);
            }
        }
        let upsampler = if i + 1 < n {
            Some(conv3x3(vb.pp("upsamplers.0.conv"), c_out, c_out, 1)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub(crate) fn n_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip tensors in down-path order; they are consumed last first.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - j];
            xs = Tensor::cat(&[&xs, skip], 1)?;
            xs = resnet.forward(&xs, Some(temb))?;
            if let Some(att) = self.attentions.get(j) {
                xs = att.forward(&xs, context)?;
            }
        }
        match &self.upsampler {
            Some(conv) => {
                let (h, w) = match upsample_size {
                    Some(size) => size,
                    None => {
                        let (_, _, h, w) = xs.dims4()?;
                        (2 * h, 2 * w)
                    }
                };
                conv.forward(&xs.upsample_nearest2d(h, w)?)
            }
            None => Ok(xs),
        }
    }
}

/// What the UNet and the ControlNet share: conv_in, the timestep embedding, the down blocks and
/// the mid block, under the same diffusers names.
#[derive(Debug)]
pub struct Encoder {
    pub spec: EncoderSpec,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
}

/// The encoder's outputs: the mid block's output, every skip tensor (conv_in's output first),
/// and the time embedding for the up path.
pub struct Encoded {
    pub mid: Tensor,
    pub skips: Vec<Tensor>,
    pub temb: Tensor,
}

impl Encoder {
    pub fn new(vb: VarBuilder, spec: EncoderSpec) -> Result<Self> {
        let c0 = spec.blocks[0].out_channels;
        let conv_in = conv3x3(vb.pp("conv_in"), spec.in_channels, c0, 1)?;
        let time_proj = Timesteps::new(c0, spec.flip_sin_to_cos, spec.freq_shift, vb.device())?;
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), c0, spec.time_embed_dim())?;
        let down_blocks = (0..spec.blocks.len())
            .map(|i| DownBlock::new(vb.pp(format!("down_blocks.{i}")), &spec, i))
            .collect::<Result<_>>()?;
        let mid_block = MidBlock::new(vb.pp("mid_block"), &spec)?;
        Ok(Self {
            spec,
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
        })
    }

    /// Time embedding for per-sample timesteps `[B]` (any float dtype): the sinusoids in f32,
    /// cast to `dtype` (the sample's) before the time MLP, where diffusers casts them.
    pub fn embed_time(&self, timesteps: &Tensor, dtype: DType) -> Result<Tensor> {
        let t = self.time_proj.forward(&timesteps.to_dtype(DType::F32)?)?;
        self.time_embedding.forward(&t.to_dtype(dtype)?)
    }

    /// Runs conv_in, adds `added` (the ControlNet's hint embedding) to its output when given,
    /// then the down and mid blocks.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&Tensor>,
    ) -> Result<Encoded> {
        let (b, _, _, _) = sample.dims4()?;
        let tb = timesteps.dims1()?;
        if tb != b {
            candle_core::bail!("timesteps has {tb} entries for a batch of {b} samples")
        }
        let temb = self.embed_time(timesteps, sample.dtype())?;
        let mut xs = self.conv_in.forward(sample)?;
        if let Some(added) = added {
            xs = (xs + added)?;
        }
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&xs, &temb, context)?;
            skips.extend(block_skips);
            xs = out;
        }
        let mid = self.mid_block.forward(&xs, &temb, context)?;
        Ok(Encoded { mid, skips, temb })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A norm's weight and bias, `n` each, away from 1 and 0 so that the affine rounds.
    fn affine_vb(n: usize, dtype: DType) -> VarBuilder<'static> {
        let w: Vec<f32> = (0..n).map(|i| 0.7 + 0.013 * i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| 0.11 - 0.007 * i as f32).collect();
        let map = std::collections::HashMap::from([
            ("weight".to_string(), Tensor::new(w, &Device::Cpu).unwrap()),
            ("bias".to_string(), Tensor::new(b, &Device::Cpu).unwrap()),
        ]);
        VarBuilder::from_tensors(map, dtype, &Device::Cpu)
    }

    #[test]
    fn timestep_embedding_is_f32_whatever_the_input_dtype() {
        let dev = Device::Cpu;
        let proj = Timesteps::new(64, true, 0.0, &dev).unwrap();
        // 999 and 981 are exact in f16 (not in bf16, which the timesteps are never given in);
        // their products with the frequencies are not.
        let ts = [999.0f32, 981.0, 1.0];
        let reference: Vec<f64> = ts
            .iter()
            .flat_map(|&t| {
                let f = |i: usize| (-(10000f64.ln()) * i as f64 / 32.0).exp();
                let cos = (0..32).map(move |i| (t as f64 * f(i)).cos());
                let sin = (0..32).map(move |i| (t as f64 * f(i)).sin());
                cos.chain(sin).collect::<Vec<_>>()
            })
            .collect();
        for dtype in [DType::F32, DType::F16] {
            let t = Tensor::new(&ts, &dev).unwrap().to_dtype(dtype).unwrap();
            let emb = proj.forward(&t).unwrap();
            assert_eq!(emb.dtype(), DType::F32);
            let err = values(&emb)
                .iter()
                .zip(&reference)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max);
            // f32 arguments of ~1000 rad are good to ~1e-4; in f16 they would be off by up
            // to 0.25 rad.
            assert!(err < 2e-4, "{dtype:?}: {err}");
        }
    }

    #[test]
    fn group_norm_takes_f32_statistics_and_rounds_once() {
        let dev = Device::Cpu;
        // 2 groups of 4 channels × 32×32: values ~1000, whose f16 sum (4e6) would overflow
        // f16's 65504 and whose spread the f16 mean would lose.
        let n = 8 * 32 * 32;
        let x: Vec<f32> = (0..n)
            .map(|i| 1000.0 + 3.0 * ((i * 7) % 13) as f32)
            .collect();
        let x32 = Tensor::from_vec(x, (1, 8, 32, 32), &dev).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let x = x32.to_dtype(dtype).unwrap();
            let gn = group_norm(2, 8, 1e-5, affine_vb(8, dtype)).unwrap();
            let out = gn.forward(&x).unwrap();
            assert_eq!(out.dtype(), dtype);
            // The same computation on the same (exactly widened) values in f32, rounded once.
            let wide = gn.forward(&x.to_dtype(DType::F32).unwrap()).unwrap();
            assert_eq!(
                values(&out),
                values(&wide.to_dtype(dtype).unwrap()),
                "{dtype:?}"
            );
            assert!(values(&out).iter().all(|v| v.is_finite()));
            // And candle_nn's, which rounds to half before the affine, is not that.
            let theirs = candle_nn::group_norm(2, 8, 1e-5, affine_vb(8, dtype)).unwrap();
            let theirs = theirs.forward(&x).unwrap();
            assert_ne!(values(&theirs), values(&out), "{dtype:?}");
        }
    }

    #[test]
    fn layer_norm_takes_f32_statistics_and_rounds_once() {
        let dev = Device::Cpu;
        let d = 768;
        let x: Vec<f32> = (0..3 * d)
            .map(|i| 300.0 + 0.25 * ((i * 5) % 11) as f32)
            .collect();
        let x32 = Tensor::from_vec(x, (3, d), &dev).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let x = x32.to_dtype(dtype).unwrap();
            let ln = LayerNorm::new(affine_vb(d, dtype), d).unwrap();
            let out = ln.forward(&x).unwrap();
            assert_eq!(out.dtype(), dtype);
            let wide = ln.forward(&x.to_dtype(DType::F32).unwrap()).unwrap();
            assert_eq!(
                values(&out),
                values(&wide.to_dtype(dtype).unwrap()),
                "{dtype:?}"
            );
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        values(t).iter().map(|v| v.to_bits()).collect()
    }

    /// The premise of [`gemm_min_rows`], on the linear layers of SD 1.5 (UNet, ControlNet,
    /// VAE) and of the embedded model: a batch element's outputs are those it gets alone,
    /// whatever the batch's size, for token counts from one (the time embedding, a tiny latent's
    /// mid block) up. Fails if a gemm update changes how it picks its kernels.
    #[test]
    fn linear_rows_do_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        // (in, out): SD 1.5's attention, feed-forward, cross-attention, time embedding and time
        // projections, VAE attention; then the embedded model's.
        let sd = [
            (320, 320),
            (320, 2560),
            (1280, 320),
            (768, 320),
            (640, 5120),
            (1280, 1280),
            (5120, 1280),
            (320, 1280),
            (1280, 640),
            (512, 512),
        ];
        let tiny = [
            (32, 32),
            (32, 256),
            (128, 32),
            (32, 128),
            (128, 128),
            (128, 64),
            (64, 64),
            (64, 512),
            (256, 64),
        ];
        for dtype in [DType::F32, DType::F16] {
            for (shapes, tokens) in [(&sd[..], &[0, 1, 2, 5][..]), (&tiny[..], &[0, 1, 2, 4, 9])] {
                for &(k, n) in shapes {
                    let map = std::collections::HashMap::from([
                        (
                            "weight".to_string(),
                            Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap(),
                        ),
                        (
                            "bias".to_string(),
                            Tensor::randn(0f32, 0.05, n, &dev).unwrap(),
                        ),
                    ]);
                    let vb = VarBuilder::from_tensors(map, dtype, &dev);
                    let layer = linear(k, n, vb).unwrap();
                    for &t in tokens {
                        // 0 tokens: a `[B, in]` input, as the time embedding's.
                        let one = |b: usize| -> Vec<usize> {
                            if t == 0 {
                                vec![b, k]
                            } else {
                                vec![b, t, k]
                            }
                        };
                        let xs = Tensor::randn(0f32, 1., one(8), &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap();
                        let alone: Vec<Vec<u32>> = (0..8)
                            .map(|i| bits(&layer.forward(&xs.narrow(0, i, 1).unwrap()).unwrap()))
                            .collect();
                        for b in [2, 3, 4, 8] {
                            let out = layer.forward(&xs.narrow(0, 0, b).unwrap()).unwrap();
                            for (i, alone) in alone.iter().enumerate().take(b) {
                                assert!(
                                    bits(&out.narrow(0, i, 1).unwrap()) == *alone,
                                    "{dtype:?} {k}→{n}, {t} tokens: element {i} of {b} differs"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_rows_do_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        let (h, nq, nk, d) = (2, 50, 40, 8);
        let q = Tensor::randn(0f32, 1., (5, h, nq, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (5, h, nk, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (5, h, nk, d), &dev).unwrap();
        // Budgets: whole images in one call, 7 queries of one image, and 2 images per group.
        for budget in [usize::MAX, h * nk * 7, 2 * h * nk * nq] {
            let alone: Vec<Vec<u32>> = (0..5)
                .map(|i| {
                    let one = |t: &Tensor| t.narrow(0, i, 1).unwrap();
                    bits(
                        &attention_sliced(&one(&q), &one(&k), &one(&v), 0.35, false, budget)
                            .unwrap(),
                    )
                })
                .collect();
            for b in [2, 3, 5] {
                let first = |t: &Tensor| t.narrow(0, 0, b).unwrap();
                let out = attention_sliced(&first(&q), &first(&k), &first(&v), 0.35, false, budget)
                    .unwrap();
                for (i, alone) in alone.iter().enumerate().take(b) {
                    assert!(
                        bits(&out.narrow(0, i, 1).unwrap()) == *alone,
                        "budget {budget}: element {i} of {b} differs"
                    );
                }
            }
        }
    }

    #[test]
    fn sliced_attention_equals_whole() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 50, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 3, 40, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 3, 40, 8), &dev).unwrap();
        let whole = attention_sliced(&q, &k, &v, 0.35, false, usize::MAX).unwrap();
        // 2·3·40 scores per query: a budget of 7 queries' worth gives 8 slices, the last short.
        let sliced = attention_sliced(&q, &k, &v, 0.35, false, 2 * 3 * 40 * 7).unwrap();
        assert_eq!(sliced.dims(), &[2, 3, 50, 8]);
        let diff = (whole - sliced)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-6, "{diff}");
    }
}
