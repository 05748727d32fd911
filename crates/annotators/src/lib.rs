//! Condition preprocessors ("annotators"): turn a photo into a ControlNet hint image.
//!
//! Pure image operations — no HTTP, no async. The HTTP layer calls [`run`] for
//! `POST /v1/detect`, A1111's `/controlnet/detect`, and for units of a generate request whose
//! `module` is not `none`; [`list`] feeds `/controlnet/module_list`.
//!
//! ```
//! let photo = image::RgbImage::from_pixel(300, 200, image::Rgb([90, 120, 200]));
//! let hint = annotators::run("canny", &photo, 512, &annotators::Params::new(), 0).unwrap();
//! assert_eq!(hint.dimensions(), (768, 512)); // short side 512, both sides multiples of 64
//! ```
//!
//! # What `run` does
//!
//! The names are the A1111 ControlNet extension's module names (the labels its UI shows, e.g.
//! `depth_midas`, `softedge_hed`); its internal names (`depth`, `hed`, …) and `None` are
//! accepted as aliases by [`find`]. Preprocessors that use a detect resolution (those whose
//! [`Preprocessor::resolution`] is `Some`) first resize the image the way controlnet_aux's
//! `resize_image` does: the short side becomes `resolution`, both sides are rounded to a multiple
//! of 64, `INTER_LANCZOS4` when enlarging and `INTER_AREA` otherwise. The hint is returned at that
//! detect size; fitting it to the generation size is the caller's job. The others (`none`,
//! `invert`, `tile_resample`) work at the input size, as in A1111, and ignore `resolution`.
//!
//! # Limits
//!
//! * `resolution` must lie in [`MIN_RESOLUTION`]`..=`[`MAX_RESOLUTION`] (64..=2048, A1111's
//!   slider range) for preprocessors that use it; outside it is a [`AnnotatorError::BadParam`]
//!   naming `processor_res`.
//! * An input with a zero side is [`AnnotatorError::EmptyImage`]; one with more than
//!   [`MAX_INPUT_PIXELS`] pixels, or whose detect size would have a side over
//!   [`MAX_DETECT_SIDE`] (a very elongated image), is [`AnnotatorError::ImageTooLarge`].
//! * Parameters are checked against their [`ParamSpec`]: unknown names, NaN/∞ and values
//!   outside `min..=max` are [`AnnotatorError::BadParam`] naming the parameter. Nothing panics
//!   on user input.
//!
//! # `model_free`
//!
//! Here `model_free` means "needs no annotator network weights" (so [`run`] can execute it).
//! A1111's `module_detail.model_free` means something else (usable without a ControlNet model,
//! e.g. `reference_only`): for that field the HTTP layer should report `false` for everything
//! listed here.
//!
//! # Fidelity
//!
//! The image operations in [`ops`] follow OpenCV's definitions (the references call `cv2`); the
//! parity test `tests/parity.rs` compares them with OpenCV's output for fixtures written by
//! `tools/parity/make_annotator_fixtures.py`. `shuffle` draws its noise from ChaCha8 seeded
//! with `seed` — deterministic per seed, but not numpy's RNG, so not the reference's pixels.

use std::collections::BTreeMap;

use image::RgbImage;

pub mod draw_cv;
pub mod lines;
pub mod ops;
pub mod post;
pub mod preprocess;
pub mod scipy;

/// Smallest accepted detect resolution (A1111's slider minimum).
pub const MIN_RESOLUTION: u32 = 64;
/// Largest accepted detect resolution (A1111's slider maximum).
pub const MAX_RESOLUTION: u32 = 2048;
/// Largest input image accepted, in pixels (64 MP).
pub const MAX_INPUT_PIXELS: u64 = 8192 * 8192;
/// Largest side a detect-resolution image may have (bounds the work for elongated inputs).
pub const MAX_DETECT_SIDE: u32 = 8192;

/// Named numeric parameters for [`run`]: parameter name → value. Missing names take the
/// [`ParamSpec::default`].
pub type Params = BTreeMap<String, f64>;

/// One numeric parameter of a preprocessor (an A1111 `module_detail` slider).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamSpec {
    /// Key in [`Params`].
    pub name: &'static str,
    /// Human-readable label (A1111's slider label).
    pub label: &'static str,
    pub min: f64,
    pub max: f64,
    pub default: f64,
    pub step: f64,
}

