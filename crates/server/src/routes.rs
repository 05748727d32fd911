//! The native API (`/v1/...`) and the operational routes.
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::Stream;
use std::convert::Infallible;
use std::time::Instant;
use tokio::sync::mpsc;

use crate::api::{
    self, AdapterInfoApi, DetectRequest, DetectResponse, GenerateRequest, GenerateResponse,
    LimitsInfo, ModelInfoApi, PreprocessorInfo, PutAdapterRequest,
};
use crate::error::{ApiError, ApiJson, ErrorBody, ErrorKind};
use crate::images;
use crate::run::{run_job, Finished, Progress};
use crate::AppState;

/// Decodes and checks a request on a blocking thread (images, preprocessors).
pub async fn prepare(
    state: &AppState,
    req: GenerateRequest,
) -> Result<(api::Prepared, u64), ApiError> {
    let started = Instant::now();
    let s = state.clone();
    let prepared = tokio::task::spawn_blocking(move || api::prepare(req, &s.config.limits, &s))
        .await
        .map_err(|e| ApiError::internal(format!("preparing the request: {e}")))??;
    Ok((prepared, started.elapsed().as_millis() as u64))
}

fn wants_raw_image(headers: &HeaderMap) -> Option<&'static str> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    ["image/png", "image/jpeg", "image/webp"]
        .into_iter()
        .find(|m| accept.split(',').any(|a| a.trim().starts_with(m)))
}

/// Generate images.
#[utoipa::path(
    post, path = "/v1/generate", tag = "generate",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "The images (JSON), or with `Accept: image/png` (jpeg, webp) the single image's bytes", body = GenerateResponse,
         content_type = "application/json"),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 406, description = "A raw image was asked for more than one image", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = ErrorBody),
        (status = 422, description = "A field is invalid (named in `field`)", body = ErrorBody),
        (status = 429, description = "Queue full; see Retry-After", body = ErrorBody),
        (status = 500, description = "The job failed", body = ErrorBody),
        (status = 503, description = "Not ready or shutting down", body = ErrorBody),
        (status = 504, description = "Not done within the request timeout (the job is cancelled)", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    state.check_ready()?;
    let raw = wants_raw_image(&headers);
    let mut req = req;
    if let Some(mime) = raw {
        if req.num_images != 1 {
            return Err(ApiError::new(
                ErrorKind::NotAcceptable,
                "a raw image answer holds one image: ask for num_images 1 or accept JSON",
            )
            .with_field("num_images"));
        }
        req.output_format = match mime {
            "image/jpeg" => images::OutputFormat::Jpeg,
            "image/webp" => images::OutputFormat::Webp,
            _ => images::OutputFormat::Png,
        };
    }
    let (mut prepared, prepare_ms) = prepare(&state, req).await?;
    let format = prepared.format;
    let hints = std::mem::take(&mut prepared.hints);
    let mut finished = run_job(&state, prepared, prepare_ms, None).await?;
    if raw.is_some() {
        let image = finished.images.swap_remove(0);
        let bytes = images::encode_blocking(image, format).await?;
        return Ok((
            [
                (header::CONTENT_TYPE, format.mime().to_string()),
                (
                    header::HeaderName::from_static("x-seed"),
                    finished.seeds[0].to_string(),
                ),
            ],
            bytes,
        )
            .into_response());
    }
    Ok(Json(response(finished, format, hints).await?).into_response())
}

/// The JSON answer: images in `format`, hints as PNG, both base64 (encoded on a blocking
/// thread).
async fn response(
    finished: Finished,
    format: images::OutputFormat,
    hints: Vec<image::RgbImage>,
) -> Result<GenerateResponse, ApiError> {
    Ok(GenerateResponse {
        images: images::encode_base64_all(finished.images, format).await?,
        hints: images::encode_base64_all(hints, images::OutputFormat::Png).await?,
        seeds: finished.seeds,
        format,
        timings: finished.timings,
    })
}

