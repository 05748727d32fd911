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
use serde_json::{json, Value};
use std::collections::BTreeMap;
use utoipa::OpenApi;

mod convert;
mod fields;
mod infotext;
mod types;

pub use convert::{map_sampler, resolve_adapter, SAMPLER_NAMES};
pub use fields::{Scope, FIELDS};
pub use types::*;

use crate::api;
use crate::error::from_json_value as from_value;
use crate::error::{ApiError, ApiJson, ErrorBody, ErrorKind, RawJson};
use crate::images::{self, OutputFormat};
use crate::run::run_job;
use crate::AppState;
use convert::{convert, processor_res, Converted, UnitSource, SAMPLERS};
use infotext::Info;

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

async fn generate(
    state: AppState,
    body: Value,
    img2img: bool,
) -> Result<Json<A1111Response>, ApiError> {
    state.check_ready()?;
    if !body.is_object() {
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            "the body must be a JSON object",
        ));
    }
    let mut typed = body.clone();
    crate::error::whole_numbers(&mut typed);
    let mut req: A1111Request = from_value(&typed, "")?;
    // Defaults that depend on the limits (A1111Request's own are A1111's).
    let limits = &state.config.limits;
    if body.get("steps").is_none() {
        req.steps = limits.default_steps();
    }
    for (key, side) in [("width", &mut req.width), ("height", &mut req.height)] {
        if body.get(key).is_none() {
            *side = limits.default_side();
        }
    }
    let s = state.clone();
    let (converted, req) = images::blocking("preparing the request", move || {
        convert(&req, img2img, &s).map(|c| (c, req))
    })
    .await?;
    let Converted {
        native,
        units,
        sampler_label,
        clip_skip,
    } = converted;
    let scheduler = native.scheduler.clone();
    let (mut prepared, prepare_ms) = crate::routes::prepare(&state, native).await.map_err(|e| {
        let fields: Vec<_> = units.iter().map(UnitSource::as_field).collect();
        fields::rename_request(e, &fields)
    })?;
    let model = prepared
        .job
        .model
        .clone()
        .or_else(|| state.engine.models().first().map(|m| m.name.clone()))
        .unwrap_or_default();
    let hints = std::mem::take(&mut prepared.hints);
    let finished = run_job(&state, prepared, prepare_ms, None).await?;
    let info = Info {
        req: &req,
        img2img,
        sampler_label: &sampler_label,
        scheduler: &scheduler,
        clip_skip,
        units: &units,
        model: &model,
        seeds: &finished.seeds,
        timings: &finished.timings,
    }
    .to_json_string();
    let mut out = Vec::new();
    if req.send_images {
        // The generated images, then the detected maps of units with a module.
        out = finished.images;
        out.extend(
            hints
                .into_iter()
                .zip(&units)
                .filter(|(_, unit)| unit.module.is_some() && unit.save_map)
                .map(|(hint, _)| hint),
        );
    }
    Ok(Json(A1111Response {
        images: images::encode_base64_all(out, OutputFormat::Png).await?,
        parameters: body,
        info,
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
        (status = 413, description = "Body over the limit (server.max_body_bytes)", body = ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = ErrorBody),
        (status = 422, description = "A field is invalid (named in `field`)", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
        (status = 500, description = "The server failed (the job, a weight file, or a panic)", body = ErrorBody),
        (status = 503, description = "Not ready, or out of device memory", body = ErrorBody),
        (status = 504, description = "Timed out", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn txt2img(
    State(state): State<AppState>,
    RawJson(body): RawJson,
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
        (status = 413, description = "Body over the limit (server.max_body_bytes)", body = ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = ErrorBody),
        (status = 422, description = "A field is invalid (named in `field`)", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
        (status = 500, description = "The server failed (the job, a weight file, or a panic)", body = ErrorBody),
        (status = 503, description = "Not ready, or out of device memory", body = ErrorBody),
        (status = 504, description = "Timed out", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn img2img(
    State(state): State<AppState>,
    RawJson(body): RawJson,
) -> Result<Json<A1111Response>, ApiError> {
    generate(state, body, true).await
}

/// The base models, as A1111 lists checkpoints.
#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "a1111",
    responses((status = 200, description = "Base models; the first is the default", body = [SdModel]),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
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

/// The samplers.
#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "a1111",
    responses((status = 200, description = "A1111 sampler names", body = [Sampler]),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
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
    responses((status = 200, description = "`sd_model_checkpoint` (the default model) and a few more", body = Object),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
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
    responses((status = 200, description = "{progress, eta_relative, state, current_image}", body = Object),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
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

/// The ControlNet extension's API version.
#[utoipa::path(get, path = "/controlnet/version", tag = "a1111",
    responses((status = 200, description = "Always 3", body = VersionBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
    security((), ("api_key" = [])))]
pub async fn version() -> Json<VersionBody> {
    Json(VersionBody { version: 3 })
}

/// The ControlNet models: our adapter names.
#[utoipa::path(get, path = "/controlnet/model_list", tag = "a1111",
    responses((status = 200, description = "Adapter names", body = ModelList),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
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
    responses((status = 200, description = "Module names and details", body = ModuleList),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
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

/// Run a preprocessor on images.
#[utoipa::path(post, path = "/controlnet/detect", tag = "a1111",
    request_body = A1111DetectRequest,
    responses(
        (status = 200, description = "The detected maps", body = A1111DetectResponse),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 413, description = "Body over the limit (server.max_body_bytes)", body = ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
        (status = 429, description = "The device worker's queue is full (network preprocessors)", body = ErrorBody),
        (status = 500, description = "The server failed (the job, a weight file, or a panic)", body = ErrorBody),
        (status = 503, description = "Out of device memory, or shutting down", body = ErrorBody),
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
    let resolution = processor_res("controlnet_processor_res", req.controlnet_processor_res)?;
    let params = pre.params_from_thresholds(req.controlnet_threshold_a, req.controlnet_threshold_b);
    let max = state.config.limits.max_input_pixels;
    let detections: Vec<(String, Option<serde_json::Value>)> =
        images::blocking("preprocessing", move || {
            req.controlnet_input_images
                .iter()
                .enumerate()
                .map(|(i, data)| {
                    let image =
                        images::decode_base64(&format!("controlnet_input_images[{i}]"), data, max)?;
                    let detection =
                        api::run_preprocessor(&state, "", pre.name, &image, resolution, &params, 0)
                            .map_err(|e| fields::rename_detect(e, pre, i))?;
                    Ok((
                        images::encode_base64(&detection.hint, OutputFormat::Png)?,
                        detection.keypoints,
                    ))
                })
                .collect()
        })
        .await?;
    // As the extension answers: `poses` only for the OpenPose modules, one per image.
    let poses = detections
        .iter()
        .any(|(_, k)| k.is_some())
        .then(|| detections.iter().map(|(_, k)| k.clone()).collect());
    Ok(Json(A1111DetectResponse {
        images: detections.into_iter().map(|(image, _)| image).collect(),
        poses,
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