/// How a weight-free preprocessor runs: on the image at its detect size (or at the input size
/// for those without a resolution), with its validated parameters in [`Preprocessor::params`]
/// order, and the request's seed.
pub type FreeRun = fn(&RgbImage, &[f64], u64) -> RgbImage;

/// A preprocessor as listed in `/controlnet/module_list`: its spec, and for weight-free ones the
/// function that runs it. Those that need a network (`free_run: None`) are run by the engine,
/// which owns the device and the loaded networks; this crate only validates their requests.
#[derive(Clone, Copy, Debug)]
pub struct Preprocessor {
    /// A1111 module name.
    pub name: &'static str,
    /// Other names [`find`] accepts (A1111's internal names).
    pub aliases: &'static [&'static str],
    /// Runs without annotator network weights (see the crate docs for A1111's meaning).
    pub model_free: bool,
    /// The detect-resolution slider, if the preprocessor resizes to one (`processor_res`).
    pub resolution: Option<ParamSpec>,
    /// Further parameters; A1111's `threshold_a` / `threshold_b` are the first / second.
    pub params: &'static [ParamSpec],
    /// Annotator weight files it needs, named as the A1111 extension / controlnet_aux download
    /// them (mostly from lllyasviel/Annotators); empty if `model_free`.
    pub weights: &'static [&'static str],
    /// The implementation of a weight-free preprocessor (`Some` exactly when `model_free`).
    pub free_run: Option<FreeRun>,
    /// `Some(why, and what to use instead)` for a listed preprocessor this server deliberately
    /// does not run (A1111 lists it; we do not ship its network).
    pub unsupported: Option<&'static str>,
}

impl Preprocessor {
    /// The detect resolution used when the request gives none (A1111's `processor_res = -1`).
    pub fn default_resolution(&self) -> u32 {
        self.resolution.map_or(512, |r| r.default as u32)
    }

    /// [`Params`] from A1111's `threshold_a` / `threshold_b`: each maps onto the first / second
    /// parameter; `-1` (A1111's "module default") or a threshold the module has no parameter
    /// for is left out.
    pub fn params_from_thresholds(&self, threshold_a: f64, threshold_b: f64) -> Params {
        let mut p = Params::new();
        for (spec, v) in self.params.iter().zip([threshold_a, threshold_b]) {
            if v != -1.0 {
                p.insert(spec.name.to_string(), v);
            }
        }
        p
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AnnotatorError {
    #[error("unknown preprocessor {0:?}")]
    UnknownPreprocessor(String),
    #[error("bad parameter {name}={value}: {reason}")]
    BadParam {
        name: String,
        value: f64,
        reason: String,
    },
    /// A preprocessor that needs a network, asked of the pure-CPU [`run`] (the engine runs those).
    #[error("preprocessor {0:?} needs annotator weights that are not available")]
    NeedsWeights(String),
    /// The annotator weight file a preprocessor needs is not in the configured folder.
    #[error("preprocessor {preprocessor:?} needs the annotator weight file {file} (or its .safetensors), not found in {folder}")]
    MissingWeights {
        preprocessor: String,
        file: String,
        folder: String,
    },
    /// A listed preprocessor whose network this build does not implement yet.
    #[error("preprocessor {0:?} is not implemented yet; send an already preprocessed hint (preprocessor none)")]
    NotImplemented(String),
    /// A listed preprocessor this server deliberately does not run ([`Preprocessor::unsupported`]).
    #[error("preprocessor {preprocessor:?} is not supported by this server: {reason}; or send an already preprocessed hint (preprocessor none)")]
    Unsupported {
        preprocessor: String,
        reason: String,
    },
    #[error("empty image ({width}x{height})")]
    EmptyImage { width: u32, height: u32 },
    #[error("image too large ({width}x{height}): {reason}")]
    ImageTooLarge {
        width: u32,
        height: u32,
        reason: String,
    },
}

const fn p(
    name: &'static str,
    label: &'static str,
    min: f64,
    max: f64,
    default: f64,
    step: f64,
) -> ParamSpec {
    ParamSpec {
        name,
        label,
        min,
        max,
        default,
        step,
    }
}

const RES: Option<ParamSpec> = Some(p(
    "processor_res",
    "Resolution",
    MIN_RESOLUTION as f64,
    MAX_RESOLUTION as f64,
    512.0,
    1.0,
));

/// A weight-free preprocessor and its implementation.
const fn free(
    name: &'static str,
    aliases: &'static [&'static str],
    resolution: Option<ParamSpec>,
    params: &'static [ParamSpec],
    run: FreeRun,
) -> Preprocessor {
    Preprocessor {
        name,
        aliases,
        model_free: true,
        resolution,
        params,
        weights: &[],
        free_run: Some(run),
        unsupported: None,
    }
}

/// A preprocessor that needs annotator weights ([`run`] returns `NeedsWeights`).
const fn net(
    name: &'static str,
    aliases: &'static [&'static str],
    resolution: Option<ParamSpec>,
    params: &'static [ParamSpec],
    weights: &'static [&'static str],
) -> Preprocessor {
    Preprocessor {
        name,
        aliases,
        model_free: false,
        resolution,
        params,
        weights,
        free_run: None,
        unsupported: None,
    }
}

