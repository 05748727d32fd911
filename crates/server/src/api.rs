//! The native API's types, and a request checked and turned into an engine [`Job`]. Every
//! refusal names the field. Decoding images and running preprocessors is CPU work: callers run
//! [`prepare`] on a blocking thread.
use diffusion::control::ControlMode;
use diffusion::images::ResizeMode;
use diffusion::pipeline::{InitImage, Request};
use diffusion::schedulers::SchedulerKind;
use engine::{EngineError, Job, NamedControl, Priority};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::str::FromStr;
use utoipa::ToSchema;

use crate::config::{Limits, MIN_SIDE};
use crate::error::ApiError;
use crate::images::{self, OutputFormat};

/// For fields whose default depends on the limits: absent is `None`, `null` stays an error
/// (as for a plain number).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}
fn d_guidance() -> f64 {
    7.5
}
fn d1() -> usize {
    1
}
fn d1f() -> f64 {
    1.0
}
fn d_strength() -> f64 {
    GenerateRequest::DEFAULT_STRENGTH
}

impl GenerateRequest {
    pub const DEFAULT_STRENGTH: f64 = 0.75;
}
fn d_scheduler() -> String {
    "unipc".into()
}

/// How an image is fitted to the generation size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResizeModeApi {
    JustResize,
    #[default]
    CropAndResize,
    ResizeAndFill,
}

impl From<ResizeModeApi> for ResizeMode {
    fn from(m: ResizeModeApi) -> Self {
        match m {
            ResizeModeApi::JustResize => ResizeMode::JustResize,
            ResizeModeApi::CropAndResize => ResizeMode::CropAndResize,
            ResizeModeApi::ResizeAndFill => ResizeMode::ResizeAndFill,
        }
    }
}

/// A1111's control modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ControlModeApi {
    #[default]
    Balanced,
    PromptMoreImportant,
    ControlnetMoreImportant,
}

impl From<ControlModeApi> for ControlMode {
    fn from(m: ControlModeApi) -> Self {
        match m {
            ControlModeApi::Balanced => ControlMode::Balanced,
            ControlModeApi::PromptMoreImportant => ControlMode::PromptMoreImportant,
            ControlModeApi::ControlnetMoreImportant => ControlMode::ControlNetMoreImportant,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PriorityApi {
    High,
    #[default]
    Normal,
}

/// One ControlNet of a request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    /// Adapter name (see `GET /v1/adapters`).
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,128}$")]
    pub adapter: String,
    /// The control image, base64 (PNG/JPEG/WebP, or a `data:` URL). Used as the hint as is,
    /// unless `preprocessor` is given. Give `image` or `pose`.
    #[serde(default)]
    #[schema(min_length = 1)]
    pub image: Option<String>,
    /// Instead of `image`: a pose as OpenPose JSON (`people[].pose_keypoints_2d`,
    /// `hand_left_keypoints_2d`, `hand_right_keypoints_2d`, `face_keypoints_2d`,
    /// `canvas_width`, `canvas_height`: what `/v1/detect` returns for the OpenPose
    /// preprocessors, or a pose editor writes), drawn with the standard skeleton at its canvas
    /// size as the hint. `preprocessor` then chooses the parts drawn: `openpose` the body,
    /// `openpose_hand` body and hands, `openpose_face` body and face, `openpose_faceonly` the
    /// face; `openpose_full`, `none` or none given: all.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub pose: Option<serde_json::Value>,
    /// A preprocessor to turn `image` into the hint first (see `GET /v1/preprocessors`).
    #[serde(default)]
    pub preprocessor: Option<String>,
    /// The preprocessor's named parameters (defaults for those left out).
    #[serde(default)]
    pub params: BTreeMap<String, f64>,
    /// The preprocessor's detect resolution (default: its own, usually 512).
    #[serde(default)]
    pub processor_res: Option<u32>,
    /// Conditioning scale, 0 to 2.
    #[serde(default = "d1f")]
    #[schema(minimum = 0, maximum = 2)]
    pub scale: f64,
    /// Fraction of the steps where this control starts, 0 to 1.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub start: f64,
    /// Fraction of the steps where it ends, `start` to 1.
    #[serde(default = "d1f")]
    #[schema(minimum = 0, maximum = 1)]
    pub end: f64,
    /// How the hint is fitted (default: the request's `resize_mode`).
    #[serde(default)]
    pub resize_mode: Option<ResizeModeApi>,
    #[serde(default)]
    pub control_mode: ControlModeApi,
}

/// How a request's prompts are read (see `GenerateRequest::prompt_syntax`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PromptSyntaxApi {
    #[default]
    Plain,
    A1111,
}

