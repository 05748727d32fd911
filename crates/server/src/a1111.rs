//! AUTOMATIC1111-compatible routes (`/sdapi/v1/...` and the ControlNet extension's
//! `/controlnet/...`), so existing A1111 clients work unchanged.
//!
//! Requests are turned into the native [`GenerateRequest`] and go through the same checks
//! ([`api::prepare`]) and job runner ([`run_job`]); errors are the native `{error, type,
//! field}` JSON with `field` named in A1111 terms (`cfg_scale`,
//! `alwayson_scripts.controlnet.args[0].threshold_a`, ...). Unknown fields are accepted and
//! ignored: A1111 clients send many.
//!
//! Rules worth knowing:
//! - Samplers: `Euler`, `Euler a`, `DDIM`, `DPM++ 2M`, `DPM++ 2M Karras`, `UniPC` (and their
//!   `k_...` aliases); the separate `scheduler` may be `Automatic` (or absent, or `Uniform`
//!   for non-Karras samplers) or `Karras` (only with `DPM++ 2M`). Absent sampler: `Euler a`.
//! - `batch_size × n_iter` images run as one job; image k has seed `seed + k`.
//! - `clip_skip` (top level, or `override_settings.CLIP_stop_at_last_layers`) is A1111's: 1 =
//!   none, n = skip n − 1 layers.
//! - `override_settings.sd_model_checkpoint` picks the base model (a trailing ` [hash]` is
//!   ignored).
//! - ControlNet units are read from `alwayson_scripts.<controlnet>` (any case) `args`. A unit
//!   with `enabled: false`, or no model (`""`/`"None"`), is skipped. `model` names an adapter:
//!   a trailing ` [hash]` is stripped, then an adapter of exactly that name is used; failing
//!   that, the one adapter (case-insensitively) contained in the model name or containing it,
//!   if exactly one is; otherwise 422 naming `model`.
//! - `module` `none` uses the image as the hint; any other module is run as a preprocessor,
//!   `threshold_a`/`threshold_b` mapping onto its first/second parameter (−1 = default), and
//!   `processor_res` (−1 = default). `pixel_perfect: true` sets `processor_res` to the shorter
//!   side of the generation size. A unit without an image uses the first init image (img2img).
//!   The unit's own `mask` is ignored.
//! - The detected maps of units whose module is not `none` are appended to `images` after the
//!   generated images (as the extension does), unless the unit sets `save_detected_map: false`.
//! - img2img uses the first of `init_images`; `mask` is white = repaint (`inpainting_mask_invert:
//!   1` flips it); `resize_mode` 0/1/2 (just resize / crop and resize / resize and fill).
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use utoipa::{OpenApi, ToSchema};

use crate::api::{self, ControlModeApi, ControlRequest, GenerateRequest, ResizeModeApi};
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::images::{self, OutputFormat};
use crate::run::run_job;
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/options", get(options))
        .route("/sdapi/v1/progress", get(progress))
        .route("/controlnet/version", get(version))
        .route("/controlnet/model_list", get(model_list))
        .route("/controlnet/module_list", get(module_list))
        .route("/controlnet/detect", post(detect))
}

// ---------------------------------------------------------------------------------------------
// Request types

/// An integer or a name (A1111 accepts both for modes).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum IndexOrName {
    Index(i64),
    Name(String),
}

/// A unit's image: base64, or `{image, mask}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum UnitImage {
    Base64(String),
    WithMask {
        image: String,
        #[serde(default)]
        mask: Option<String>,
    },
}

impl UnitImage {
    fn data(&self) -> &str {
        match self {
            UnitImage::Base64(s) => s,
            UnitImage::WithMask { image, .. } => image,
        }
    }
}

/// One ControlNet extension unit (`alwayson_scripts.controlnet.args[i]`). Fields not listed are
/// accepted and ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ControlNetUnit {
    pub enabled: bool,
    /// `none`, or a preprocessor (see `GET /controlnet/module_list`).
    pub module: String,
    /// An adapter (see `GET /controlnet/model_list`); `None` or empty skips the unit.
    pub model: Option<String>,
    pub weight: f64,
    pub image: Option<UnitImage>,
    /// Legacy name of `image`.
    pub input_image: Option<UnitImage>,
    /// "Just Resize", "Crop and Resize", "Resize and Fill" or 0, 1, 2.
    pub resize_mode: Option<IndexOrName>,
    /// −1: the module's default.
    pub processor_res: f64,
    /// The module's first parameter; −1: its default.
    pub threshold_a: f64,
    /// The module's second parameter; −1: its default.
    pub threshold_b: f64,
    pub guidance_start: f64,
    pub guidance_end: f64,
    /// "Balanced", "My prompt is more important", "ControlNet is more important" or 0, 1, 2.
    pub control_mode: Option<IndexOrName>,
    /// processor_res = the shorter side of the generation size.
    pub pixel_perfect: bool,
    /// Append this unit's detected map to the images (when its module is not `none`).
    pub save_detected_map: bool,
}

