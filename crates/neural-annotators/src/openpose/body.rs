//! The OpenPose body network (`bodypose_model`, `body_pose_model.pth`) and the body pipeline
//! exactly as controlnet_aux 0.0.10's `Body.__call__` + `Body.format_body_result` run it (A1111's
//! `annotator/openpose/body.py` is the same code).
//!
//! Reference steps, for the detect-size image `H`×`W` (RGB; `detect_poses` flips it to BGR):
//! 1. [`network_input`]: one scale only (`scale_search = [0.5]`): `s = 0.5 * 368 / H`;
//!    `util.smart_resize_k(img, s, s)`: `cv2.resize` to `(int(W*s), int(H*s))` with `INTER_AREA`
//!    if `k = (H*s + W*s) / (H + W) < 1`, else `INTER_LANCZOS4` (8-bit, [`super::resize`]);
//!    `padRightDownCorner`: pad right and down to a multiple of 8 with 128; `float32 / 256 - 0.5`,
//!    BGR, `1×3×h×w`;
//! 2. [`BodyNet::forward`]: VGG-19 front (`model0`) and six CPM stages → PAFs `1×38×h/8×w/8`
//!    (`Mconv7_stage6_L1`) and heatmaps `1×19×h/8×w/8` (`Mconv7_stage6_L2`, which keeps a ReLU:
//!    the reference's `no_relu_layers` names `Mconv7_stage6_L1` twice and `…_L2` never);
//! 3. [`maps_to_image_size`] (host, `float32`, each channel on its own as `smart_resize_k` /
//!    `smart_resize` do for 19 or 38 channels): `×8` with `INTER_LANCZOS4`, crop the padding,
//!    resize to `W`×`H` (`INTER_AREA` if `(H + W) / (h + w) < 1`, else `INTER_LANCZOS4`; a
//!    same-size resize is a copy). The reference then averages over its single scale into
//!    `float64` arrays: the values stay the `float32` ones. The float resizes are
//!    [`annotators::ops::resize_lanczos4_f32`] and [`annotators::ops::resize_area_f32`],
//!    bit-exact to OpenCV 4.x;
//! 4. [`find_peaks`]: per part (18), [`annotators::scipy::gaussian_filter`] σ = 3 as
//!    `scipy.ndimage.gaussian_filter` computes it in `float64` (radius 12, mode `reflect`, axis 0
//!    then 1); a peak is `≥` its four neighbours (0 outside) and `> 0.1`; row-major order; score
//!    from the unsmoothed map; ids numbered across parts;
//! 5. [`find_connections`]: for each of the 19 limbs, every candidate pair scored on its PAF at
//!    10 points (`np.linspace`, indices by Python's `round`, ties to even), mean + distance prior
//!    `min(0.5 H / norm - 1, 0)`, kept if more than 8 samples `> 0.05` and the score `> 0`;
//!    sorted by score (stable, descending) and taken greedily, each part once, at most
//!    `min(nA, nB)`;
//! 6. [`group`]: the greedy assembly into people (`subset`, rows of 20 `float64`: 18 candidate
//!    indices or −1, total score, part count) with the reference's merge rule and its deletion
//!    of people with fewer than 4 parts or a mean score below 0.4;
//! 7. [`format_body_result`] (pixel coordinates, score, id) and, as `detect_poses` returns them,
//!    [`normalise`] (`x / W`, `y / H`, score 1, id −1).
//!
//! [`detect_bodies`] runs it all. The network's input goes to the device once and the two maps
//! come back once; everything after the network runs on the host.
use annotators::{ops, scipy};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use image::RgbImage;

use super::{resize, BodyResult, Keypoint};
use crate::Result;