impl From<PromptSyntaxApi> for diffusion::prompt_syntax::PromptSyntax {
    fn from(s: PromptSyntaxApi) -> Self {
        match s {
            PromptSyntaxApi::Plain => Self::Plain,
            PromptSyntaxApi::A1111 => Self::A1111,
        }
    }
}

/// `POST /v1/generate`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// At most `limits.max_prompt_chars` characters.
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    /// A multiple of 8; width × height at most `limits.max_pixels`. Default 512, or the
    /// largest square the limits allow.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = usize, minimum = 64, multiple_of = 8)]
    pub width: Option<usize>,
    /// A multiple of 8 (see `width`).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = usize, minimum = 64, multiple_of = 8)]
    pub height: Option<usize>,
    /// Default 20, or `limits.max_steps` if lower.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = usize, minimum = 1)]
    pub steps: Option<usize>,
    /// Classifier-free guidance; 1 or less turns it off.
    #[serde(default = "d_guidance")]
    #[schema(minimum = 0, maximum = 50)]
    pub guidance_scale: f64,
    /// ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras or unipc.
    #[serde(default = "d_scheduler")]
    pub scheduler: String,
    /// Image k uses seed + k. Absent or -1: random.
    #[serde(default)]
    #[schema(minimum = -1)]
    pub seed: Option<i64>,
    #[serde(default = "d1")]
    #[schema(minimum = 1)]
    pub num_images: usize,
    /// Base model name (default: the first; see `GET /v1/models`).
    #[serde(default)]
    pub model: Option<String>,
    /// CLIP layers to skip from the end (diffusers' clip_skip).
    #[serde(default)]
    #[schema(maximum = 10)]
    pub clip_skip: usize,
    /// How `prompt` and `negative_prompt` are read: `plain`, as written (diffusers'
    /// behaviour), or `a1111`, AUTOMATIC1111's syntax: `(word)` ×1.1, `[word]` ÷1.1,
    /// `(word:1.5)`, escapes `\(`, `BREAK` starting a new 75-token chunk, `<lora:…>` and
    /// `<hypernet:…>` tags removed (not applied). The A1111 routes always use `a1111`.
    #[serde(default)]
    pub prompt_syntax: PromptSyntaxApi,
    /// DDIM's eta (0 to 1).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub eta: f64,
    /// img2img: the starting image, base64 (PNG, JPEG or WebP, or a `data:` URL).
    #[serde(default)]
    #[schema(min_length = 1)]
    pub init_image: Option<String>,
    /// Inpainting: white = repaint, base64; needs `init_image`.
    #[serde(default)]
    #[schema(min_length = 1)]
    pub mask: Option<String>,
    /// img2img: how much of the image to repaint, (0, 1] (checked with or without
    /// `init_image`).
    #[serde(default = "d_strength")]
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub strength: f64,
    #[serde(default)]
    pub resize_mode: ResizeModeApi,
    #[serde(default)]
    pub controls: Vec<ControlRequest>,
    #[serde(default)]
    pub output_format: OutputFormat,
    #[serde(default)]
    pub priority: PriorityApi,
    /// Also return each control's hint (after its preprocessor).
    #[serde(default)]
    pub return_hints: bool,
}

/// Time spent, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// Decoding and preprocessing the inputs.
    pub prepare_ms: u64,
    /// Waiting in the queue.
    pub queue_ms: u64,
    /// Denoising and decoding.
    pub inference_ms: u64,
    pub total_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    /// Base64 images in `format`.
    pub images: Vec<String>,
    pub seeds: Vec<u64>,
    pub format: OutputFormat,
    pub timings: Timings,
    /// The controls' hints (PNG, base64), when `return_hints` was set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hints: Vec<String>,
}

/// A request checked and ready for the engine.
pub struct Prepared {
    pub job: Job,
    pub hints: Vec<RgbImage>,
    pub format: OutputFormat,
}