impl Default for ControlNetUnit {
    fn default() -> Self {
        Self {
            enabled: true,
            module: "none".into(),
            model: None,
            weight: 1.0,
            image: None,
            input_image: None,
            resize_mode: None,
            processor_res: -1.0,
            threshold_a: -1.0,
            threshold_b: -1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            control_mode: None,
            pixel_perfect: false,
            save_detected_map: true,
        }
    }
}

/// `POST /sdapi/v1/txt2img` and `/sdapi/v1/img2img` (the `init_images`, `denoising_strength`,
/// `mask`, `resize_mode` and `inpainting_mask_invert` fields are img2img's). Fields not listed
/// are accepted and ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct A1111Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub width: usize,
    pub height: usize,
    /// −1: random.
    pub seed: i64,
    /// Euler, Euler a, DDIM, DPM++ 2M, DPM++ 2M Karras or UniPC.
    pub sampler_name: Option<String>,
    /// Older name of `sampler_name`.
    pub sampler_index: Option<String>,
    /// Automatic or Karras.
    pub scheduler: Option<String>,
    pub batch_size: usize,
    pub n_iter: usize,
    /// A1111's clip skip: 1 = none.
    pub clip_skip: Option<usize>,
    /// DDIM's eta.
    pub eta: Option<f64>,
    /// False: no images in the answer.
    pub send_images: bool,
    /// `sd_model_checkpoint` (the base model) and `CLIP_stop_at_last_layers` are read.
    #[schema(value_type = Object)]
    pub override_settings: BTreeMap<String, Value>,
    /// `controlnet` (any case): `{args: [ControlNetUnit...]}`; other scripts are ignored.
    #[schema(value_type = Object)]
    pub alwayson_scripts: BTreeMap<String, Value>,
    /// img2img: base64 images; the first is used.
    pub init_images: Vec<String>,
    /// img2img: how much to repaint, (0, 1].
    pub denoising_strength: f64,
    /// img2img: inpainting mask, white = repaint.
    pub mask: Option<String>,
    /// img2img: 1 inverts the mask.
    pub inpainting_mask_invert: i64,
    /// img2img: 0 just resize, 1 crop and resize, 2 resize and fill.
    pub resize_mode: Option<IndexOrName>,
}

impl Default for A1111Request {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            cfg_scale: 7.0,
            width: 512,
            height: 512,
            seed: -1,
            sampler_name: None,
            sampler_index: None,
            scheduler: None,
            batch_size: 1,
            n_iter: 1,
            clip_skip: None,
            eta: None,
            send_images: true,
            override_settings: BTreeMap::new(),
            alwayson_scripts: BTreeMap::new(),
            init_images: Vec::new(),
            denoising_strength: 0.75,
            mask: None,
            inpainting_mask_invert: 0,
            resize_mode: None,
        }
    }
}

/// The answer of txt2img / img2img.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct A1111Response {
    /// Base64 PNGs: the generated images, then the detected maps.
    pub images: Vec<String>,
    /// The request as sent.
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// A JSON document as a string: seed, all_seeds, prompt, infotexts, ...
    pub info: String,
}

// ---------------------------------------------------------------------------------------------
// Conversions

/// Deserialises `value`, a 422 naming `prefix` + the path at fault.
fn from_value<T: DeserializeOwned>(value: &Value, prefix: &str) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = match (prefix.is_empty(), path == ".") {
            (true, true) => None,
            (true, false) => Some(path),
            (false, true) => Some(prefix.to_string()),
            (false, false) => Some(format!("{prefix}.{path}")),
        };
        let mut err = ApiError::invalid("", e.into_inner().to_string());
        err.body.field = field;
        err
    })
}

/// A1111 sampler (and scheduler) → our scheduler name.
pub fn map_sampler(
    sampler: Option<&str>,
    scheduler: Option<&str>,
) -> Result<&'static str, ApiError> {
    let sampler = sampler.map(str::trim).filter(|s| !s.is_empty());
    let base = match sampler.unwrap_or("Euler a") {
        "Euler" | "k_euler" => "euler",
        "Euler a" | "k_euler_a" | "k_euler_ancestral" => "euler-a",
        "DDIM" | "ddim" => "ddim",
        "DPM++ 2M" | "k_dpmpp_2m" => "dpmpp-2m",
        "DPM++ 2M Karras" | "k_dpmpp_2m_ka" => "dpmpp-2m-karras",
        "UniPC" | "unipc" => "unipc",
        other => {
            return Err(ApiError::invalid(
                "sampler_name",
                format!(
                    "unknown sampler `{other}`; one of {} (see GET /sdapi/v1/samplers)",
                    SAMPLERS.map(|s| s.0).join(", ")
                ),
            ))
        }
    };
    let scheduler = scheduler
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty());
    match scheduler.as_deref() {
        None | Some("automatic") => Ok(base),
        Some("karras") if base == "dpmpp-2m" || base == "dpmpp-2m-karras" => {
            Ok("dpmpp-2m-karras")
        }
        Some("uniform") if base != "dpmpp-2m-karras" => Ok(base),
        Some(other) => Err(ApiError::invalid(
            "scheduler",
            format!(
                "scheduler `{other}` is not available with this sampler: Automatic, or Karras with DPM++ 2M"
            ),
        )),
    }
}

