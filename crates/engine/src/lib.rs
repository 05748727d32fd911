//! The engine: resident base models, ControlNet adapters by name, an admission queue, and one
//! device worker that batches every running job through the shared denoiser step by step.
//!
//! - Callers [`Engine::submit`] a [`Job`] and get a [`JobHandle`]: a stream of [`Event`]s
//!   (queued with position, started, step k of N, done or failed) and a way to cancel. Submit
//!   never blocks: a full queue is [`EngineError::Overloaded`] at once.
//! - A job takes its adapters from the [`AdapterRegistry`] when it is submitted and keeps them
//!   until it ends, so adapters can be loaded, replaced and unloaded while traffic flows.
//!   Adapters that must be loaded again (evicted) are loaded on a loader thread, never on the
//!   worker.
//! - The worker takes jobs between steps (high priority first, up to `max_batch` images; when
//!   idle it may hold a partial batch up to `max_queue_delay`), and advances every job that
//!   shares a base model, latent size and prompt length with one UNet call
//!   ([`diffusion::denoise::step_batch_each`]), whatever their prompts, seeds, schedulers, step
//!   counts, guidance and ControlNets. Finished jobs are decoded together. Jobs whose caller has
//!   gone, that were cancelled or whose deadline passed leave at the next step boundary.
//! - A job that fails, or panics, fails alone: a failed shared step is retried job by job.
//! - Device out-of-memory ([`is_out_of_memory`]) is a property of the batch, not of a job: a
//!   batched UNet step or VAE decode that runs out of memory is rerun in halves (no job has
//!   advanced: the step is a function of the jobs' state before it), and the worker forms
//!   smaller batches for a while ([`Status::batch_cap`]). Only a job that runs out of memory
//!   alone fails, with [`EngineError::OutOfMemory`] (HTTP 503); the others go on.
//!   [`Status::oom_retries`] and [`Status::oom_failures`] count both.
//! - For tests only, [`Engine::inject_faults`] makes chosen batched calls fail with the error a
//!   CUDA out-of-memory gives, so the paths above run on the CPU.
//!
//! No HTTP here: the server maps [`EngineError`] to status codes.
pub mod adapters;
pub mod annotate;
mod queue;
mod worker;

use diffusion::control::ControlMode;
use diffusion::images::ResizeMode;
use diffusion::pipeline::{ControlSpec, Request, StableDiffusion};
use image::RgbImage;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub use adapters::{AdapterCounters, AdapterInfo, AdapterRegistry, AdapterSettings};
pub use annotate::{
    draw_pose, AnnotatorCounters, AnnotatorPool, AnnotatorSettings, Availability, PoseError,
};
pub use neural_annotators::Detection;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    /// The queue is full: try again later (HTTP 429).
    #[error("the queue is full ({0} jobs waiting)")]
    Overloaded(usize),
    /// The request cannot be run as given (HTTP 4xx).
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("unknown base model `{0}`")]
    UnknownModel(String),
    #[error("unknown adapter `{0}`")]
    UnknownAdapter(String),
    /// An adapter path outside the configured roots.
    #[error("{0}")]
    Forbidden(String),
    /// An adapter path that is not there.
    #[error("{0}")]
    NotFound(String),
    /// The adapter's weights could not be loaded (a bad or mismatched file).
    #[error("{0}")]
    AdapterLoad(String),
    /// A preprocessor request that cannot run as given (HTTP 4xx naming the field): unknown
    /// name, bad parameter or image, missing annotator weights.
    #[error("{0}")]
    Annotator(annotators::AnnotatorError),
    /// An annotator weight file that is there but cannot be loaded (the server's files).
    #[error("{0}")]
    AnnotatorLoad(String),
    /// The adapter memory budget is held by adapters in use (try again later).
    #[error("{0}")]
    MemoryBudget(String),
    /// The job's deadline passed before it finished.
    #[error("the job's deadline passed")]
    Timeout,
    /// The caller cancelled the job.
    #[error("cancelled")]
    Cancelled,
    /// The model failed on this job (HTTP 500); other jobs go on.
    #[error("generation failed: {0}")]
    Failed(String),
    /// The device ran out of memory on this job alone (HTTP 503): what it was doing then.
    /// Batches are retried smaller before a job gets this; other jobs go on.
    #[error("out of device memory while {0}; try a smaller size or fewer images")]
    OutOfMemory(String),
    /// The engine has stopped taking jobs.
    #[error("the engine is shutting down")]
    Stopped,
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Jobs waiting to start (queued or loading adapters), beyond which submissions are refused.
    pub max_queue: usize,
    /// Images in the running batch (a job of n images takes n; CFG doubles the UNet rows). A
    /// single job larger than this still runs, alone.
    pub max_batch: usize,
    /// How long an idle worker holds a partial batch for more jobs (Triton's
    /// `max_queue_delay`). Jobs join a running batch between steps without waiting.
    pub max_queue_delay: Duration,
    /// Prompt embeddings kept for repeated prompts (entries per engine).
    pub prompt_cache: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch: 8,
            max_queue_delay: Duration::ZERO,
            prompt_cache: 256,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    High,
    #[default]
    Normal,
}