/// Generate with progress as server-sent events: `queued` {position}, `started`, `step`
/// {step, total}, then `done` (a GenerateResponse) or `error` (an ErrorBody). A client that
/// disconnects cancels its job.
#[utoipa::path(
    post, path = "/v1/generate/stream", tag = "generate",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "An event stream: events `queued`, `started`, `step`, then `done` or `error`, each with a JSON data line", content_type = "text/event-stream", body = String),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 413, description = "Body over the limit", body = ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
        (status = 500, description = "The server failed (the job, a weight file, or a panic)", body = ErrorBody),
        (status = 503, description = "Not ready", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn generate_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<GenerateRequest>,
) -> Result<Response, ApiError> {
    let request_id = crate::request_id(&headers);
    state.check_ready()?;
    // Bad input is a plain 4xx before the stream starts.
    let (mut prepared, prepare_ms) = prepare(&state, req).await?;
    let (events_tx, events_rx) = mpsc::channel::<SseEvent>(64);
    let (progress_tx, mut progress_rx) = mpsc::channel::<Progress>(64);
    let format = prepared.format;
    let hints = std::mem::take(&mut prepared.hints);
    let task_state = state.clone();
    let forward = events_tx.clone();
    // Progress → SSE events; ends when the job ends or the client goes.
    let forwarder = tokio::spawn(async move {
        loop {
            // The stream's receiver goes when the client does: notice it even while the job
            // waits in the queue and sends nothing.
            let p = tokio::select! {
                p = progress_rx.recv() => match p {
                    Some(p) => p,
                    None => break,
                },
                _ = forward.closed() => break,
            };
            let event = match p {
                Progress::Queued { position } => SseEvent::default()
                    .event("queued")
                    .data(serde_json::json!({ "position": position }).to_string()),
                Progress::Started => SseEvent::default().event("started").data("{}"),
                Progress::Step { step, total } => SseEvent::default()
                    .event("step")
                    .data(serde_json::json!({ "step": step, "total": total }).to_string()),
            };
            if forward.send(event).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        // The progress sender closes when the forwarder stops, i.e. when the client left:
        // run_job then cancels the job.
        let result = run_job(&task_state, prepared, prepare_ms, Some(progress_tx)).await;
        // The progress events go first: `done` or `error` is the last event.
        let _ = forwarder.await;
        let result = match result {
            Ok(f) => response(f, format, hints).await,
            Err(e) => Err(e),
        };
        let event = match result {
            Ok(done) => SseEvent::default()
                .event("done")
                .data(serde_json::to_string(&done).unwrap_or_default()),
            Err(e) => {
                // The answer was 200 when the stream began: log the failure here.
                e.log(&request_id);
                SseEvent::default()
                    .event("error")
                    .data(serde_json::to_string(&e.body).unwrap_or_default())
            }
        };
        let _ = events_tx.send(event).await;
    });
    let stream = sse_stream(events_rx);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    // nginx would otherwise buffer the stream.
    response.headers_mut().insert(
        header::HeaderName::from_static("x-accel-buffering"),
        header::HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// The events as the response body; dropping it (the client left) closes the channel.
fn sse_stream(rx: mpsc::Receiver<SseEvent>) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    use futures_util::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// Run a preprocessor alone.
#[utoipa::path(
    post, path = "/v1/detect", tag = "preprocess",
    request_body = DetectRequest,
    responses(
        (status = 200, description = "The hint image", body = DetectResponse),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 413, description = "Body over the limit (server.max_body_bytes)", body = ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
        (status = 429, description = "The device worker's queue is full (network preprocessors)", body = ErrorBody),
        (status = 500, description = "The server failed (the job, a weight file, or a panic)", body = ErrorBody),
        (status = 503, description = "Out of device memory, or shutting down", body = ErrorBody),
    ),
    security((), ("api_key" = []))
)]
pub async fn detect(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DetectRequest>,
) -> Result<Json<DetectResponse>, ApiError> {
    let max = state.config.limits.max_input_pixels;
    images::blocking("preprocessing", move || {
        let image = images::decode_base64("image", &req.image, max)?;
        let detection = api::run_preprocessor(
            &state,
            "",
            &req.preprocessor,
            &image,
            req.processor_res,
            &req.params,
            req.seed,
        )?;
        let hint = &detection.hint;
        Ok(Json(DetectResponse {
            image: images::encode_base64(hint, images::OutputFormat::Png)?,
            width: hint.width(),
            height: hint.height(),
            pose: detection.keypoints,
        }))
    })
    .await
}

/// The preprocessors and their parameters.
#[utoipa::path(
    get, path = "/v1/preprocessors", tag = "preprocess",
    responses((status = 200, description = "Every preprocessor", body = [PreprocessorInfo]),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
    security((), ("api_key" = []))
)]
pub async fn preprocessors(State(state): State<AppState>) -> Json<Vec<PreprocessorInfo>> {
    Json(api::preprocessor_list(state.engine.annotators()))
}

/// The base models.
#[utoipa::path(
    get, path = "/v1/models", tag = "models",
    responses((status = 200, description = "Base models; the first is the default", body = [ModelInfoApi]),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
    security((), ("api_key" = []))
)]
pub async fn models(State(state): State<AppState>) -> Json<Vec<ModelInfoApi>> {
    Json(
        state
            .engine
            .models()
            .into_iter()
            .enumerate()
            .map(|(i, m)| ModelInfoApi {
                name: m.name,
                default: i == 0,
            })
            .collect(),
    )
}