/// A1111 samplers: name, aliases, our scheduler.
const SAMPLERS: [(&str, &[&str], &str); 6] = [
    ("Euler a", &["k_euler_a", "k_euler_ancestral"], "euler-a"),
    ("Euler", &["k_euler"], "euler"),
    ("DDIM", &[], "ddim"),
    ("DPM++ 2M", &["k_dpmpp_2m"], "dpmpp-2m"),
    ("DPM++ 2M Karras", &["k_dpmpp_2m_ka"], "dpmpp-2m-karras"),
    ("UniPC", &[], "unipc"),
];

/// Strips A1111's trailing ` [hash]` from a model title.
fn strip_hash(name: &str) -> &str {
    let name = name.trim();
    match name.rfind(" [") {
        Some(i) if name.ends_with(']') => name[..i].trim_end(),
        _ => name,
    }
}

/// The adapter an A1111 model name means (see the module docs for the rule).
pub fn resolve_adapter(model: &str, adapters: &[String]) -> Result<String, String> {
    let wanted = strip_hash(model);
    if let Some(a) = adapters.iter().find(|a| a.as_str() == wanted) {
        return Ok(a.clone());
    }
    let lower = wanted.to_lowercase();
    let matches: Vec<&String> = adapters
        .iter()
        .filter(|a| {
            let a = a.to_lowercase();
            !a.is_empty() && (lower.contains(&a) || a.contains(&lower))
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(format!(
            "unknown ControlNet model `{model}` (see GET /controlnet/model_list)"
        )),
        many => Err(format!(
            "ControlNet model `{model}` is ambiguous: it matches {}",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn resize_mode(field: &str, v: &Option<IndexOrName>) -> Result<Option<ResizeModeApi>, ApiError> {
    Ok(Some(match v {
        None => return Ok(None),
        Some(IndexOrName::Index(0)) => ResizeModeApi::JustResize,
        Some(IndexOrName::Index(1)) => ResizeModeApi::CropAndResize,
        Some(IndexOrName::Index(2)) => ResizeModeApi::ResizeAndFill,
        Some(IndexOrName::Name(n)) => match n.as_str() {
            "Just Resize" => ResizeModeApi::JustResize,
            "Crop and Resize" | "Scale to Fit (Inner Fit)" => ResizeModeApi::CropAndResize,
            "Resize and Fill" | "Envelope (Outer Fit)" => ResizeModeApi::ResizeAndFill,
            _ => return Err(bad_mode(field, v)),
        },
        Some(_) => return Err(bad_mode(field, v)),
    }))
}

fn bad_mode(field: &str, v: &Option<IndexOrName>) -> ApiError {
    ApiError::invalid(
        field,
        format!("unknown {field} {v:?}: \"Just Resize\", \"Crop and Resize\", \"Resize and Fill\" or 0, 1, 2"),
    )
}

fn control_mode(field: &str, v: &Option<IndexOrName>) -> Result<ControlModeApi, ApiError> {
    Ok(match v {
        None => ControlModeApi::Balanced,
        Some(IndexOrName::Index(0)) => ControlModeApi::Balanced,
        Some(IndexOrName::Index(1)) => ControlModeApi::PromptMoreImportant,
        Some(IndexOrName::Index(2)) => ControlModeApi::ControlnetMoreImportant,
        Some(IndexOrName::Name(n)) if n == "Balanced" => ControlModeApi::Balanced,
        Some(IndexOrName::Name(n)) if n == "My prompt is more important" => {
            ControlModeApi::PromptMoreImportant
        }
        Some(IndexOrName::Name(n)) if n == "ControlNet is more important" => {
            ControlModeApi::ControlnetMoreImportant
        }
        Some(other) => {
            return Err(ApiError::invalid(
                field,
                format!("unknown control_mode {other:?}: \"Balanced\", \"My prompt is more important\", \"ControlNet is more important\" or 0, 1, 2"),
            ))
        }
    })
}

/// Where each native control came from, to name fields and pick detected maps.
struct UnitSource {
    /// `alwayson_scripts.<key>.args[j]`
    field: String,
    module: Option<&'static annotators::Preprocessor>,
    save_map: bool,
    /// For the infotext.
    summary: String,
}

/// The A1111 request as a native one.
struct Converted {
    native: GenerateRequest,
    units: Vec<UnitSource>,
    sampler_label: String,
    clip_skip: usize,
}

fn convert(req: &A1111Request, img2img: bool, state: &AppState) -> Result<Converted, ApiError> {
    let sampler = req.sampler_name.as_deref().or(req.sampler_index.as_deref());
    let scheduler = map_sampler(sampler, req.scheduler.as_deref())?;
    if req.batch_size == 0 {
        return Err(ApiError::invalid("batch_size", "batch_size must be ≥ 1"));
    }
    if req.n_iter == 0 {
        return Err(ApiError::invalid("n_iter", "n_iter must be ≥ 1"));
    }
    let total = req.batch_size.saturating_mul(req.n_iter);
    let max = state.config.limits.max_images;
    if total > max {
        return Err(ApiError::invalid(
            "batch_size",
            format!("batch_size × n_iter = {total} images, over the limit of {max}"),
        ));
    }
    let clip_skip = match req.clip_skip {
        Some(n) => n,
        None => match req.override_settings.get("CLIP_stop_at_last_layers") {
            None | Some(Value::Null) => 1,
            Some(v) => v.as_u64().ok_or_else(|| {
                ApiError::invalid(
                    "override_settings.CLIP_stop_at_last_layers",
                    "a whole number ≥ 1",
                )
            })? as usize,
        },
    };
    let model = match req.override_settings.get("sd_model_checkpoint") {
        None | Some(Value::Null) => None,
        Some(Value::String(title)) => {
            let name = strip_hash(title);
            if !state.engine.models().iter().any(|m| m.name == name) {
                return Err(ApiError::invalid(
                    "override_settings.sd_model_checkpoint",
                    format!("unknown model `{title}` (see GET /sdapi/v1/sd-models)"),
                ));
            }
            Some(name.to_string())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "override_settings.sd_model_checkpoint",
                "a model title",
            ))
        }
    };

    let mut native = GenerateRequest {
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        width: req.width,
        height: req.height,
        steps: req.steps,
        guidance_scale: req.cfg_scale,
        scheduler: scheduler.to_string(),
        seed: Some(req.seed),
        num_images: total,
        model,
        clip_skip: clip_skip.saturating_sub(1),
        eta: req.eta.unwrap_or(0.0),
        init_image: None,
        mask: None,
        strength: req.denoising_strength,
        resize_mode: resize_mode("resize_mode", &req.resize_mode)?
            .unwrap_or(ResizeModeApi::JustResize),
        controls: Vec::new(),
        output_format: OutputFormat::Png,
        priority: api::PriorityApi::Normal,
        return_hints: true,
    };
    if img2img {
        let first = req
            .init_images
            .first()
            .ok_or_else(|| ApiError::invalid("init_images", "img2img needs an init image"))?;
        native.init_image = Some(first.clone());
        native.mask = req.mask.clone().filter(|m| !m.is_empty());
        if native.mask.is_some() && req.inpainting_mask_invert == 1 {
            native.mask = Some(invert_mask(
                native.mask.as_deref().unwrap_or_default(),
                state.config.limits.max_input_pixels,
            )?);
        }
    }

    let mut units = Vec::new();
    let adapters: Vec<String> = state
        .engine
        .adapters()
        .list()
        .into_iter()
        .map(|a| a.name)
        .collect();
    for (key, script) in &req.alwayson_scripts {
        if !key.eq_ignore_ascii_case("controlnet") {
            continue;
        }
        let args = match script.get("args") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("alwayson_scripts.{key}.args"),
                    "a list of ControlNet units",
                ))
            }
        };
        for (j, arg) in args.iter().enumerate() {
            let field = format!("alwayson_scripts.{key}.args[{j}]");
            if !arg.is_object() {
                // `[false]` and the like: nothing to run.
                continue;
            }
            let unit: ControlNetUnit = from_value(arg, &field)?;
            let model = unit.model.as_deref().unwrap_or("").trim();
            if !unit.enabled || model.is_empty() || model == "None" || model == "none" {
                continue;
            }
            let adapter = resolve_adapter(model, &adapters)
                .map_err(|m| ApiError::invalid(format!("{field}.model"), m))?;
            let image = match unit
                .image
                .as_ref()
                .or(unit.input_image.as_ref())
                .map(|i| i.data())
                .filter(|d| !d.trim().is_empty())
            {
                Some(d) => d.to_string(),
                None => match native.init_image.clone() {
                    Some(i) => i,
                    None => {
                        return Err(ApiError::invalid(
                            format!("{field}.image"),
                            "a ControlNet unit needs an image",
                        ))
                    }
                },
            };
            let pre = annotators::find(unit.module.trim()).ok_or_else(|| {
                ApiError::invalid(
                    format!("{field}.module"),
                    format!(
                        "unknown module `{}` (see GET /controlnet/module_list)",
                        unit.module
                    ),
                )
            })?;
            let is_none = pre.name == "none";
            let processor_res = if unit.pixel_perfect {
                Some(req.width.min(req.height) as u32)
            } else if unit.processor_res <= 0.0 {
                None
            } else if unit.processor_res.is_finite() && unit.processor_res <= u32::MAX as f64 {
                Some(unit.processor_res as u32)
            } else {
                return Err(ApiError::invalid(
                    format!("{field}.processor_res"),
                    "a resolution in pixels, or -1",
                ));
            };
            let control = ControlRequest {
                adapter: adapter.clone(),
                image,
                preprocessor: (!is_none).then(|| pre.name.to_string()),
                params: if is_none {
                    BTreeMap::new()
                } else {
                    pre.params_from_thresholds(unit.threshold_a, unit.threshold_b)
                },
                processor_res: if is_none { None } else { processor_res },
                scale: unit.weight,
                start: unit.guidance_start,
                end: unit.guidance_end,
                resize_mode: Some(
                    resize_mode(&format!("{field}.resize_mode"), &unit.resize_mode)?
                        .unwrap_or(ResizeModeApi::CropAndResize),
                ),
                control_mode: control_mode(&format!("{field}.control_mode"), &unit.control_mode)?,
            };
            units.push(UnitSource {
                summary: format!(
                    "Module: {}, Model: {}, Weight: {}, Guidance Start: {}, Guidance End: {}",
                    pre.name, adapter, unit.weight, unit.guidance_start, unit.guidance_end
                ),
                field,
                module: (!is_none).then_some(pre),
                save_map: unit.save_detected_map,
            });
            native.controls.push(control);
        }
    }
    let sampler_label = SAMPLERS
        .iter()
        .find(|s| s.2 == scheduler)
        .map(|s| s.0)
        .unwrap_or(scheduler)
        .to_string();
    Ok(Converted {
        native,
        units,
        sampler_label,
        clip_skip,
    })
}