/// `boxsize`: the scale search is relative to this height.
pub const BOXSIZE: f64 = 368.0;
/// The reference's only scale (`scale_search = [0.5]`).
pub const SCALE: f64 = 0.5;
/// The network's output stride.
pub const STRIDE: usize = 8;
/// Padding value of `padRightDownCorner`.
pub const PAD_VALUE: u8 = 128;
/// Peak threshold (`thre1`).
pub const THRESH1: f64 = 0.1;
/// PAF sample threshold (`thre2`).
pub const THRESH2: f64 = 0.05;
/// Samples per limb (`mid_num`).
pub const MID_NUM: usize = 10;
/// Number of body parts (the heatmap's 19th channel is the background).
pub const PARTS: usize = 18;

/// `limbSeq`: the 19 limbs as pairs of 1-based part numbers, in the reference's order.
pub const LIMB_SEQ: [[usize; 2]; 19] = [
    [2, 3],
    [2, 6],
    [3, 4],
    [4, 5],
    [6, 7],
    [7, 8],
    [2, 9],
    [9, 10],
    [10, 11],
    [2, 12],
    [12, 13],
    [13, 14],
    [2, 1],
    [1, 15],
    [15, 17],
    [1, 16],
    [16, 18],
    [3, 17],
    [6, 18],
];

/// `mapIdx`: each limb's PAF channels, plus 19 (the PAF channel is `mapIdx - 19`).
pub const MAP_IDX: [[usize; 2]; 19] = [
    [31, 32],
    [39, 40],
    [33, 34],
    [35, 36],
    [41, 42],
    [43, 44],
    [19, 20],
    [21, 22],
    [23, 24],
    [25, 26],
    [27, 28],
    [29, 30],
    [47, 48],
    [49, 50],
    [53, 54],
    [51, 52],
    [55, 56],
    [37, 38],
    [45, 46],
];

/// The reference's `no_relu_layers`, verbatim (with its duplicate): every other conv has a ReLU.
const NO_RELU: [&str; 12] = [
    "conv5_5_CPM_L1",
    "conv5_5_CPM_L2",
    "Mconv7_stage2_L1",
    "Mconv7_stage2_L2",
    "Mconv7_stage3_L1",
    "Mconv7_stage3_L2",
    "Mconv7_stage4_L1",
    "Mconv7_stage4_L2",
    "Mconv7_stage5_L1",
    "Mconv7_stage5_L2",
    "Mconv7_stage6_L1",
    "Mconv7_stage6_L1",
];

// ---------------------------------------------------------------------------------------------
// Network
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Layer {
    /// A conv (named as in the file) and whether a ReLU follows it.
    Conv(Conv2d, bool),
    /// `MaxPool2d(2, 2, 0)`.
    Pool,
}

/// One of `make_layers`' `nn.Sequential` blocks.
#[derive(Debug, Clone)]
struct Block(Vec<Layer>);

/// A layer spec as in `model.py`: name, then `[in, out, kernel, stride, padding]` for a conv,
/// `None` for a pool.
type Spec = (String, Option<[usize; 4]>);

impl Block {
    fn new(vb: &VarBuilder, specs: &[Spec]) -> Result<Self> {
        let mut layers = Vec::with_capacity(specs.len());
        for (name, spec) in specs {
            match spec {
                None => layers.push(Layer::Pool),
                Some([c_in, c_out, k, pad]) => {
                    let cfg = Conv2dConfig {
                        padding: *pad,
                        ..Default::default()
                    };
                    let conv = candle_nn::conv2d(*c_in, *c_out, *k, cfg, vb.pp(name))?;
                    layers.push(Layer::Conv(conv, !NO_RELU.contains(&name.as_str())));
                }
            }
        }
        Ok(Self(layers))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.0 {
            h = match layer {
                Layer::Conv(conv, relu) => {
                    let y = conv.forward(&h)?;
                    if *relu {
                        y.relu()?
                    } else {
                        y
                    }
                }
                Layer::Pool => h.max_pool2d(2)?,
            };
        }
        Ok(h)
    }
}

fn conv(name: &str, c_in: usize, c_out: usize, k: usize, pad: usize) -> Spec {
    (name.to_string(), Some([c_in, c_out, k, pad]))
}

fn pool(name: &str) -> Spec {
    (name.to_string(), None)
}