/// One ControlNet of a job, by adapter name.
#[derive(Clone)]
pub struct NamedControl {
    pub adapter: String,
    pub image: RgbImage,
    pub resize: ResizeMode,
    pub scale: f64,
    pub start: f64,
    pub end: f64,
    pub mode: ControlMode,
    /// ControlNet 1.1 inpaint convention: hint pixels under the request's mask become −1.
    pub mask_hint: bool,
}

/// What a caller submits.
pub struct Job {
    /// Base model name; `None` is the first model.
    pub model: Option<String>,
    /// The generation; ControlNets given here as models run too, after `controls`.
    pub request: Request,
    pub controls: Vec<NamedControl>,
    pub priority: Priority,
    /// Fails with [`EngineError::Timeout`] if not done by then (checked between steps).
    pub deadline: Option<Instant>,
}

impl Job {
    pub fn new(request: Request) -> Self {
        Self {
            model: None,
            request,
            controls: Vec::new(),
            priority: Priority::Normal,
            deadline: None,
        }
    }
}

/// What a caller hears about its job, in order.
#[derive(Debug)]
pub enum Event {
    /// Accepted; `position` jobs were waiting ahead of it.
    Queued {
        position: usize,
    },
    /// Joined the running batch.
    Started,
    /// Finished step `step` of `total`.
    Step {
        step: usize,
        total: usize,
    },
    /// The images, their seeds, and the final latents `[n, 4, h, w]` (f32, on the device).
    Done {
        images: Vec<RgbImage>,
        seeds: Vec<u64>,
        latents: candle_core::Tensor,
    },
    Failed(EngineError),
}