fn invert_mask(data: &str, max_pixels: u64) -> Result<String, ApiError> {
    let mut mask = images::decode_base64("mask", data, max_pixels)?;
    image::imageops::invert(&mut mask);
    images::encode_base64(&mask, OutputFormat::Png)
}

/// Renames a native field in an error to the A1111 field it came from.
fn rename_field(mut e: ApiError, units: &[UnitSource]) -> ApiError {
    let Some(field) = e.body.field.clone() else {
        return e;
    };
    let renamed = if let Some(rest) = field.strip_prefix("controls[") {
        let (index, sub) = rest.split_once(']').unwrap_or((rest, ""));
        let sub = sub.trim_start_matches('.');
        match index.parse::<usize>().ok().and_then(|i| units.get(i)) {
            Some(u) => {
                let sub = match sub {
                    "adapter" => "model".to_string(),
                    "preprocessor" => "module".to_string(),
                    "scale" => "weight".to_string(),
                    "start" => "guidance_start".to_string(),
                    "end" => "guidance_end".to_string(),
                    s => match s.strip_prefix("params.") {
                        Some(p) => {
                            match u
                                .module
                                .and_then(|m| m.params.iter().position(|x| x.name == p))
                            {
                                Some(0) => "threshold_a".to_string(),
                                Some(1) => "threshold_b".to_string(),
                                _ => s.to_string(),
                            }
                        }
                        None => s.to_string(),
                    },
                };
                if sub.is_empty() {
                    u.field.clone()
                } else {
                    format!("{}.{sub}", u.field)
                }
            }
            None => field,
        }
    } else {
        match field.as_str() {
            "guidance_scale" => "cfg_scale".into(),
            "strength" => "denoising_strength".into(),
            "init_image" => "init_images[0]".into(),
            "num_images" => "batch_size".into(),
            "scheduler" => "sampler_name".into(),
            "model" => "override_settings.sd_model_checkpoint".into(),
            _ => field,
        }
    };
    e.body.field = Some(renamed);
    e
}