/// `bodypose_model`, weights named by the FILE's keys (`conv1_1.weight`, …,
/// `Mconv7_stage6_L2.bias`: `util.transfer` strips the module prefix `model0.`, `model1_1.`, …).
#[derive(Debug, Clone)]
pub struct BodyNet {
    model0: Block,
    /// `model{stage}_1` (PAFs, L1) for stages 1–6.
    paf: Vec<Block>,
    /// `model{stage}_2` (heatmaps, L2) for stages 1–6.
    heat: Vec<Block>,
    device: Device,
    dtype: DType,
}

impl BodyNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let model0 = Block::new(
            &vb,
            &[
                conv("conv1_1", 3, 64, 3, 1),
                conv("conv1_2", 64, 64, 3, 1),
                pool("pool1_stage1"),
                conv("conv2_1", 64, 128, 3, 1),
                conv("conv2_2", 128, 128, 3, 1),
                pool("pool2_stage1"),
                conv("conv3_1", 128, 256, 3, 1),
                conv("conv3_2", 256, 256, 3, 1),
                conv("conv3_3", 256, 256, 3, 1),
                conv("conv3_4", 256, 256, 3, 1),
                pool("pool3_stage1"),
                conv("conv4_1", 256, 512, 3, 1),
                conv("conv4_2", 512, 512, 3, 1),
                conv("conv4_3_CPM", 512, 256, 3, 1),
                conv("conv4_4_CPM", 256, 128, 3, 1),
            ],
        )?;
        let mut paf = Vec::with_capacity(6);
        let mut heat = Vec::with_capacity(6);
        for (branch, out, blocks) in [(1, 38, &mut paf), (2, 19, &mut heat)] {
            blocks.push(Block::new(
                &vb,
                &[
                    conv(&format!("conv5_1_CPM_L{branch}"), 128, 128, 3, 1),
                    conv(&format!("conv5_2_CPM_L{branch}"), 128, 128, 3, 1),
                    conv(&format!("conv5_3_CPM_L{branch}"), 128, 128, 3, 1),
                    conv(&format!("conv5_4_CPM_L{branch}"), 128, 512, 1, 0),
                    conv(&format!("conv5_5_CPM_L{branch}"), 512, out, 1, 0),
                ],
            )?);
            for stage in 2..=6 {
                let n = |i: usize| format!("Mconv{i}_stage{stage}_L{branch}");
                blocks.push(Block::new(
                    &vb,
                    &[
                        conv(&n(1), 185, 128, 7, 3),
                        conv(&n(2), 128, 128, 7, 3),
                        conv(&n(3), 128, 128, 7, 3),
                        conv(&n(4), 128, 128, 7, 3),
                        conv(&n(5), 128, 128, 7, 3),
                        conv(&n(6), 128, 128, 1, 0),
                        conv(&n(7), 128, out, 1, 0),
                    ],
                )?);
            }
        }
        Ok(Self {
            model0,
            paf,
            heat,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// `bodypose_model.forward`: `x` is `1×3×h×w` (BGR, `/256 - 0.5`, `h`, `w` multiples of 8);
    /// returns `(PAFs 1×38×h/8×w/8, heatmaps 1×19×h/8×w/8)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let out1 = self.model0.forward(x)?;
        let mut l1 = self.paf[0].forward(&out1)?;
        let mut l2 = self.heat[0].forward(&out1)?;
        for stage in 1..6 {
            let cat = Tensor::cat(&[&l1, &l2, &out1], 1)?;
            l1 = self.paf[stage].forward(&cat)?;
            l2 = self.heat[stage].forward(&cat)?;
        }
        Ok((l1, l2))
    }

    /// Runs the network on a prepared input ([`network_input`]): the input goes to the device
    /// once, the maps come back once, as `f32` (PAFs, heatmaps) at `1/8` of the padded size.
    pub fn maps(&self, input: &NetworkInput) -> Result<(Maps, Maps)> {
        let (pw, ph) = (input.padded_width, input.padded_height);
        let x = Tensor::from_slice(&input.data, (1, 3, ph, pw), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let (paf, heat) = self.forward(&x)?;
        let host = |t: &Tensor| -> Result<Maps> {
            let (_, c, h, w) = t.dims4()?;
            let data = t
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(Maps {
                channels: c,
                height: h,
                width: w,
                data,
            })
        };
        Ok((host(&paf)?, host(&heat)?))
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-processing
// ---------------------------------------------------------------------------------------------

/// Channel-planar `f32` maps: `data[(c * height + y) * width + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Maps {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Maps {
    /// Channel `c` as a row-major plane.
    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.width * self.height;
        &self.data[c * n..(c + 1) * n]
    }

    /// The value at `(x, y)` of channel `c`.
    #[inline]
    pub fn at(&self, c: usize, x: usize, y: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }
}

/// The network input: the image scaled to `width`×`height`, padded to
/// `padded_width`×`padded_height`, as `1×3×h×w` BGR `f32` values `v / 256 - 0.5`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkInput {
    pub width: usize,
    pub height: usize,
    pub padded_width: usize,
    pub padded_height: usize,
    pub data: Vec<f32>,
}