/// A submitted job: its events, and a way to cancel it (dropping the handle cancels too).
pub struct JobHandle {
    pub events: UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl JobHandle {
    /// Asks the worker to drop the job at the next step boundary; the stream then ends with
    /// `Failed(Cancelled)`.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The worker's side of a job's handle.
pub(crate) struct Ticket {
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
    pub priority: Priority,
    pub deadline: Option<Instant>,
}

impl Ticket {
    pub fn gone(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.events.is_closed()
    }

    pub fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    pub fn send(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Why a job leaves early, if it does: cancelled, caller gone (nobody to tell), deadline.
    pub fn stop_reason(&self, now: Instant) -> Option<EngineError> {
        if self.gone() {
            Some(EngineError::Cancelled)
        } else if self.expired(now) {
            Some(EngineError::Timeout)
        } else {
            None
        }
    }
}

/// A base model as the engine lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
}

/// What the engine is doing now, for metrics and readiness.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Status {
    /// Jobs waiting to start (queued or loading adapters).
    pub queued: usize,
    pub running_jobs: usize,
    pub running_images: usize,
    /// UNet calls made so far.
    pub steps_run: u64,
    /// UNet rows of the last call (images × 2 with guidance).
    pub last_batch_rows: usize,
    pub prompt_cache_hits: u64,
    pub prompt_cache_misses: u64,
    pub adapters: AdapterCounters,
    /// Network annotations waiting for the worker.
    pub annotations_queued: usize,
    pub annotators: AnnotatorCounters,
    /// Batched calls (UNet steps, VAE decodes) that ran out of device memory and were rerun
    /// in smaller batches.
    pub oom_retries: u64,
    /// Jobs failed with [`EngineError::OutOfMemory`].
    pub oom_failures: u64,
    /// Images the worker puts in one UNet call now: `max_batch`, or less for a while after
    /// an out-of-memory step (see the worker).
    pub batch_cap: usize,
}

#[derive(Default)]
pub(crate) struct Stats {
    pub running_jobs: AtomicUsize,
    pub running_images: AtomicUsize,
    pub steps_run: AtomicU64,
    pub last_batch_rows: AtomicUsize,
    pub prompt_cache_hits: AtomicU64,
    pub prompt_cache_misses: AtomicU64,
    pub oom_retries: AtomicU64,
    pub oom_failures: AtomicU64,
    pub batch_cap: AtomicUsize,
}

/// What a batched device call is doing, for [`Engine::inject_faults`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Admitting one job: its prompt embeddings, initial latents and ControlNet hints.
    Encode,
    /// One denoising step (UNet and ControlNets) for the jobs of a batch.
    Denoise,
    /// The VAE decode of finished jobs (or of some images of one job).
    Decode,
}

/// A batched device call about to run, as a fault-injection hook sees it.
#[derive(Debug, Clone)]
pub struct StepInfo {
    pub stage: Stage,
    /// Jobs in the call.
    pub jobs: usize,
    /// Images in the call (a job of n images counts n; guidance does not double them).
    pub images: usize,
    /// Each job's first seed, in batch order: lets a test pick out a job.
    pub seeds: Vec<u64>,
}

/// **Test-only.** Decides whether a device call fails as if it ran out of memory (`true`:
/// it fails with [`simulated_out_of_memory`] before touching the device).
pub type FaultHook = Arc<dyn Fn(&StepInfo) -> bool + Send + Sync>;

/// The text cudarc gives a CUDA out-of-memory (`DriverError`'s Display is its Debug).
const SIMULATED_OOM: &str = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";

/// **Test-only.** The error candle returns when a CUDA allocation fails: a
/// `candle_core::Error::Cuda` whose text is cudarc's `CUDA_ERROR_OUT_OF_MEMORY` driver error.
/// Built without the `cuda` feature (cudarc's types are not there), so it is a stand-in with
/// the same variant and text; [`is_out_of_memory`] sees no difference.
pub fn simulated_out_of_memory() -> candle_core::Error {
    #[derive(Debug)]
    struct SimulatedOom;
    impl std::fmt::Display for SimulatedOom {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(SIMULATED_OOM)
        }
    }
    impl std::error::Error for SimulatedOom {}
    candle_core::Error::Cuda(Box::new(SimulatedOom))
}

/// Whether an error (candle's, diffusion's wrapping it, or a panic's message) is the device
/// running out of memory: cudarc's `CUDA_ERROR_OUT_OF_MEMORY` driver error (allocations,
/// kernel launches) or a cuBLAS / cuDNN / cuRAND allocation failure.
///
/// By text: candle boxes CUDA errors as `candle_core::Error::Cuda(Box<dyn Error>)`, and the
/// typed cudarc errors under it exist only in `cuda` builds, while these names are what their
/// Display prints (the CUDA enum names) in every build. The names are specific enough not to
/// match anything else; wrappers (backtraces, context) keep the inner text.
pub fn is_out_of_memory(error: &dyn std::fmt::Display) -> bool {
    const MARKERS: [&str; 4] = [
        "CUDA_ERROR_OUT_OF_MEMORY",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "CUDNN_STATUS_ALLOC_FAILED",
        "CURAND_STATUS_ALLOCATION_FAILED",
    ];
    let text = error.to_string();
    MARKERS.iter().any(|m| text.contains(m))
}

