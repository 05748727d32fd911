//! HED soft edges (`ControlNetHED_Apache2`, `ControlNetHED.pth`), as controlnet_aux 0.0.10's
//! `HEDdetector` runs it; serves `softedge_hed`, `softedge_hedsafe` and `scribble_hed` (none
//! takes parameters).
//!
//! Reference steps, for the image at its detect size (`h`×`w`, RGB):
//! 1. network input: the RGB bytes as floats 0..255, `1×3×h×w` (no scaling, no channel flip);
//! 2. [`Hed::forward`]: `x - norm`, five VGG-like blocks (3×3 convs + ReLU, 2×2 max-pool before
//!    blocks 2–5), each with a 1×1 side projection → five one-channel maps at 1, ½, ¼, ⅛, 1/16
//!    of the size;
//! 3. [`edge_from_projections`] (on the host): each map `cv2.resize`d to `w`×`h` with
//!    `INTER_LINEAR` in `float32`, their mean (`float32`, summed in order), sigmoid in `float64`;
//!    `softedge_hedsafe` applies `safe_step`; then `(edge * 255).clip(0, 255).astype(uint8)`;
//! 4. `scribble_hed`: [`annotators::post::scribble`] on that map.
//!
//! The final `resize_image(…, image_resolution)` of the reference is the identity here (the
//! hint stays at the detect size). The hint is grey, returned as three equal channels.
use annotators::ops::PlaneF32;
use annotators::post;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use image::{GrayImage, RgbImage};

use crate::{Detector, Result};

/// One `DoubleConvBlock`: `convs.{i}` (3×3, padding 1, ReLU after each) and `projection` (1×1
/// to one channel).
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<Conv2d>,
    projection: Conv2d,
}

impl Block {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, layers: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let convs = (0..layers)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                candle_nn::conv2d(c, c_out, 3, cfg, vb.pp(format!("convs.{i}")))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let projection = candle_nn::conv2d(c_out, 1, 1, Default::default(), vb.pp("projection"))?;
        Ok(Self { convs, projection })
    }

    fn forward(&self, x: &Tensor, down_sampling: bool) -> candle_core::Result<(Tensor, Tensor)> {
        let mut h = if down_sampling {
            x.max_pool2d(2)?
        } else {
            x.clone()
        };
        for conv in &self.convs {
            h = conv.forward(&h)?.relu()?;
        }
        let p = self.projection.forward(&h)?;
        Ok((h, p))
    }
}

/// `ControlNetHED_Apache2`, weights named as in its `state_dict` (`norm`, `block1.convs.0.weight`,
/// …, `block5.projection.bias`).
#[derive(Debug, Clone)]
pub struct Hed {
    norm: Tensor,
    blocks: [Block; 5],
    device: Device,
    dtype: DType,
}

impl Hed {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let norm = vb.get((1, 3, 1, 1), "norm")?;
        let spec = [
            (3, 64, 2),
            (64, 128, 2),
            (128, 256, 3),
            (256, 512, 3),
            (512, 512, 3),
        ];
        let mut blocks = Vec::with_capacity(5);
        for (i, &(c_in, c_out, n)) in spec.iter().enumerate() {
            blocks.push(Block::new(
                vb.pp(format!("block{}", i + 1)),
                c_in,
                c_out,
                n,
            )?);
        }
        let blocks: [Block; 5] = blocks.try_into().expect("five blocks");
        Ok(Self {
            norm,
            blocks,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The five side projections for `x` (`1×3×h×w`, RGB 0..255, on the network's device and
    /// dtype): `1×1×h×w`, `1×1×h/2×w/2`, … `1×1×h/16×w/16` (sizes floored by the pools).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut h = x.broadcast_sub(&self.norm)?;
        let mut out = Vec::with_capacity(5);
        for (i, block) in self.blocks.iter().enumerate() {
            let (next, p) = block.forward(&h, i > 0)?;
            out.push(p);
            h = next;
        }
        Ok(out)
    }

    /// Runs the network on an RGB image; the projections come back to the host as `f32`
    /// one-channel planes.
    pub fn projections(&self, image: &RgbImage) -> Result<Vec<PlaneF32>> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let raw = image.as_raw();
        let mut planar = vec![0u8; 3 * h * w];
        for (c, plane) in planar.chunks_mut(h * w).enumerate() {
            for (i, v) in plane.iter_mut().enumerate() {
                *v = raw[i * 3 + c];
            }
        }
        let x = Tensor::from_vec(planar, (1, 3, h, w), &self.device)?.to_dtype(self.dtype)?;
        let mut planes = Vec::with_capacity(5);
        for p in self.forward(&x)? {
            let (_, _, ph, pw) = p.dims4()?;
            let data = p.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            planes.push(PlaneF32 {
                width: pw,
                height: ph,
                channels: 1,
                data,
            });
        }
        Ok(planes)
    }
}

/// Steps 3 of the module docs: the grey `u8` soft-edge map (`width`×`height`) from HED's five
/// projections (one-channel planes, any sizes); `safe` applies `safe_step`.
pub fn edge_from_projections(
    projections: &[PlaneF32],
    width: usize,
    height: usize,
    safe: bool,
) -> GrayImage {
    let resized: Vec<Vec<f32>> = projections
        .iter()
        .map(|p| {
            assert_eq!(p.channels, 1, "HED projections have one channel");
            post::resize_linear_f32(&p.data, p.width, p.height, width, height)
        })
        .collect();
    let n = resized.len() as f32;
    let data = (0..width * height)
        .map(|i| {
            // np.mean over the stacked axis: float32, summed in order, divided by the count.
            let mut s = resized[0][i];
            for r in &resized[1..] {
                s += r[i];
            }
            let edge = post::sigmoid_f64((s / n) as f64);
            if safe {
                post::unit_to_u8(post::safe_step(edge as f32))
            } else {
                post::unit_to_u8_f64(edge)
            }
        })
        .collect();
    GrayImage::from_raw(width as u32, height as u32, data).expect("buffer size")
}

/// The grey hint of `preprocessor` from HED's projections (steps 3–4).
pub fn hint_from_projections(
    preprocessor: &str,
    projections: &[PlaneF32],
    width: usize,
    height: usize,
) -> Result<GrayImage> {
    Ok(match preprocessor {
        "softedge_hed" => edge_from_projections(projections, width, height, false),
        "softedge_hedsafe" => edge_from_projections(projections, width, height, true),
        "scribble_hed" => post::scribble(&edge_from_projections(projections, width, height, false)),
        other => {
            return Err(diffusion::Error::Config(format!(
                "HED does not serve `{other}`"
            )))
        }
    })
}

impl Detector for Hed {
    fn detect(&self, preprocessor: &str, image: &RgbImage, _params: &[f64]) -> Result<RgbImage> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let projections = self.projections(image)?;
        let grey = hint_from_projections(preprocessor, &projections, w, h)?;
        Ok(post::gray_to_rgb(&grey))
    }
}