/// The scale factor for an image `height` pixels high: `0.5 * 368 / H`, as Python evaluates it.
pub fn scale_for(height: usize) -> f64 {
    SCALE * BOXSIZE / height as f64
}

/// Step 1 of the module docs: the scaled, padded, normalised BGR input for an RGB image.
pub fn network_input(image: &RgbImage) -> Result<NetworkInput> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let s = scale_for(h);
    let (tw, th) = resize::smart_resize_k_size(w, h, s, s);
    if tw == 0 || th == 0 {
        return Err(diffusion::Error::Config(format!(
            "OpenPose: a {w}×{h} image scales to {tw}×{th} (too thin)"
        )));
    }
    let scaled = resize::smart_resize_k_u8(image, s, s);
    let pad = |n: usize| n.div_ceil(STRIDE) * STRIDE;
    let (pw, ph) = (pad(tw), pad(th));
    let raw = scaled.as_raw();
    let norm = |v: u8| v as f32 / 256.0 - 0.5;
    let mut data = vec![norm(PAD_VALUE); 3 * ph * pw];
    for c in 0..3 {
        // BGR: plane 0 is the image's blue channel.
        let src_c = 2 - c;
        for y in 0..th {
            let row = &mut data[(c * ph + y) * pw..(c * ph + y) * pw + tw];
            for (x, v) in row.iter_mut().enumerate() {
                *v = norm(raw[(y * tw + x) * 3 + src_c]);
            }
        }
    }
    Ok(NetworkInput {
        width: tw,
        height: th,
        padded_width: pw,
        padded_height: ph,
        data,
    })
}

/// Step 3 of the module docs: the network's maps (`1/8` of the padded input) back at the image
/// size `width`×`height`, given the scaled (unpadded) size `input_width`×`input_height`.
pub fn maps_to_image_size(
    maps: &Maps,
    input_width: usize,
    input_height: usize,
    width: usize,
    height: usize,
) -> Maps {
    let (uw, uh) = (maps.width * STRIDE, maps.height * STRIDE);
    assert!(
        input_width <= uw && input_height <= uh,
        "crop inside the map"
    );
    let mut data = Vec::with_capacity(maps.channels * width * height);
    let mut crop = vec![0f32; input_width * input_height];
    for c in 0..maps.channels {
        let up = ops::resize_lanczos4_f32(maps.plane(c), maps.width, maps.height, uw, uh);
        for y in 0..input_height {
            crop[y * input_width..(y + 1) * input_width]
                .copy_from_slice(&up[y * uw..y * uw + input_width]);
        }
        let out = resize::smart_resize_f32(&crop, input_width, input_height, width, height);
        data.extend_from_slice(&out);
    }
    Maps {
        channels: maps.channels,
        height,
        width,
        data,
    }
}