/// A listed network preprocessor this server does not run, with why and what to use instead.
const fn unsupported(pre: Preprocessor, reason: &'static str) -> Preprocessor {
    Preprocessor {
        unsupported: Some(reason),
        ..pre
    }
}

const HED: &[&str] = &["ControlNetHED.pth"];
const PIDI: &[&str] = &["table5_pidinet.pth"];
// The body network finds the people (and the hand and face boxes); the others refine them.
const POSE: &[&str] = &["body_pose_model.pth"];
const POSE_HAND: &[&str] = &["body_pose_model.pth", "hand_pose_model.pth"];
const POSE_FACE: &[&str] = &["body_pose_model.pth", "facenet.pth"];
const POSE_FULL: &[&str] = &["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"];
const LERES: &[ParamSpec] = &[
    p("remove_near", "Remove Near %", 0.0, 100.0, 0.0, 0.1),
    p(
        "remove_background",
        "Remove Background %",
        0.0,
        100.0,
        0.0,
        0.1,
    ),
];

const LERES_WHY: &str = "LeReS is not shipped; use depth_anything_v2 or depth_midas";
const ONEFORMER_WHY: &str =
    "OneFormer is not shipped; use seg_ufade20k or seg_segformer (same ADE20K palette)";

static PREPROCESSORS: &[Preprocessor] = &[
    free("none", &["None"], None, &[], |img, _, _| img.clone()),
    free(
        "canny",
        &[],
        RES,
        &[
            p(
                "low_threshold",
                "Canny Low Threshold",
                1.0,
                255.0,
                100.0,
                1.0,
            ),
            p(
                "high_threshold",
                "Canny High Threshold",
                1.0,
                255.0,
                200.0,
                1.0,
            ),
        ],
        |img, v, _| preprocess::canny(img, v[0], v[1]),
    ),
    free("invert", &[], None, &[], |img, _, _| {
        preprocess::invert(img)
    }),
    free(
        "tile_resample",
        &[],
        None,
        &[p(
            "down_sampling_rate",
            "Down Sampling Rate",
            1.0,
            8.0,
            1.0,
            0.01,
        )],
        |img, v, _| preprocess::tile_resample(img, v[0]),
    ),
    free("shuffle", &[], RES, &[], |img, _, seed| {
        preprocess::shuffle(img, seed)
    }),
    free(
        "scribble_xdog",
        &[],
        RES,
        &[p("threshold", "XDoG Threshold", 1.0, 64.0, 32.0, 1.0)],
        |img, v, _| preprocess::scribble_xdog(img, v[0]),
    ),
    free("lineart_standard", &[], RES, &[], |img, _, _| {
        preprocess::lineart_standard(img)
    }),
    net(
        "mlsd",
        &[],
        RES,
        &[
            p(
                "value_threshold",
                "MLSD Value Threshold",
                0.01,
                2.0,
                0.1,
                0.01,
            ),
            p(
                "distance_threshold",
                "MLSD Distance Threshold",
                0.01,
                20.0,
                0.1,
                0.01,
            ),
        ],
        &["mlsd_large_512_fp32.pth"],
    ),
    net("softedge_hed", &["hed"], RES, &[], HED),
    net("softedge_hedsafe", &["hed_safe"], RES, &[], HED),
    net("softedge_pidinet", &["pidinet"], RES, &[], PIDI),
    net("softedge_pidisafe", &["pidinet_safe"], RES, &[], PIDI),
    net("scribble_hed", &[], RES, &[], HED),
    net("scribble_pidinet", &["pidinet_scribble"], RES, &[], PIDI),
    net("openpose", &[], RES, &[], POSE),
    net("openpose_hand", &[], RES, &[], POSE_HAND),
    net("openpose_face", &[], RES, &[], POSE_FACE),
    net("openpose_faceonly", &[], RES, &[], POSE_FACE),
    net("openpose_full", &[], RES, &[], POSE_FULL),
    net(
        "depth_midas",
        &["depth"],
        RES,
        &[],
        &["dpt_hybrid-midas-501f0c75.pt"],
    ),
    net(
        "depth_anything_v2",
        &[],
        RES,
        &[],
        &["depth_anything_v2_vitl.pth"],
    ),
    unsupported(
        net("depth_leres", &[], RES, LERES, &["res101.pth"]),
        LERES_WHY,
    ),
    unsupported(
        net(
            "depth_leres++",
            &[],
            RES,
            LERES,
            &["res101.pth", "latest_net_G.pth"],
        ),
        LERES_WHY,
    ),
    unsupported(
        net("depth_zoe", &[], RES, &[], &["ZoeD_M12_N.pt"]),
        "ZoeDepth is not shipped; use depth_anything_v2 or depth_midas",
    ),
    unsupported(
        net(
            "depth_anything",
            &[],
            RES,
            &[],
            &["depth_anything_vitl14.pth"],
        ),
        "Depth Anything v1 is not shipped; use depth_anything_v2 (its successor)",
    ),
    net("normal_bae", &[], RES, &[], &["scannet.pt"]),
    net(
        "normal_midas",
        &["normal_map"],
        RES,
        &[p(
            "background_threshold",
            "Normal Background Threshold",
            0.0,
            1.0,
            0.4,
            0.01,
        )],
        &["dpt_hybrid-midas-501f0c75.pt"],
    ),
    net(
        "lineart_realistic",
        &["lineart"],
        RES,
        &[],
        &["sk_model.pth"],
    ),
    net("lineart_coarse", &[], RES, &[], &["sk_model2.pth"]),
    net("lineart_anime", &[], RES, &[], &["netG.pth"]),
    net("lineart_anime_denoise", &[], RES, &[], &["erika.pth"]),
    unsupported(
        net(
            "seg_ofade20k",
            &["oneformer_ade20k"],
            RES,
            &[],
            &["250_16_swin_l_oneformer_ade20k_160k.pth"],
        ),
        ONEFORMER_WHY,
    ),
    unsupported(
        net(
            "seg_ofcoco",
            &["oneformer_coco"],
            RES,
            &[],
            &["150_16_swin_l_oneformer_coco_100ep.pth"],
        ),
        ONEFORMER_WHY,
    ),
    net(
        "seg_ufade20k",
        &["segmentation"],
        RES,
        &[],
        &["upernet_global_small.pth"],
    ),
    net(
        "seg_segformer",
        &[],
        RES,
        &[],
        &["segformer/model.safetensors", "segformer/config.json"],
    ),
];