/// A job whose adapters must be loaded before it can queue.
struct Loading {
    job: Job,
    model: usize,
    resolved: Vec<Option<Arc<diffusion::controlnet::ControlNetModel>>>,
    ticket: Ticket,
}

pub struct Engine {
    queue: Arc<queue::Queue>,
    models: Vec<String>,
    adapters: Arc<AdapterRegistry>,
    annotators: Arc<AnnotatorPool>,
    loader: Mutex<Option<mpsc::Sender<Loading>>>,
    stats: Arc<Stats>,
    faults: Arc<Mutex<Option<FaultHook>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the device worker, which owns `models` (name, model) from now on, and the
    /// adapter loader, with no annotator folder. `models` must not be empty.
    pub fn start(
        models: Vec<(String, StableDiffusion)>,
        adapters: Arc<AdapterRegistry>,
        config: EngineConfig,
    ) -> Self {
        let settings = AnnotatorSettings {
            root: None,
            budget_bytes: None,
            dtype: models
                .first()
                .map_or(candle_core::DType::F32, |m| m.1.unet.dtype()),
            device: models
                .first()
                .map_or(candle_core::Device::Cpu, |m| m.1.device().clone()),
        };
        Self::start_with(
            models,
            adapters,
            Arc::new(AnnotatorPool::new(settings)),
            config,
        )
    }

    /// [`Self::start`] with an annotator pool.
    pub fn start_with(
        models: Vec<(String, StableDiffusion)>,
        adapters: Arc<AdapterRegistry>,
        annotators: Arc<AnnotatorPool>,
        config: EngineConfig,
    ) -> Self {
        assert!(!models.is_empty(), "the engine needs a base model");
        let queue = Arc::new(queue::Queue::new(config.max_queue));
        let stats = Arc::new(Stats::default());
        let names = models.iter().map(|(n, _)| n.clone()).collect();
        let faults = Arc::new(Mutex::new(None));
        let worker = worker::Worker::new(
            models.into_iter().map(|(_, m)| m).collect(),
            queue.clone(),
            stats.clone(),
            faults.clone(),
            config,
        );
        let mut threads = vec![std::thread::Builder::new()
            .name("device-worker".into())
            .spawn(move || worker.run())
            .expect("spawning the device worker")];
        let (loader, loads) = mpsc::channel::<Loading>();
        let (registry, loader_queue) = (adapters.clone(), queue.clone());
        threads.push(
            std::thread::Builder::new()
                .name("adapter-loader".into())
                .spawn(move || {
                    for loading in loads {
                        load_then_queue(&registry, &loader_queue, loading);
                    }
                })
                .expect("spawning the adapter loader"),
        );
        Self {
            queue,
            models: names,
            adapters,
            annotators,
            loader: Mutex::new(Some(loader)),
            stats,
            faults,
            threads: Mutex::new(threads),
        }
    }

    /// One base model (the embedded default, or one loaded by the caller) and an adapter
    /// registry with no roots.
    pub fn single(model: StableDiffusion, config: EngineConfig) -> Self {
        let adapters = AdapterRegistry::new(AdapterSettings {
            roots: Vec::new(),
            budget_bytes: None,
            dtype: model.unet.dtype(),
            device: model.device().clone(),
        })
        .expect("no roots to check");
        Self::start(vec![("default".into(), model)], Arc::new(adapters), config)
    }

    pub fn adapters(&self) -> &Arc<AdapterRegistry> {
        &self.adapters
    }

    pub fn annotators(&self) -> &Arc<AnnotatorPool> {
        &self.annotators
    }