/// Steps 1–3: the heatmaps (19) and PAFs (38) of an RGB image at its own size — the
/// reference's `heatmap_avg` and `paf_avg` (`float64` arrays holding these `float32` values).
pub fn image_maps(net: &BodyNet, image: &RgbImage) -> Result<(Maps, Maps)> {
    let input = network_input(image)?;
    let (paf, heat) = net.maps(&input)?;
    let (w, h) = (image.width() as usize, image.height() as usize);
    let heat = maps_to_image_size(&heat, input.width, input.height, w, h);
    let paf = maps_to_image_size(&paf, input.width, input.height, w, h);
    Ok((heat, paf))
}

// ---------------------------------------------------------------------------------------------
// Peaks
// ---------------------------------------------------------------------------------------------

/// One candidate part: pixel position, score (the unsmoothed heatmap there) and id (its index
/// in the reference's `candidate` array).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    pub x: usize,
    pub y: usize,
    pub score: f64,
    pub id: usize,
}

/// Step 4: the peaks of the 18 part heatmaps (`heatmap` at the image size, ≥ 18 channels).
pub fn find_peaks(heatmap: &Maps) -> Vec<Vec<Peak>> {
    let (w, h) = (heatmap.width, heatmap.height);
    let mut all = Vec::with_capacity(PARTS);
    let mut counter = 0;
    for part in 0..PARTS {
        let ori: Vec<f64> = heatmap.plane(part).iter().map(|&v| v as f64).collect();
        let s = scipy::gaussian_filter(&ori, w, h, 3.0);
        let mut peaks = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let v = s[y * w + x];
                let up = if y > 0 { s[(y - 1) * w + x] } else { 0.0 };
                let down = if y + 1 < h { s[(y + 1) * w + x] } else { 0.0 };
                let left = if x > 0 { s[y * w + x - 1] } else { 0.0 };
                let right = if x + 1 < w { s[y * w + x + 1] } else { 0.0 };
                if v >= up && v >= down && v >= left && v >= right && v > THRESH1 {
                    peaks.push(Peak {
                        x,
                        y,
                        score: ori[y * w + x],
                        id: counter,
                    });
                    counter += 1;
                }
            }
        }
        all.push(peaks);
    }
    all
}

/// The reference's `candidate` array: every peak, part by part (row `id` is peak `id`).
pub fn candidates(peaks: &[Vec<Peak>]) -> Vec<Peak> {
    peaks.iter().flatten().copied().collect()
}

// ---------------------------------------------------------------------------------------------
// Connections and grouping
// ---------------------------------------------------------------------------------------------

/// One chosen limb: a row of the reference's `connection` (`[idA, idB, score, i, j]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Connection {
    /// Candidate ids of the two parts.
    pub id_a: usize,
    pub id_b: usize,
    /// `score_with_dist_prior`.
    pub score: f64,
    /// Indices of the two parts among their part's peaks.
    pub i: usize,
    pub j: usize,
}

/// `np.linspace(a, b, num=10)` for integer end points: `i * step + a`, the last one `b`.
fn linspace10(a: usize, b: usize) -> [f64; MID_NUM] {
    let (a, b) = (a as f64, b as f64);
    let delta = b - a;
    let div = (MID_NUM - 1) as f64;
    let step = delta / div;
    let mut y = [0f64; MID_NUM];
    for (i, v) in y.iter_mut().enumerate() {
        *v = if step == 0.0 {
            (i as f64 / div) * delta + a
        } else {
            i as f64 * step + a
        };
    }
    y[MID_NUM - 1] = b;
    y
}