/// What a request may name: known base models and adapters.
/// What request checks need from the engine: names it knows, and the annotators (which run on
/// the engine: the networks need its device).
pub trait Catalog {
    fn has_model(&self, name: &str) -> bool;
    fn has_adapter(&self, name: &str) -> bool;
    /// The text-encoder layers of `model` (`None`: the default model), if known.
    fn clip_layers(&self, model: Option<&str>) -> Option<usize>;
    /// Runs a preprocessor (blocks: call from a blocking thread): the hint, and the keypoints
    /// of those that find some.
    fn annotate(
        &self,
        name: &str,
        image: &RgbImage,
        resolution: Option<u32>,
        params: &annotators::Params,
        seed: u64,
    ) -> Result<engine::Detection, EngineError>;
}

/// The most text-encoder layers `clip_skip` may skip, whatever the model.
pub const MAX_CLIP_SKIP: usize = 10;

fn check_range(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), ApiError> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(())
}

/// Checks the size fields: multiples of 8 from 64 to `limits.max_side()`, within
/// `limits.max_pixels`.
pub fn check_size(width: usize, height: usize, limits: &Limits) -> Result<(), ApiError> {
    let max = limits.max_side();
    for (field, v) in [("width", width), ("height", height)] {
        if v < MIN_SIDE || v % 8 != 0 || v > max {
            return Err(ApiError::invalid(
                field,
                format!("{field} must be a multiple of 8 from {MIN_SIDE} to {max}, got {v}"),
            ));
        }
    }
    if width * height > limits.max_pixels {
        return Err(ApiError::invalid(
            "width",
            format!(
                "{width}×{height} is over the limit of {} pixels",
                limits.max_pixels
            ),
        ));
    }
    Ok(())
}

/// Runs a preprocessor, errors naming the parameter under `field` (the control, such as
/// `controls[0]`; empty when the preprocessor's fields are the request's own).
pub fn run_preprocessor(
    catalog: &dyn Catalog,
    field: &str,
    name: &str,
    image: &RgbImage,
    resolution: Option<u32>,
    params: &BTreeMap<String, f64>,
    seed: u64,
) -> Result<engine::Detection, ApiError> {
    let at = |name: &str| {
        if field.is_empty() {
            name.to_string()
        } else {
            format!("{field}.{name}")
        }
    };
    let pre = annotators::find(name).ok_or_else(|| {
        ApiError::invalid(
            at("preprocessor"),
            format!("unknown preprocessor `{name}` (see GET /v1/preprocessors)"),
        )
    })?;
    use annotators::AnnotatorError as A;
    catalog
        .annotate(pre.name, image, resolution, params, seed)
        .map_err(|e| match e {
            EngineError::Annotator(e) => match &e {
                A::BadParam { name: p, .. } if p == "processor_res" => {
                    ApiError::invalid(at("processor_res"), e.to_string())
                }
                A::BadParam { name: p, .. } => {
                    ApiError::invalid(at(&format!("params.{p}")), e.to_string())
                }
                A::UnknownPreprocessor(_) | A::NotImplemented(_) | A::Unsupported { .. } => {
                    ApiError::invalid(at("preprocessor"), e.to_string())
                }
                A::NeedsWeights(_) | A::MissingWeights { .. } => ApiError::invalid(
                    at("preprocessor"),
                    format!("{e}; send an already preprocessed hint instead"),
                ),
                A::EmptyImage { .. } | A::ImageTooLarge { .. } => {
                    ApiError::invalid(at("image"), e.to_string())
                }
            },
            other => ApiError::from(other),
        })
}