/// Every preprocessor, weight-free ones first.
pub fn list() -> &'static [Preprocessor] {
    PREPROCESSORS
}

/// The preprocessor called `name` (its A1111 module name or an alias), case-sensitive as in
/// A1111 except that `None` is accepted for `none`.
pub fn find(name: &str) -> Option<&'static Preprocessor> {
    PREPROCESSORS
        .iter()
        .find(|p| p.name == name || p.aliases.contains(&name))
}

fn bad(name: &str, value: f64, reason: impl Into<String>) -> AnnotatorError {
    AnnotatorError::BadParam {
        name: name.to_string(),
        value,
        reason: reason.into(),
    }
}

fn check_value(spec: &ParamSpec, v: f64) -> Result<f64, AnnotatorError> {
    if !v.is_finite() {
        return Err(bad(spec.name, v, "not a finite number"));
    }
    if v < spec.min || v > spec.max {
        return Err(bad(
            spec.name,
            v,
            format!("out of range {}..={}", spec.min, spec.max),
        ));
    }
    Ok(v)
}

/// The validated value of every parameter of `pre` (defaults filled in), in `pre.params` order.
pub fn resolve_params(pre: &Preprocessor, params: &Params) -> Result<Vec<f64>, AnnotatorError> {
    for (k, &v) in params {
        if !pre.params.iter().any(|s| s.name == k) {
            let accepted: Vec<&str> = pre.params.iter().map(|s| s.name).collect();
            return Err(bad(
                k,
                v,
                format!(
                    "unknown parameter for {}; accepted: [{}]",
                    pre.name,
                    accepted.join(", ")
                ),
            ));
        }
    }
    pre.params
        .iter()
        .map(|s| match params.get(s.name) {
            Some(&v) => check_value(s, v),
            None => Ok(s.default),
        })
        .collect()
}