/// Step 5: for each limb, the chosen connections, or `None` where one of its parts has no peak
/// (the reference's `special_k`). `paf` is at the image size (38 channels); `image_height` is
/// `oriImg.shape[0]` (the distance prior).
pub fn find_connections(
    peaks: &[Vec<Peak>],
    paf: &Maps,
    image_height: usize,
) -> Vec<Option<Vec<Connection>>> {
    let mut all = Vec::with_capacity(LIMB_SEQ.len());
    for (k, limb) in LIMB_SEQ.iter().enumerate() {
        let cand_a = &peaks[limb[0] - 1];
        let cand_b = &peaks[limb[1] - 1];
        let (na, nb) = (cand_a.len(), cand_b.len());
        if na == 0 || nb == 0 {
            all.push(None);
            continue;
        }
        let (cx, cy) = (MAP_IDX[k][0] - 19, MAP_IDX[k][1] - 19);
        let mut scored: Vec<(usize, usize, f64)> = Vec::new();
        for (i, a) in cand_a.iter().enumerate() {
            for (j, b) in cand_b.iter().enumerate() {
                let vx = b.x as i64 - a.x as i64;
                let vy = b.y as i64 - a.y as i64;
                let norm = ((vx * vx + vy * vy) as f64).sqrt().max(0.001);
                let (ux, uy) = (vx as f64 / norm, vy as f64 / norm);
                let xs = linspace10(a.x, b.x);
                let ys = linspace10(a.y, b.y);
                let mut sum = 0.0;
                let mut above = 0;
                for s in 0..MID_NUM {
                    let px = xs[s].round_ties_even() as usize;
                    let py = ys[s].round_ties_even() as usize;
                    let m = paf.at(cx, px, py) as f64 * ux + paf.at(cy, px, py) as f64 * uy;
                    sum += m;
                    if m > THRESH2 {
                        above += 1;
                    }
                }
                let prior = 0.5 * image_height as f64 / norm - 1.0;
                let prior = if 0.0 < prior { 0.0 } else { prior };
                let score = sum / MID_NUM as f64 + prior;
                if above as f64 > 0.8 * MID_NUM as f64 && score > 0.0 {
                    scored.push((i, j, score));
                }
            }
        }
        // sorted(..., key=score, reverse=True): stable, descending.
        scored.sort_by(|p, q| q.2.partial_cmp(&p.2).unwrap_or(std::cmp::Ordering::Equal));
        let mut chosen: Vec<Connection> = Vec::new();
        for (i, j, score) in scored {
            if chosen.iter().all(|c| c.i != i && c.j != j) {
                chosen.push(Connection {
                    id_a: cand_a[i].id,
                    id_b: cand_b[j].id,
                    score,
                    i,
                    j,
                });
                if chosen.len() >= na.min(nb) {
                    break;
                }
            }
        }
        all.push(Some(chosen));
    }
    all
}

/// A row of the reference's `subset`: candidate indices of the 18 parts (−1: none), then the
/// total score and the number of parts, all `float64`.
pub type Person = [f64; 20];

/// Step 6: the reference's greedy grouping of `connections` into people, then its deletion of
/// people with fewer than 4 parts or a mean score below 0.4. `candidate` is [`candidates`].
///
/// Where a connection matches more than two people (possible after the reference's
/// "found 2, not disjoint" branch puts one part into two people), the reference raises
/// `IndexError`; this returns an error there.
pub fn group(candidate: &[Peak], connections: &[Option<Vec<Connection>>]) -> Result<Vec<Person>> {
    let mut subset: Vec<Person> = Vec::new();
    for (k, conns) in connections.iter().enumerate() {
        let Some(conns) = conns else { continue };
        let ia = LIMB_SEQ[k][0] - 1;
        let ib = LIMB_SEQ[k][1] - 1;
        for c in conns {
            let (pa, pb) = (c.id_a as f64, c.id_b as f64);
            let mut found = 0;
            let mut idx = [0usize; 2];
            for (j, person) in subset.iter().enumerate() {
                if person[ia] == pa || person[ib] == pb {
                    if found == 2 {
                        return Err(diffusion::Error::Config(
                            "OpenPose body grouping: a limb matches more than two people \
                             (the reference raises IndexError here)"
                                .into(),
                        ));
                    }
                    idx[found] = j;
                    found += 1;
                }
            }
            let score_b = candidate[c.id_b].score;
            if found == 1 {
                let p = &mut subset[idx[0]];
                if p[ib] != pb {
                    p[ib] = pb;
                    p[19] += 1.0;
                    p[18] += score_b + c.score;
                }
            } else if found == 2 {
                let (j1, j2) = (idx[0], idx[1]);
                let (s1, s2) = (subset[j1], subset[j2]);
                let disjoint = (0..18).all(|p| !(s1[p] >= 0.0 && s2[p] >= 0.0));
                let p = &mut subset[j1];
                if disjoint {
                    for q in 0..18 {
                        p[q] += s2[q] + 1.0;
                    }
                    p[18] += s2[18];
                    p[19] += s2[19];
                    p[18] += c.score;
                    subset.remove(j2);
                } else {
                    p[ib] = pb;
                    p[19] += 1.0;
                    p[18] += score_b + c.score;
                }
            } else if k < 17 {
                let mut row = [-1f64; 20];
                row[ia] = pa;
                row[ib] = pb;
                row[19] = 2.0;
                row[18] = (candidate[c.id_a].score + score_b) + c.score;
                subset.push(row);
            }
        }
    }
    subset.retain(|p| !(p[19] < 4.0 || p[18] / p[19] < 0.4));
    Ok(subset)
}

