//! The HTTP service: axum routes (native `/v1` and A1111-compatible), validation, auth,
//! metrics, configuration, graceful shutdown. Knows requests and images; tensors stay in the
//! engine and below.
pub mod a1111;
pub mod api;
pub mod auth;
pub mod config;
pub mod cors;
pub mod error;
pub mod images;
pub mod metrics;
pub mod openapi;
pub mod page;
pub mod routes;
pub mod run;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::routing::{get, post, put};
use axum::Router;
use diffusion::pipeline::StableDiffusion;
use engine::{
    AdapterRegistry, AdapterSettings, AnnotatorPool, AnnotatorSettings, Engine, EngineConfig,
    Event, Job,
};
use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::config::Config;
use crate::error::{ApiError, ErrorKind};

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub config: Arc<Config>,
    /// Each base model's text-encoder layers (the most `clip_skip` can skip).
    pub clip_layers: Arc<BTreeMap<String, usize>>,
    ready: Arc<AtomicBool>,
}

impl AppState {
    pub fn check_ready(&self) -> Result<(), ApiError> {
        if self.ready.load(Ordering::SeqCst) && !self.engine.is_closed() {
            Ok(())
        } else {
            Err(ApiError::not_ready())
        }
    }
}

impl api::Catalog for AppState {
    fn has_model(&self, name: &str) -> bool {
        self.engine.models().iter().any(|m| m.name == name)
    }

    fn clip_layers(&self, model: Option<&str>) -> Option<usize> {
        let name = match model {
            Some(m) => m.to_string(),
            None => self.engine.models().first()?.name.clone(),
        };
        self.clip_layers.get(&name).copied()
    }

    fn has_adapter(&self, name: &str) -> bool {
        self.engine.adapters().get(name).is_some()
    }

    fn annotate(
        &self,
        name: &str,
        image: &image::RgbImage,
        resolution: Option<u32>,
        params: &annotators::Params,
        seed: u64,
    ) -> Result<engine::Detection, engine::EngineError> {
        self.engine
            .annotate_keypoints(name, image, resolution, params, seed)
    }
}

/// Loads the configured models (or the embedded one) and adapters, and starts the engine.
/// Also says how many text-encoder layers each model has.
pub fn start_engine(config: &Config) -> anyhow::Result<(Engine, BTreeMap<String, usize>)> {
    let device = diffusion::runtime::open_device(&config.engine.device)?;
    let dtype = diffusion::weights::parse_dtype(&config.engine.dtype)?;
    let mut models = Vec::new();
    if config.models.is_empty() {
        tracing::info!("no models configured: the embedded tiny model (random weights)");
        models.push((
            "embedded".to_string(),
            StableDiffusion::embedded(dtype, &device)?,
        ));
    }
    for m in &config.models {
        tracing::info!(name = %m.name, path = %m.path.display(), "loading base model");
        let options = diffusion::pipeline::LoadOptions {
            dtype,
            vae_upcast: config.engine.vae_upcast.into(),
        };
        let model = StableDiffusion::load(&m.path, options, &device)
            .with_context(|| format!("model `{}` at {}", m.name, m.path.display()))?;
        models.push((m.name.clone(), model));
    }
    let clip_layers = models
        .iter()
        .map(|(name, m)| (name.clone(), m.text_encoder.config.num_hidden_layers))
        .collect();
    let root = &config.annotators.root;
    let annotators = AnnotatorPool::new(AnnotatorSettings {
        root: (!root.as_os_str().is_empty()).then(|| root.clone()),
        budget_bytes: (config.annotators.budget_bytes > 0)
            .then_some(config.annotators.budget_bytes as usize),
        dtype,
        device: device.clone(),
    });
    if let Some(root) = &annotators.settings().root {
        if !root.is_dir() {
            anyhow::bail!("annotators: root {} is not a folder", root.display());
        }
    }
    let registry = AdapterRegistry::new(AdapterSettings {
        roots: config.adapters.roots.clone(),
        budget_bytes: (config.adapters.budget_bytes > 0).then_some(config.adapters.budget_bytes),
        dtype,
        device,
    })?;
    for (name, path) in &config.adapters.preload {
        if path.starts_with("embedded:") && !config.models.is_empty() {
            tracing::warn!(%name, "skipping the embedded adapter: it only fits the embedded model");
            continue;
        }
        let info = registry
            .put(name, path)
            .with_context(|| format!("preloading adapter `{name}`"))?;
        tracing::info!(%name, source = %info.source, bytes = ?info.bytes, "adapter loaded");
    }
    let engine = Engine::start_with(
        models,
        Arc::new(registry),
        Arc::new(annotators),
        EngineConfig {
            max_queue: config.engine.max_queue,
            max_batch: config.engine.max_batch,
            max_queue_delay: Duration::from_millis(config.engine.max_queue_delay_ms),
            prompt_cache: config.engine.prompt_cache,
        },
    );
    Ok((engine, clip_layers))
}