    /// Runs preprocessor `name` on `image` and returns the hint at its detect size (see
    /// [`annotate`]). `resolution: None` is the preprocessor's default. Blocks until done:
    /// call it from a blocking thread, never from async code.
    pub fn annotate(
        &self,
        name: &str,
        image: &RgbImage,
        resolution: Option<u32>,
        params: &annotators::Params,
        seed: u64,
    ) -> Result<RgbImage, EngineError> {
        Ok(self
            .annotate_keypoints(name, image, resolution, params, seed)?
            .hint)
    }

    /// [`Engine::annotate`], with the keypoints of preprocessors that find them (OpenPose's, as
    /// OpenPose JSON).
    pub fn annotate_keypoints(
        &self,
        name: &str,
        image: &RgbImage,
        resolution: Option<u32>,
        params: &annotators::Params,
        seed: u64,
    ) -> Result<Detection, EngineError> {
        let checked =
            annotators::check(name, image, resolution, params).map_err(EngineError::Annotator)?;
        let pre = checked.pre;
        if let Some(run) = pre.free_run {
            let started = Instant::now();
            let hint = run(&checked.input(image), &checked.values, seed);
            metrics::histogram!("engine_annotate_seconds", "preprocessor" => pre.name)
                .record(started.elapsed().as_secs_f64());
            return Ok(Detection {
                hint,
                keypoints: None,
            });
        }
        if let Some(reason) = pre.unsupported {
            return Err(EngineError::Annotator(
                annotators::AnnotatorError::Unsupported {
                    preprocessor: pre.name.to_string(),
                    reason: reason.to_string(),
                },
            ));
        }
        let network = neural_annotators::Network::for_preprocessor(pre.name).ok_or_else(|| {
            EngineError::Annotator(annotators::AnnotatorError::NotImplemented(
                pre.name.to_string(),
            ))
        })?;
        let detector = self.annotators.acquire(pre.name, network)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue.push_annotation(annotate::AnnotateTask {
            detector,
            preprocessor: pre.name,
            image: checked.input(image),
            params: checked.values,
            reply,
            enqueued: Instant::now(),
        })?;
        answer.blocking_recv().unwrap_or(Err(EngineError::Stopped))
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        self.models
            .iter()
            .map(|name| ModelInfo { name: name.clone() })
            .collect()
    }