/// Steps 4–6 on maps at the image size (`heatmap` 19 channels, `paf` 38): the reference's
/// `(candidate, subset)`.
pub fn candidates_and_subset(heatmap: &Maps, paf: &Maps) -> Result<(Vec<Peak>, Vec<Person>)> {
    let peaks = find_peaks(heatmap);
    let connections = find_connections(&peaks, paf, heatmap.height);
    let candidate = candidates(&peaks);
    let subset = group(&candidate, &connections)?;
    Ok((candidate, subset))
}

/// `Body.format_body_result`: pixel coordinates, the candidate's score and id.
pub fn format_body_result(candidate: &[Peak], subset: &[Person]) -> Vec<BodyResult> {
    subset
        .iter()
        .map(|person| BodyResult {
            keypoints: person[..PARTS]
                .iter()
                .map(|&i| {
                    let i = i as i64;
                    (i != -1).then(|| {
                        let c = candidate[i as usize];
                        Keypoint {
                            x: c.x as f64,
                            y: c.y as f64,
                            score: c.score,
                            id: c.id as i64,
                        }
                    })
                })
                .collect(),
            total_score: person[18],
            total_parts: person[19] as usize,
        })
        .collect()
}

/// What `detect_poses` makes of a body: keypoints `x / W`, `y / H` with the default score 1 and
/// id −1; total score and part count kept.
pub fn normalise(bodies: &[BodyResult], width: usize, height: usize) -> Vec<BodyResult> {
    bodies
        .iter()
        .map(|b| BodyResult {
            keypoints: b
                .keypoints
                .iter()
                .map(|k| k.map(|k| Keypoint::at(k.x / width as f64, k.y / height as f64)))
                .collect(),
            total_score: b.total_score,
            total_parts: b.total_parts,
        })
        .collect()
}

/// `format_body_result(*Body(bgr))`: the bodies of an RGB image in pixel coordinates, with
/// scores and ids (what the reference's hand and face boxes are computed from).
pub fn detect_bodies_pixels(net: &BodyNet, image: &RgbImage) -> Result<Vec<BodyResult>> {
    let (heat, paf) = image_maps(net, image)?;
    let (candidate, subset) = candidates_and_subset(&heat, &paf)?;
    Ok(format_body_result(&candidate, &subset))
}

/// The bodies as `detect_poses` returns them: coordinates normalised by the image's width and
/// height ([`normalise`]).
pub fn detect_bodies(net: &BodyNet, image: &RgbImage) -> Result<Vec<BodyResult>> {
    let bodies = detect_bodies_pixels(net, image)?;
    Ok(normalise(
        &bodies,
        image.width() as usize,
        image.height() as usize,
    ))
}