/// A1111's one-line summary of an image's settings. `img2img` requests always have an init
/// image (convert refuses them without one).
fn infotext(
    req: &A1111Request,
    sampler_label: &str,
    clip_skip: usize,
    units: &[UnitSource],
    img2img: bool,
    seed: u64,
    model: &str,
) -> String {
    let mut parts = vec![
        format!("Steps: {}", req.steps),
        format!("Sampler: {sampler_label}"),
        format!("CFG scale: {}", req.cfg_scale),
        format!("Seed: {seed}"),
        format!("Size: {}x{}", req.width, req.height),
        format!("Model: {model}"),
    ];
    if img2img {
        parts.push(format!("Denoising strength: {}", req.denoising_strength));
    }
    if clip_skip > 1 {
        parts.push(format!("Clip skip: {clip_skip}"));
    }
    for (i, u) in units.iter().enumerate() {
        parts.push(format!("ControlNet {i}: \"{}\"", u.summary));
    }
    let mut text = req.prompt.clone();
    if !req.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
    }
    text.push('\n');
    text.push_str(&parts.join(", "));
    text
}

async fn generate(
    state: AppState,
    body: Value,
    img2img: bool,
) -> Result<Json<A1111Response>, ApiError> {
    state.check_ready()?;
    if !body.is_object() {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "the body must be a JSON object",
        ));
    }
    let req: A1111Request = from_value(&body, "")?;
    let s = state.clone();
    let (converted, req) =
        tokio::task::spawn_blocking(move || convert(&req, img2img, &s).map(|c| (c, req)))
            .await
            .map_err(|e| ApiError::internal(format!("preparing the request: {e}")))??;
    let Converted {
        native,
        units,
        sampler_label,
        clip_skip,
    } = converted;
    let scheduler = native.scheduler.clone();
    let (mut prepared, prepare_ms) = crate::routes::prepare(&state, native)
        .await
        .map_err(|e| rename_field(e, &units))?;
    let model = prepared
        .job
        .model
        .clone()
        .or_else(|| state.engine.models().first().map(|m| m.name.clone()))
        .unwrap_or_default();
    let hints = std::mem::take(&mut prepared.hints);
    let finished = run_job(&state, prepared, prepare_ms, None).await?;
    let mut out = Vec::new();
    if req.send_images {
        for image in &finished.images {
            out.push(images::encode_base64(image, OutputFormat::Png)?);
        }
        for (hint, unit) in hints.iter().zip(&units) {
            if unit.module.is_some() && unit.save_map {
                out.push(images::encode_base64(hint, OutputFormat::Png)?);
            }
        }
    }
    let seeds = finished.seeds.clone();
    let first = seeds.first().copied().unwrap_or_default();
    let n = seeds.len();
    let info = json!({
        "prompt": req.prompt,
        "all_prompts": vec![req.prompt.clone(); n],
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": vec![req.negative_prompt.clone(); n],
        "seed": first,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": req.width,
        "height": req.height,
        "sampler_name": sampler_label,
        "scheduler": scheduler,
        "cfg_scale": req.cfg_scale,
        "steps": req.steps,
        "batch_size": req.batch_size,
        "n_iter": req.n_iter,
        "clip_skip": clip_skip,
        "denoising_strength": if img2img { json!(req.denoising_strength) } else { Value::Null },
        "sd_model_name": model,
        "sd_model_hash": Value::Null,
        "restore_faces": false,
        "styles": [],
        "is_using_inpainting_conditioning": false,
        "index_of_first_image": 0,
        "infotexts": seeds
            .iter()
            .map(|s| infotext(&req, &sampler_label, clip_skip, &units, img2img, *s, &model))
            .collect::<Vec<_>>(),
        "timings": finished.timings,
    });
    Ok(Json(A1111Response {
        images: out,
        parameters: body,
        info: info.to_string(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Routes

/// A1111 txt2img, with ControlNet units in `alwayson_scripts.controlnet.args`.
#[utoipa::path(
    post, path = "/sdapi/v1/txt2img", tag = "a1111",
    request_body = A1111Request,
    responses(
        (status = 200, description = "Images (PNG, base64; detected maps appended), the request, and info as a JSON string", body = A1111Response),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 422, description = "A field is invalid (named in `field`)", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
        (status = 503, description = "Not ready", body = ErrorBody),
        (status = 504, description = "Timed out", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn txt2img(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<A1111Response>, ApiError> {
    generate(state, body, false).await
}

/// A1111 img2img (inpainting with `mask`), with ControlNet units.
#[utoipa::path(
    post, path = "/sdapi/v1/img2img", tag = "a1111",
    request_body = A1111Request,
    responses(
        (status = 200, description = "Images (PNG, base64; detected maps appended), the request, and info as a JSON string", body = A1111Response),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 422, description = "A field is invalid (named in `field`)", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
        (status = 503, description = "Not ready", body = ErrorBody),
        (status = 504, description = "Timed out", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn img2img(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<A1111Response>, ApiError> {
    generate(state, body, true).await
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SdModel {
    pub title: String,
    pub model_name: String,
    pub hash: Option<String>,
    pub sha256: Option<String>,
    pub filename: String,
    pub config: Option<String>,
}

/// The base models, as A1111 lists checkpoints.
#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "a1111",
    responses((status = 200, description = "Base models; the first is the default", body = [SdModel])),
    security((), ("api_key" = [])))]
pub async fn sd_models(State(state): State<AppState>) -> Json<Vec<SdModel>> {
    Json(
        state
            .engine
            .models()
            .into_iter()
            .map(|m| SdModel {
                title: m.name.clone(),
                model_name: m.name.clone(),
                hash: None,
                sha256: None,
                filename: m.name,
                config: None,
            })
            .collect(),
    )
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sampler {
    pub name: String,
    pub aliases: Vec<String>,
    #[schema(value_type = Object)]
    pub options: BTreeMap<String, String>,
}

/// The samplers.
#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "a1111",
    responses((status = 200, description = "A1111 sampler names", body = [Sampler])),
    security((), ("api_key" = [])))]
pub async fn samplers() -> Json<Vec<Sampler>> {
    Json(
        SAMPLERS
            .iter()
            .map(|(name, aliases, ours)| Sampler {
                name: name.to_string(),
                aliases: aliases.iter().map(|a| a.to_string()).collect(),
                options: BTreeMap::from([("scheduler".to_string(), ours.to_string())]),
            })
            .collect(),
    )
}

/// A few of A1111's options (read only).
#[utoipa::path(get, path = "/sdapi/v1/options", tag = "a1111",
    responses((status = 200, description = "`sd_model_checkpoint` (the default model) and a few more", body = Object)),
    security((), ("api_key" = [])))]
pub async fn options(State(state): State<AppState>) -> Json<Value> {
    let model = state.engine.models().first().map(|m| m.name.clone());
    Json(json!({
        "sd_model_checkpoint": model,
        "sd_checkpoint_hash": Value::Null,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
    }))
}

/// A1111's progress, minimal: the queue length as `state.job_count`, never a current image.
#[utoipa::path(get, path = "/sdapi/v1/progress", tag = "a1111",
    responses((status = 200, description = "{progress, eta_relative, state, current_image}", body = Object)),
    security((), ("api_key" = [])))]
pub async fn progress(State(state): State<AppState>) -> Json<Value> {
    let s = state.engine.status();
    Json(json!({
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": {
            "skipped": false,
            "interrupted": false,
            "job": "",
            "job_count": s.queued + s.running_jobs,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        },
        "current_image": Value::Null,
        "textinfo": Value::Null,
    }))
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionBody {
    pub version: u32,
}

/// The ControlNet extension's API version.
#[utoipa::path(get, path = "/controlnet/version", tag = "a1111",
    responses((status = 200, description = "Always 3", body = VersionBody)),
    security((), ("api_key" = [])))]
pub async fn version() -> Json<VersionBody> {
    Json(VersionBody { version: 3 })
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    pub model_list: Vec<String>,
}

/// The ControlNet models: our adapter names.
#[utoipa::path(get, path = "/controlnet/model_list", tag = "a1111",
    responses((status = 200, description = "Adapter names", body = ModelList)),
    security((), ("api_key" = [])))]