/// What a request may ask of this server (sizes, steps, images, controls, prompt length, the
/// schedulers), the defaults it fills in, and whether generation needs a key. Needs no key
/// itself, so a client (the page) learns that before its first keyed call.
#[utoipa::path(
    get, path = "/v1/limits", tag = "models",
    responses((status = 200, description = "This server's limits and defaults", body = LimitsInfo))
)]
pub async fn limits(State(state): State<AppState>) -> Json<LimitsInfo> {
    Json(LimitsInfo::new(&state.config.limits, &state.config.auth))
}

/// The ControlNet adapters.
#[utoipa::path(
    get, path = "/v1/adapters", tag = "adapters",
    responses((status = 200, description = "Registered adapters", body = [AdapterInfoApi]),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody)),
    security((), ("api_key" = []))
)]
pub async fn adapters(State(state): State<AppState>) -> Json<Vec<AdapterInfoApi>> {
    Json(
        state
            .engine
            .adapters()
            .list()
            .into_iter()
            .map(Into::into)
            .collect(),
    )
}

/// Load an adapter under a name, or point the name at new weights (jobs already admitted keep
/// the old ones).
#[utoipa::path(
    put, path = "/v1/adapters/{name}", tag = "adapters",
    params(("name" = String, Path, description = "Adapter name: letters, digits, '.', '_', '-'")),
    request_body = PutAdapterRequest,
    responses(
        (status = 200, description = "Loaded", body = AdapterInfoApi),
        (status = 400, description = "Not JSON", body = ErrorBody),
        (status = 401, description = "Missing or unknown admin key", body = ErrorBody),
        (status = 403, description = "Outside the adapter roots, or not an admin key", body = ErrorBody),
        (status = 404, description = "No such file in the roots", body = ErrorBody),
        (status = 413, description = "Body over the limit (server.max_body_bytes)", body = ErrorBody),
        (status = 415, description = "The body is not sent as application/json", body = ErrorBody),
        (status = 422, description = "Bad name or not a ControlNet", body = ErrorBody),
        (status = 500, description = "The server failed (the job, a weight file, or a panic)", body = ErrorBody),
        (status = 503, description = "The memory budget is held by adapters in use", body = ErrorBody),
    ),
    security((), ("admin_key" = []))
)]
pub async fn put_adapter(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<PutAdapterRequest>,
) -> Result<Json<AdapterInfoApi>, ApiError> {
    if !engine::adapters::valid_name(&name) {
        return Err(ApiError::invalid(
            "name",
            "adapter names are 1-128 letters, digits, '.', '_' or '-'",
        ));
    }
    let registry = state.engine.adapters().clone();
    let info = tokio::task::spawn_blocking(move || registry.put(&name, &req.path))
        .await
        .map_err(|e| ApiError::internal(format!("loading: {e}")))?
        .map_err(|e| {
            let e: ApiError = e.into();
            if e.body.field.is_none() && e.status != StatusCode::SERVICE_UNAVAILABLE {
                e.with_field("path")
            } else {
                e
            }
        })?;
    Ok(Json(info.into()))
}

/// Forget an adapter (jobs using it finish with it).
#[utoipa::path(
    delete, path = "/v1/adapters/{name}", tag = "adapters",
    params(("name" = String, Path, description = "Adapter name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Missing or unknown admin key", body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 404, description = "No such adapter", body = ErrorBody),
    ),
    security((), ("admin_key" = []))
)]
pub async fn delete_adapter(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.engine.adapters().remove(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct HealthBody {
    pub status: String,
}

/// Alive (the process answers).
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthBody)))]
pub async fn health() -> Json<HealthBody> {
    Json(HealthBody {
        status: "ok".into(),
    })
}

/// Ready: models loaded and warmed up, not shutting down.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = HealthBody),
        (status = 503, description = "Starting or shutting down", body = ErrorBody),
    ))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<HealthBody>, ApiError> {
    state.check_ready()?;
    Ok(Json(HealthBody {
        status: "ready".into(),
    }))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    crate::metrics::record_engine(&state.engine.status());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::handle().render(),
    )
}

/// This API's description.
#[utoipa::path(get, path = "/openapi.yaml", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = String, content_type = "application/yaml")))]
pub async fn openapi(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        crate::openapi::yaml_for(&crate::openapi::Facts::from_state(&state)),
    )
}