/// A request for one preprocessor that passed every check: the image size, the detect
/// resolution and the parameters (defaults filled in, in [`Preprocessor::params`] order).
#[derive(Debug, Clone)]
pub struct Checked {
    pub pre: &'static Preprocessor,
    pub values: Vec<f64>,
    /// The detect resolution (meaningful only when `pre.resolution` is `Some`).
    pub resolution: u32,
}

impl Checked {
    /// The image the preprocessor works on: resized to the detect size (controlnet_aux's
    /// `resize_image`) for those with a resolution, the input itself for the others.
    pub fn input(&self, image: &RgbImage) -> RgbImage {
        if self.pre.resolution.is_some() {
            ops::resize_image(image, self.resolution)
        } else {
            image.clone()
        }
    }
}

/// Checks a request for preprocessor `name` (a module name or alias) on `image`: known name,
/// parameters, resolution (`None`: the preprocessor's default) and image size. Weight-free or
/// not, every preprocessor is checked here, before anything runs.
pub fn check(
    name: &str,
    image: &RgbImage,
    resolution: Option<u32>,
    params: &Params,
) -> Result<Checked, AnnotatorError> {
    let pre = find(name).ok_or_else(|| AnnotatorError::UnknownPreprocessor(name.to_string()))?;
    let resolution = resolution.unwrap_or_else(|| pre.default_resolution());
    let values = resolve_params(pre, params)?;
    if let Some(spec) = &pre.resolution {
        check_value(spec, resolution as f64)?;
    }
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(AnnotatorError::EmptyImage {
            width: w,
            height: h,
        });
    }
    if w as u64 * h as u64 > MAX_INPUT_PIXELS {
        return Err(AnnotatorError::ImageTooLarge {
            width: w,
            height: h,
            reason: format!("more than {MAX_INPUT_PIXELS} pixels"),
        });
    }
    if pre.resolution.is_some() {
        let (dw, dh, _) = ops::detect_size(w, h, resolution);
        if dw.max(dh) > MAX_DETECT_SIDE {
            return Err(AnnotatorError::ImageTooLarge {
                width: w,
                height: h,
                reason: format!(
                    "at resolution {resolution} the detect image would be {dw}x{dh}, \
                     over {MAX_DETECT_SIDE} px on a side"
                ),
            });
        }
    }
    Ok(Checked {
        pre,
        values,
        resolution,
    })
}

/// Runs weight-free preprocessor `name` on `image` and returns the hint image (RGB, at the
/// detect size; see the crate docs). `resolution` is the detect resolution (`processor_res`),
/// ignored by preprocessors without one; `seed` is used only by `shuffle`. A preprocessor that
/// needs a network is [`AnnotatorError::NeedsWeights`] here: the engine runs those.
pub fn run(
    name: &str,
    image: &RgbImage,
    resolution: u32,
    params: &Params,
    seed: u64,
) -> Result<RgbImage, AnnotatorError> {
    let checked = check(name, image, Some(resolution), params)?;
    let run = checked
        .pre
        .free_run
        .ok_or_else(|| AnnotatorError::NeedsWeights(checked.pre.name.to_string()))?;
    Ok(run(&checked.input(image), &checked.values, seed))
}