    /// Queues a job; never blocks. Unknown models and adapters are refused here, a full queue
    /// is `Overloaded` at once.
    pub fn submit(&self, job: Job) -> Result<JobHandle, EngineError> {
        let model = match &job.model {
            None => 0,
            Some(name) => self
                .models
                .iter()
                .position(|m| m == name)
                .ok_or_else(|| EngineError::UnknownModel(name.clone()))?,
        };
        // Taken now: a job keeps the adapters it was admitted with.
        let resolved = job
            .controls
            .iter()
            .map(|c| self.adapters.try_acquire(&c.adapter))
            .collect::<Result<Vec<_>, _>>()?;
        let position = self.queue.reserve(job.priority)?;
        let (events, rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let ticket = Ticket {
            events,
            cancel: cancel.clone(),
            priority: job.priority,
            deadline: job.deadline,
        };
        ticket.send(Event::Queued { position });
        let loading = Loading {
            job,
            model,
            resolved,
            ticket,
        };
        if loading.resolved.iter().all(Option::is_some) {
            queue_resolved(&self.queue, loading);
        } else {
            let loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
            match loader.as_ref().map(|l| l.send(loading)) {
                Some(Ok(())) => {}
                _ => {
                    self.queue.release();
                    return Err(EngineError::Stopped);
                }
            }
        }
        Ok(JobHandle { events: rx, cancel })
    }

    /// **Test-only** (no server setting reaches it): from now on, every device call the worker
    /// makes (see [`Stage`]) first asks `hook`, and when it says `true` the call fails with
    /// [`simulated_out_of_memory`] instead of running, so tests exercise the out-of-memory
    /// paths (classification, retry, failure) on the CPU. `None` removes the hook.
    pub fn inject_faults(&self, hook: Option<FaultHook>) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    /// Current queue, batch and cache figures.
    pub fn status(&self) -> Status {
        let s = &self.stats;
        Status {
            queued: self.queue.depth(),
            running_jobs: s.running_jobs.load(Ordering::SeqCst),
            running_images: s.running_images.load(Ordering::SeqCst),
            steps_run: s.steps_run.load(Ordering::SeqCst),
            last_batch_rows: s.last_batch_rows.load(Ordering::SeqCst),
            prompt_cache_hits: s.prompt_cache_hits.load(Ordering::SeqCst),
            prompt_cache_misses: s.prompt_cache_misses.load(Ordering::SeqCst),
            adapters: self.adapters.counters(),
            annotations_queued: self.queue.annotations(),
            annotators: self.annotators.counters(),
            oom_retries: s.oom_retries.load(Ordering::SeqCst),
            oom_failures: s.oom_failures.load(Ordering::SeqCst),
            batch_cap: s.batch_cap.load(Ordering::SeqCst),
        }
    }

    /// Stops taking jobs (submissions get `Stopped`); queued and running jobs still finish.
    pub fn close(&self) {
        self.queue.close();
        self.loader.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Whether [`Self::close`] was called (the server is draining: not ready).
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        let s = self.status();
        s.queued == 0 && s.running_jobs == 0 && s.annotations_queued == 0
    }

    /// Closes, then waits for the queued and running jobs to finish, up to `grace`. Whether
    /// everything finished.
    pub fn drain(&self, grace: Duration) -> bool {
        self.close();
        let until = Instant::now() + grace;
        while !self.is_idle() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Engine {
    /// Stops taking jobs, lets the worker finish the ones it has, and joins it.
    fn drop(&mut self) {
        self.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// The request with each named control's adapter in place.
fn resolved_request(job: Job, nets: Vec<Arc<diffusion::controlnet::ControlNetModel>>) -> Request {
    let mut request = job.request;
    let named = job
        .controls
        .into_iter()
        .zip(nets)
        .map(|(c, net)| ControlSpec {
            net,
            image: c.image,
            resize: c.resize,
            scale: c.scale,
            start: c.start,
            end: c.end,
            mode: c.mode,
            mask_hint: c.mask_hint,
        });
    let given = std::mem::take(&mut request.controls);
    request.controls = named.chain(given).collect();
    request
}

fn queue_resolved(queue: &queue::Queue, loading: Loading) {
    let nets = loading.resolved.into_iter().flatten().collect();
    queue.push(queue::Queued {
        request: resolved_request(loading.job, nets),
        model: loading.model,
        ticket: loading.ticket,
        enqueued: Instant::now(),
    });
}

/// How long a job waits for adapter memory held by other jobs before it fails.
const MEMORY_WAIT: Duration = Duration::from_secs(60);

/// On the loader thread: loads what a job needs, then queues it (or fails it).
fn load_then_queue(registry: &AdapterRegistry, queue: &queue::Queue, mut loading: Loading) {
    for (k, slot) in loading.resolved.iter_mut().enumerate() {
        if loading.ticket.gone() {
            queue.release();
            return;
        }
        if slot.is_some() {
            continue;
        }
        // A budget held by running jobs frees as they finish: wait for it (while the caller
        // is there and its deadline allows) rather than fail the job.
        let give_up = Instant::now() + MEMORY_WAIT;
        let name = &loading.job.controls[k].adapter;
        loop {
            match registry.acquire(name) {
                Ok(net) => {
                    *slot = Some(net);
                    break;
                }
                Err(EngineError::MemoryBudget(_))
                    if Instant::now() < give_up
                        && loading.ticket.stop_reason(Instant::now()).is_none() =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    loading.ticket.send(Event::Failed(e));
                    queue.release();
                    return;
                }
            }
        }
    }
    queue_resolved(queue, loading);
}