/// Checks `req` against `limits` and what `catalog` knows, decodes its images, runs its
/// preprocessors, and builds the engine job.
pub fn prepare(
    req: GenerateRequest,
    limits: &Limits,
    catalog: &dyn Catalog,
) -> Result<Prepared, ApiError> {
    for (field, text) in [
        ("prompt", &req.prompt),
        ("negative_prompt", &req.negative_prompt),
    ] {
        let n = text.chars().count();
        if n > limits.max_prompt_chars {
            return Err(ApiError::invalid(
                field,
                format!(
                    "{n} characters, over the limit of {}",
                    limits.max_prompt_chars
                ),
            ));
        }
    }
    let width = req.width.unwrap_or_else(|| limits.default_side());
    let height = req.height.unwrap_or_else(|| limits.default_side());
    let steps = req.steps.unwrap_or_else(|| limits.default_steps());
    check_size(width, height, limits)?;
    if steps == 0 || steps > limits.max_steps {
        return Err(ApiError::invalid(
            "steps",
            format!("steps must be from 1 to {}, got {steps}", limits.max_steps),
        ));
    }
    check_range("guidance_scale", req.guidance_scale, 0.0, 50.0)?;
    if req.num_images == 0 || req.num_images > limits.max_images {
        return Err(ApiError::invalid(
            "num_images",
            format!(
                "num_images must be from 1 to {}, got {}",
                limits.max_images, req.num_images
            ),
        ));
    }
    let scheduler = SchedulerKind::from_str(&req.scheduler).map_err(|_| {
        ApiError::invalid(
            "scheduler",
            format!(
                "unknown scheduler `{}`; one of {}",
                req.scheduler,
                SchedulerKind::ALL.map(|k| k.name()).join(", ")
            ),
        )
    })?;
    let max_clip_skip = catalog
        .clip_layers(req.model.as_deref())
        .map_or(MAX_CLIP_SKIP, |n| n.min(MAX_CLIP_SKIP));
    if req.clip_skip > max_clip_skip {
        return Err(ApiError::invalid(
            "clip_skip",
            format!("clip_skip must be from 0 to {max_clip_skip} for this model"),
        ));
    }
    check_range("eta", req.eta, 0.0, 1.0)?;
    if let Some(model) = &req.model {
        if !catalog.has_model(model) {
            return Err(ApiError::invalid(
                "model",
                format!("unknown model `{model}` (see GET /v1/models)"),
            ));
        }
    }
    if req.controls.len() > limits.max_controls {
        return Err(ApiError::invalid(
            "controls",
            format!(
                "{} controls, over the limit of {}",
                req.controls.len(),
                limits.max_controls
            ),
        ));
    }
    let seed = match req.seed {
        None | Some(-1) => rand::random::<u32>() as u64,
        Some(s) if s >= 0 => s as u64,
        Some(s) => {
            return Err(ApiError::invalid(
                "seed",
                format!("seed must be ≥ 0 or -1 (random), got {s}"),
            ))
        }
    };

    check_range("strength", req.strength, 0.0, 1.0)?;
    if req.strength == 0.0 {
        return Err(ApiError::invalid("strength", "strength must be above 0"));
    }
    let init = match &req.init_image {
        None => {
            if req.mask.is_some() {
                return Err(ApiError::invalid("mask", "a mask needs an init_image"));
            }
            None
        }
        Some(data) => {
            let image = images::decode_base64("init_image", data, limits.max_input_pixels)?;
            let mask = match &req.mask {
                None => None,
                Some(m) => Some(
                    image::DynamicImage::ImageRgb8(images::decode_base64(
                        "mask",
                        m,
                        limits.max_input_pixels,
                    )?)
                    .to_luma8(),
                ),
            };
            let start = diffusion::schedulers::img2img_start_step(steps, req.strength);
            if start >= steps {
                return Err(ApiError::invalid(
                    "strength",
                    format!(
                        "strength {} leaves no step to run out of {steps}: at least 1/{steps}",
                        req.strength
                    ),
                ));
            }
            Some(InitImage {
                image,
                strength: req.strength,
                mask,
                resize: req.resize_mode.into(),
            })
        }
    };

    let mut controls = Vec::with_capacity(req.controls.len());
    let mut hints = Vec::with_capacity(req.controls.len());
    for (i, c) in req.controls.iter().enumerate() {
        let field = format!("controls[{i}]");
        if !engine::adapters::valid_name(&c.adapter) || !catalog.has_adapter(&c.adapter) {
            return Err(ApiError::invalid(
                format!("{field}.adapter"),
                format!("unknown adapter `{}` (see GET /v1/adapters)", c.adapter),
            ));
        }
        check_range(&format!("{field}.scale"), c.scale, 0.0, 2.0)?;
        check_range(&format!("{field}.start"), c.start, 0.0, 1.0)?;
        check_range(&format!("{field}.end"), c.end, c.start, 1.0)?;
        let image = match (&c.image, &c.pose) {
            (Some(data), None) => {
                images::decode_base64(&format!("{field}.image"), data, limits.max_input_pixels)?
            }
            (None, Some(pose)) => {
                if !c.params.is_empty() || c.processor_res.is_some() {
                    return Err(ApiError::invalid(
                        format!("{field}.pose"),
                        "a pose is drawn, not preprocessed: it takes no params or processor_res",
                    ));
                }
                let hint =
                    engine::draw_pose(pose, c.preprocessor.as_deref(), limits.max_input_pixels)
                        .map_err(|e| {
                            let at = match &e {
                                engine::PoseError::Module(_) => format!("{field}.preprocessor"),
                                engine::PoseError::Json { path, .. } if path.is_empty() => {
                                    format!("{field}.pose")
                                }
                                engine::PoseError::Json { path, .. } => {
                                    format!("{field}.pose.{path}")
                                }
                            };
                            ApiError::invalid(at, e.to_string())
                        })?;
                controls.push(NamedControl {
                    adapter: c.adapter.clone(),
                    image: hint.clone(),
                    resize: c.resize_mode.unwrap_or(req.resize_mode).into(),
                    scale: c.scale,
                    start: c.start,
                    end: c.end,
                    mode: c.control_mode.into(),
                    mask_hint: false,
                });
                hints.push(hint);
                continue;
            }
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    format!("{field}.pose"),
                    "give `image` or `pose`, not both",
                ))
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    format!("{field}.image"),
                    "missing: give `image` (or `pose`)",
                ))
            }
        };
        let hint = match c.preprocessor.as_deref() {
            None | Some("none") => {
                if !c.params.is_empty() {
                    return Err(ApiError::invalid(
                        format!("{field}.params"),
                        "params need a preprocessor",
                    ));
                }
                image
            }
            Some(name) => {
                run_preprocessor(
                    catalog,
                    &field,
                    name,
                    &image,
                    c.processor_res,
                    &c.params,
                    seed,
                )?
                .hint
            }
        };
        let mode: ControlMode = c.control_mode.into();
        controls.push(NamedControl {
            adapter: c.adapter.clone(),
            image: hint.clone(),
            resize: c.resize_mode.unwrap_or(req.resize_mode).into(),
            scale: c.scale,
            start: c.start,
            end: c.end,
            mode,
            // The 1.1 inpaint adapter reads masked hint pixels as -1.
            mask_hint: req.mask.is_some() && c.adapter.contains("inpaint"),
        });
        hints.push(hint);
    }

    let mut request = Request::txt2img(&req.prompt, width, height);
    request.negative_prompt = req.negative_prompt;
    request.steps = steps;
    request.guidance_scale = req.guidance_scale;
    request.scheduler = scheduler;
    request.eta = req.eta;
    request.seed = seed;
    request.num_images = req.num_images;
    request.clip_skip = req.clip_skip;
    request.prompt_syntax = req.prompt_syntax.into();
    request.init = init;
    let mut job = Job::new(request);
    job.model = req.model;
    job.controls = controls;
    job.priority = match req.priority {
        PriorityApi::High => Priority::High,
        PriorityApi::Normal => Priority::Normal,
    };
    Ok(Prepared {
        job,
        hints: if req.return_hints { hints } else { Vec::new() },
        format: req.output_format,
    })
}