pub async fn model_list(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        model_list: state
            .engine
            .adapters()
            .list()
            .into_iter()
            .map(|a| a.name)
            .collect(),
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Slider {
    pub name: String,
    pub value: f64,
    pub min: f64,
    pub max: f64,
    pub step: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModuleDetail {
    /// A1111: usable without a ControlNet model. False for all of ours.
    pub model_free: bool,
    /// The resolution slider (if any), then threshold_a's and threshold_b's.
    pub sliders: Vec<Slider>,
    /// Ours, not A1111's: runs here now (weight-free, or its weights are in the folder).
    pub available: bool,
    /// Ours, not A1111's: annotator weight files it needs that are not in the folder.
    pub missing_weights: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModuleList {
    pub module_list: Vec<String>,
    pub module_detail: BTreeMap<String, ModuleDetail>,
}

fn slider(s: &annotators::ParamSpec) -> Slider {
    Slider {
        name: s.label.to_string(),
        value: s.default,
        min: s.min,
        max: s.max,
        step: s.step,
    }
}

/// The preprocessors (A1111 modules) and their sliders.
#[utoipa::path(get, path = "/controlnet/module_list", tag = "a1111",
    responses((status = 200, description = "Module names and details", body = ModuleList)),
    security((), ("api_key" = [])))]
pub async fn module_list(State(state): State<AppState>) -> Json<ModuleList> {
    let list = annotators::list();
    let pool = state.engine.annotators();
    Json(ModuleList {
        module_list: list.iter().map(|p| p.name.to_string()).collect(),
        module_detail: list
            .iter()
            .map(|p| {
                let sliders = p
                    .resolution
                    .iter()
                    .chain(p.params.iter())
                    .map(slider)
                    .collect();
                let availability = pool.availability(p);
                (
                    p.name.to_string(),
                    ModuleDetail {
                        model_free: false,
                        sliders,
                        available: availability == engine::Availability::Ready,
                        missing_weights: availability.missing_weights(),
                    },
                )
            })
            .collect(),
    })
}

/// `POST /controlnet/detect`. Fields not listed are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct A1111DetectRequest {
    pub controlnet_module: String,
    /// Base64 images (webuiapi calls this `controlnet_images`).
    #[serde(alias = "controlnet_images")]
    pub controlnet_input_images: Vec<String>,
    /// −1: the module's default.
    pub controlnet_processor_res: f64,
    /// −1: the module's default.
    pub controlnet_threshold_a: f64,
    /// −1: the module's default.
    pub controlnet_threshold_b: f64,
}