/// One small generation on every model, so the first request does not pay for first-use
/// allocations.
async fn warm_up(engine: &Engine) -> anyhow::Result<()> {
    for m in engine.models() {
        let mut request = diffusion::pipeline::Request::txt2img("warm up", 64, 64);
        request.steps = 1;
        let mut job = Job::new(request);
        job.model = Some(m.name.clone());
        let mut handle = engine.submit(job)?;
        loop {
            match handle.events.recv().await {
                Some(Event::Done { .. }) => break,
                Some(Event::Failed(e)) => anyhow::bail!("warm-up of `{}`: {e}", m.name),
                Some(_) => {}
                None => anyhow::bail!("warm-up of `{}`: the engine stopped", m.name),
            }
        }
    }
    Ok(())
}

pub fn router(state: AppState) -> Router {
    let generation = Router::new()
        .route("/v1/generate", post(routes::generate))
        .route("/v1/generate/stream", post(routes::generate_stream))
        .route("/v1/detect", post(routes::detect))
        .route("/v1/preprocessors", get(routes::preprocessors))
        .route("/v1/models", get(routes::models))
        .route("/v1/adapters", get(routes::adapters))
        .merge(a1111::router())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_api_key,
        ));
    let admin = Router::new()
        .route(
            "/v1/adapters/{name}",
            put(routes::put_adapter).delete(routes::delete_adapter),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin_key,
        ));
    let request_id = HeaderName::from_static("x-request-id");
    let cors = cors::layer(&state.config.server);
    let app = Router::new()
        .route("/", get(page::index))
        .route("/ui/app.js", get(page::app_js))
        .route("/ui/style.css", get(page::style_css))
        .route("/v1/limits", get(routes::limits))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.yaml", get(routes::openapi))
        .merge(generation)
        .merge(admin)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorKind::MethodNotAllowed,
                "this route does not take that method",
            )
        })
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(DefaultBodyLimit::max(state.config.server.max_body_bytes))
        .layer(CatchPanicLayer::custom(|_| {
            use axum::response::IntoResponse;
            ApiError::internal("the request panicked").into_response()
        }))
        .layer(axum::middleware::from_fn(log_failures))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state);
    match cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// The request id (set by the outermost layer), for log lines.
pub fn request_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

/// Logs why each failed request failed, with its request id (the answer carries an
/// [`error::Failure`]). Failures inside an SSE stream are logged where they happen.
async fn log_failures(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let id = request_id(req.headers());
    let response = next.run(req).await;
    if let Some(f) = response.extensions().get::<error::Failure>() {
        error::log_failure(&id, f);
    }
    response
}

pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs the service until SIGTERM/SIGINT, then stops accepting, drains in-flight jobs for up
/// to the grace period, and returns.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    metrics::handle();
    let listener = tokio::net::TcpListener::bind(&config.server.bind)
        .await
        .with_context(|| format!("binding {}", config.server.bind))?;
    let addr = listener.local_addr()?;
    // The port first, for scripts and tests that bind port 0.
    println!("listening on http://{addr}");
    tracing::info!(%addr, "listening");
    let cfg = config.clone();
    let (engine, clip_layers) = tokio::task::spawn_blocking(move || start_engine(&cfg))
        .await
        .context("starting the engine")??;
    let engine = Arc::new(engine);
    let state = AppState {
        engine: engine.clone(),
        config: Arc::new(config.clone()),
        clip_layers: Arc::new(clip_layers),
        ready: Arc::new(AtomicBool::new(false)),
    };
    let ready = state.ready.clone();
    let app = router(state);
    let warm = engine.clone();
    tokio::spawn(async move {
        match warm_up(&warm).await {
            Ok(()) => {
                ready.store(true, Ordering::SeqCst);
                tracing::info!("ready");
            }
            Err(e) => tracing::error!("warm-up failed, staying not ready: {e:#}"),
        }
    });
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let signalled = Arc::new(tokio::sync::Notify::new());
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let (engine, signalled) = (engine.clone(), signalled.clone());
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new connections or jobs; draining in-flight ones");
            engine.close();
            signalled.notify_one();
        }
    });
    // In-flight requests finish (their jobs run to the end) for up to the grace period.
    tokio::select! {
        r = server.into_future() => r?,
        _ = async { signalled.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("grace period over with requests still in flight");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