/// `POST /v1/detect`: run a preprocessor alone.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetectRequest {
    /// See `GET /v1/preprocessors`.
    pub preprocessor: String,
    /// Base64 image.
    #[schema(min_length = 1)]
    pub image: String,
    #[serde(default)]
    pub params: BTreeMap<String, f64>,
    #[serde(default)]
    pub processor_res: Option<u32>,
    /// For preprocessors that draw random numbers (shuffle).
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DetectResponse {
    /// PNG, base64.
    pub image: String,
    pub width: u32,
    pub height: u32,
    /// For the OpenPose preprocessors: the people found, in the OpenPose JSON layout A1111's
    /// pose editors read (`people[].pose_keypoints_2d`, `hand_left_keypoints_2d`,
    /// `hand_right_keypoints_2d`, `face_keypoints_2d` as flat `x, y, confidence` lists in
    /// pixels of the hint; `canvas_width`, `canvas_height`). Pass it back as a control's `pose`
    /// to draw it as the hint.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub pose: Option<serde_json::Value>,
}

/// A preprocessor parameter, as `GET /v1/preprocessors` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ParamInfo {
    pub name: String,
    pub label: String,
    pub min: f64,
    pub max: f64,
    pub default: f64,
    pub step: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PreprocessorInfo {
    pub name: String,
    /// Runs here now: weight-free, or its network's weight file is in the annotator folder.
    pub available: bool,
    /// The annotator weight files it needs (empty for weight-free ones).
    pub weights: Vec<String>,
    /// The files it needs that are not in the annotator folder (`[annotators] root`).
    pub missing_weights: Vec<String>,
    /// Listed but not run by this server (send a preprocessed hint instead): not implemented
    /// in this build, or deliberately not supported (then `unsupported` says why).
    pub not_implemented: bool,
    /// Why this server does not run it, and what to use instead (for the ones it never will).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsupported: Option<String>,
    pub default_resolution: u32,
    pub params: Vec<ParamInfo>,
}

