//! The engine: one worker thread owns the device and the base model and runs the denoising
//! loop; callers submit requests and get a stream of events back.
//!
//! Jobs on the same latent size and prompt length share every UNet call
//! ([`diffusion::denoise::step_batch`]): new jobs join between steps, finished ones leave and
//! are decoded, cancelled ones (or ones whose caller has gone) are dropped at the next step
//! boundary. The worker never waits on a caller: events go out on unbounded channels, and the
//! queue in is bounded, so a full queue is an immediate [`EngineError::Overloaded`].
//!
//! Not yet here (the engine issue goes on): ControlNet adapter registry and hot swap, memory
//! budget, priorities, deadlines, prompt-embedding cache, `max_queue_delay`, batched VAE.
use diffusion::denoise::{self, DenoiseJob};
use diffusion::pipeline::{Request, StableDiffusion};
use image::RgbImage;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    /// The queue is full: try again later (HTTP 429).
    #[error("the queue is full ({0} jobs waiting)")]
    Overloaded(usize),
    /// The request cannot be run as given (HTTP 4xx).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The model failed on this job (HTTP 500); other jobs go on.
    #[error("generation failed: {0}")]
    Failed(String),
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Jobs waiting to start, beyond which submissions are refused.
    pub max_queue: usize,
    /// Jobs in the running batch (each may hold several images and CFG rows).
    pub max_batch: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch: 8,
        }
    }
}

/// What a caller hears about its job, in order.
#[derive(Debug)]
pub enum Event {
    /// Accepted; `position` jobs were waiting before it.
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
    Done {
        images: Vec<RgbImage>,
        seeds: Vec<u64>,
    },
    Failed(EngineError),
}

/// A submitted job: its events, and a way to cancel it (dropping the handle cancels too).
pub struct JobHandle {
    pub events: UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl JobHandle {
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

struct Submission {
    request: Request,
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

impl Submission {
    fn gone(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }
}

struct Running {
    job: DenoiseJob,
    seeds: Vec<u64>,
    events: UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

impl Running {
    fn gone(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }

    /// Jobs share a UNet call when their latents and prompt embeddings have the same shape.
    fn batch_key(&self) -> (Vec<usize>, usize) {
        let latent = self.job.latents.dims()[1..].to_vec();
        let tokens = self.job.embeddings.dims()[1];
        (latent, tokens)
    }
}

pub struct Engine {
    queue: Option<SyncSender<Submission>>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    config: EngineConfig,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the worker thread, which owns `model` from now on.
    pub fn start(model: StableDiffusion, config: EngineConfig) -> Self {
        let (tx, rx) = mpsc::sync_channel(config.max_queue.max(1));
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let worker_waiting = waiting.clone();
        let worker = std::thread::Builder::new()
            .name("device-worker".into())
            .spawn(move || Worker::new(model, rx, worker_waiting, config).run())
            .expect("spawning the device worker");
        Self {
            queue: Some(tx),
            waiting,
            config,
            worker: Some(worker),
        }
    }

    /// Queues a request; never blocks. A full queue is `Overloaded` at once.
    pub fn submit(&self, request: Request) -> Result<JobHandle, EngineError> {
        let queue = self.queue.as_ref().ok_or(EngineError::Stopped)?;
        let (events, rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let position = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _ = events.send(Event::Queued { position });
        let submission = Submission {
            request,
            events,
            cancel: cancel.clone(),
        };
        match queue.try_send(submission) {
            Ok(()) => Ok(JobHandle { events: rx, cancel }),
            Err(TrySendError::Full(_)) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(EngineError::Overloaded(self.config.max_queue))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(EngineError::Stopped)
            }
        }
    }
}

impl Drop for Engine {
    /// Stops taking jobs, lets the worker finish the ones it has, and joins it.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

struct Worker {
    model: StableDiffusion,
    queue: Receiver<Submission>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    config: EngineConfig,
    running: Vec<Running>,
}

impl Worker {
    fn new(
        model: StableDiffusion,
        queue: Receiver<Submission>,
        waiting: Arc<std::sync::atomic::AtomicUsize>,
        config: EngineConfig,
    ) -> Self {
        Self {
            model,
            queue,
            waiting,
            config,
            running: Vec::new(),
        }
    }

    /// Turns a submission into a running job (text encoding, initial latents).
    fn admit(&mut self, s: Submission) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        if s.gone() {
            return;
        }
        let seeds = (0..s.request.num_images as u64)
            .map(|k| s.request.seed.wrapping_add(k))
            .collect();
        match self.model.new_job(&s.request) {
            Ok(job) => {
                let _ = s.events.send(Event::Started);
                self.running.push(Running {
                    job,
                    seeds,
                    events: s.events,
                    cancel: s.cancel,
                });
            }
            Err(e) => {
                let _ = s
                    .events
                    .send(Event::Failed(EngineError::Invalid(e.to_string())));
            }
        }
    }

    fn run(mut self) {
        loop {
            // Take new jobs between steps; wait only when there is nothing to run.
            let mut disconnected = false;
            while self.running.len() < self.config.max_batch {
                let next = if self.running.is_empty() {
                    self.queue.recv().map_err(|_| TryRecvError::Disconnected)
                } else {
                    self.queue.try_recv()
                };
                match next {
                    Ok(s) => self.admit(s),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.running.retain(|r| !r.gone());
            if self.running.is_empty() {
                if disconnected {
                    return;
                }
                continue;
            }
            self.step();
        }
    }

    /// One step for the largest group of jobs that can share a UNet call (oldest first on
    /// ties), then decoding of the jobs that finished.
    fn step(&mut self) {
        let key = {
            let mut counts: Vec<((Vec<usize>, usize), usize)> = Vec::new();
            for r in &self.running {
                let k = r.batch_key();
                match counts.iter_mut().find(|(c, _)| *c == k) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((k, 1)),
                }
            }
            counts
                .into_iter()
                .fold(
                    None::<((Vec<usize>, usize), usize)>,
                    |best, (k, n)| match best {
                        Some((_, m)) if m >= n => best,
                        _ => Some((k, n)),
                    },
                )
                .map(|(k, _)| k)
                .expect("running is not empty")
        };
        let mut group: Vec<&mut Running> = self
            .running
            .iter_mut()
            .filter(|r| r.batch_key() == key)
            .collect();
        let mut jobs: Vec<&mut DenoiseJob> = group.iter_mut().map(|r| &mut r.job).collect();
        let result = denoise::step_batch(&self.model.unet, &mut jobs);
        match result {
            Ok(()) => {
                for r in group {
                    let total = r.job.n_steps() - r.job.start_step;
                    let step = r.job.step - r.job.start_step;
                    let _ = r.events.send(Event::Step { step, total });
                }
            }
            Err(e) => {
                // A failed batch fails its jobs, not the engine.
                for r in group {
                    let _ = r
                        .events
                        .send(Event::Failed(EngineError::Failed(e.to_string())));
                    r.cancel.store(true, Ordering::Relaxed);
                }
            }
        }
        let (done, running): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|r| r.job.is_done() && !r.gone());
        self.running = running;
        for r in done {
            let event = match self.model.decode(&r.job.latents) {
                Ok(images) => Event::Done {
                    images,
                    seeds: r.seeds,
                },
                Err(e) => Event::Failed(EngineError::Failed(e.to_string())),
            };
            let _ = r.events.send(event);
        }
    }
}