impl Default for A1111DetectRequest {
    fn default() -> Self {
        Self {
            controlnet_module: "none".into(),
            controlnet_input_images: Vec::new(),
            controlnet_processor_res: -1.0,
            controlnet_threshold_a: -1.0,
            controlnet_threshold_b: -1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct A1111DetectResponse {
    /// The detected maps, PNG base64, one per input image.
    pub images: Vec<String>,
    /// "Success".
    pub info: String,
}

/// Run a preprocessor on images.
#[utoipa::path(post, path = "/controlnet/detect", tag = "a1111",
    request_body = A1111DetectRequest,
    responses(
        (status = 200, description = "The detected maps", body = A1111DetectResponse),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
    ),
    security((), ("api_key" = [])))]
pub async fn detect(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<A1111DetectRequest>,
) -> Result<Json<A1111DetectResponse>, ApiError> {
    let pre = annotators::find(req.controlnet_module.trim()).ok_or_else(|| {
        ApiError::invalid(
            "controlnet_module",
            format!(
                "unknown module `{}` (see GET /controlnet/module_list)",
                req.controlnet_module
            ),
        )
    })?;
    if req.controlnet_input_images.is_empty() {
        return Err(ApiError::invalid(
            "controlnet_input_images",
            "at least one image",
        ));
    }
    let res = req.controlnet_processor_res;
    let resolution = if res <= 0.0 {
        None
    } else if res.is_finite() && res <= u32::MAX as f64 {
        Some(res as u32)
    } else {
        return Err(ApiError::invalid(
            "controlnet_processor_res",
            "a resolution in pixels, or -1",
        ));
    };
    let params = pre.params_from_thresholds(req.controlnet_threshold_a, req.controlnet_threshold_b);
    let max = state.config.limits.max_input_pixels;
    let images = tokio::task::spawn_blocking(move || {
        let state = &state;
        req.controlnet_input_images
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let image =
                    images::decode_base64(&format!("controlnet_input_images[{i}]"), data, max)?;
                let hint =
                    api::run_preprocessor(state, "", pre.name, &image, resolution, &params, 0)
                        .map_err(|mut e| {
                            let f = e.body.field.clone().unwrap_or_default();
                            e.body.field = Some(match f.as_str() {
                                "preprocessor" => "controlnet_module".to_string(),
                                "processor_res" => "controlnet_processor_res".to_string(),
                                "image" => format!("controlnet_input_images[{i}]"),
                                other => match other
                                    .strip_prefix("params.")
                                    .and_then(|p| pre.params.iter().position(|x| x.name == p))
                                {
                                    Some(0) => "controlnet_threshold_a".to_string(),
                                    Some(1) => "controlnet_threshold_b".to_string(),
                                    _ => other.to_string(),
                                },
                            });
                            e
                        })?;
                images::encode_base64(&hint, OutputFormat::Png)
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|e| ApiError::internal(format!("preprocessing: {e}")))??;
    Ok(Json(A1111DetectResponse {
        images,
        info: "Success".into(),
    }))
}

#[derive(OpenApi)]
#[openapi(
    paths(
        txt2img,
        img2img,
        sd_models,
        samplers,
        options,
        progress,
        version,
        model_list,
        module_list,
        detect,
    ),
    components(schemas(
        A1111Request,
        A1111Response,
        ControlNetUnit,
        IndexOrName,
        UnitImage,
        SdModel,
        Sampler,
        VersionBody,
        ModelList,
        ModuleList,
        ModuleDetail,
        Slider,
        A1111DetectRequest,
        A1111DetectResponse,
    ))
)]
pub struct A1111Doc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_map() {
        assert_eq!(map_sampler(Some("Euler a"), None).unwrap(), "euler-a");
        assert_eq!(map_sampler(None, Some("automatic")).unwrap(), "euler-a");
        assert_eq!(
            map_sampler(Some("DPM++ 2M"), Some("Karras")).unwrap(),
            "dpmpp-2m-karras"
        );
        assert_eq!(
            map_sampler(Some("Euler"), Some("Karras"))
                .unwrap_err()
                .body
                .field
                .as_deref(),
            Some("scheduler")
        );
        assert_eq!(
            map_sampler(Some("LMS"), None)
                .unwrap_err()
                .body
                .field
                .as_deref(),
            Some("sampler_name")
        );
    }

    #[test]
    fn adapters_resolve() {
        let names: Vec<String> = ["canny", "depth", "openpose", "scribble"]
            .map(String::from)
            .into();
        assert_eq!(resolve_adapter("canny", &names).unwrap(), "canny");
        assert_eq!(
            resolve_adapter("control_v11p_sd15_canny [d14c016b]", &names).unwrap(),
            "canny"
        );
        assert!(resolve_adapter("control_v11p_sd15_lineart", &names).is_err());
        let names: Vec<String> = ["canny", "canny_v2"].map(String::from).into();
        assert!(resolve_adapter("sd15_canny_v2_x", &names).is_err());
        assert!(resolve_adapter("control_canny", &names).is_ok());
        assert!(resolve_adapter("can", &names).is_err());
    }
}