/// Every preprocessor with its parameters and whether it can run with `pool`'s weights.
pub fn preprocessor_list(pool: &engine::AnnotatorPool) -> Vec<PreprocessorInfo> {
    annotators::list()
        .iter()
        .map(|p| (p, pool.availability(p)))
        .map(|(p, availability)| PreprocessorInfo {
            name: p.name.into(),
            available: availability == engine::Availability::Ready,
            weights: p.weights.iter().map(|w| w.to_string()).collect(),
            missing_weights: availability.missing_weights(),
            not_implemented: matches!(
                availability,
                engine::Availability::NotImplemented | engine::Availability::Unsupported(_)
            ),
            unsupported: match availability {
                engine::Availability::Unsupported(why) => Some(why.to_string()),
                _ => None,
            },
            default_resolution: p.default_resolution(),
            params: p
                .params
                .iter()
                .map(|s| ParamInfo {
                    name: s.name.into(),
                    label: s.label.into(),
                    min: s.min,
                    max: s.max,
                    default: s.default,
                    step: s.step,
                })
                .collect(),
        })
        .collect()
}

/// `GET /v1/limits`: what a request may ask of this server (`[limits]`), and the defaults it
/// fills in, so a client (the page at `/`) can size its forms.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LimitsInfo {
    /// Most pixels (width × height) of a generated image.
    pub max_pixels: usize,
    /// Smallest width or height.
    pub min_side: usize,
    /// Largest width or height (with the other side at `min_side`); sides are multiples of 8.
    pub max_side: usize,
    /// Width and height when a request gives none.
    pub default_side: usize,
    pub max_steps: usize,
    pub default_steps: usize,
    /// Most images per request.
    pub max_images: usize,
    /// Most ControlNet units per request.
    pub max_controls: usize,
    pub max_prompt_chars: usize,
    /// The scheduler names `scheduler` takes.
    pub schedulers: Vec<String>,
    pub default_scheduler: String,
    /// Generation routes need `Authorization: Bearer <key>` (this route does not).
    pub api_key_required: bool,
}

impl LimitsInfo {
    pub fn new(limits: &crate::config::Limits, auth: &crate::config::AuthConfig) -> Self {
        Self {
            max_pixels: limits.max_pixels,
            min_side: crate::config::MIN_SIDE,
            max_side: limits.max_side(),
            default_side: limits.default_side(),
            max_steps: limits.max_steps,
            default_steps: limits.default_steps(),
            max_images: limits.max_images,
            max_controls: limits.max_controls,
            max_prompt_chars: limits.max_prompt_chars,
            schedulers: SchedulerKind::ALL
                .iter()
                .map(|k| k.name().to_string())
                .collect(),
            default_scheduler: d_scheduler(),
            api_key_required: !auth.api_keys.is_empty(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelInfoApi {
    pub name: String,
    pub default: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AdapterInfoApi {
    pub name: String,
    /// A path inside an adapter root, or `embedded:N`.
    pub source: String,
    /// Loaded on the device now (else loaded on next use).
    pub resident: bool,
    pub bytes: Option<usize>,
    /// Jobs using it now.
    pub in_use: usize,
    pub generation: u64,
}

impl From<engine::AdapterInfo> for AdapterInfoApi {
    fn from(a: engine::AdapterInfo) -> Self {
        Self {
            name: a.name,
            source: a.source,
            resident: a.resident,
            bytes: a.bytes,
            in_use: a.in_use,
            generation: a.generation,
        }
    }
}

/// `PUT /v1/adapters/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutAdapterRequest {
    /// A ControlNet file or diffusers folder, relative to an adapter root (or absolute inside
    /// one), or `embedded:N`.
    #[schema(min_length = 1)]
    pub path: String,
}
