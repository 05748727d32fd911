//! The device worker: owns the base models, admits jobs between steps, steps every group of
//! jobs that can share a UNet call, and decodes finished jobs together.
//!
//! Failures stay with the jobs they belong to:
//! - A batched call (UNet step, VAE decode) that fails changed no job (diffusion's
//!   [`denoise::step_batch_each`] contract for the shared part; a decode only reads latents),
//!   so it can be rerun on part of the batch.
//! - Out of device memory (see [`crate::is_out_of_memory`]) means the batch was too big, not
//!   that a job is bad: the call is rerun in chunks of at most half its images, recursively,
//!   and only a job that runs out of memory alone fails ([`EngineError::OutOfMemory`]). A
//!   decode splits down to single images.
//! - After an out-of-memory step the worker caps its UNet batches (and admission) at half the
//!   images of the batch that failed, and grows the cap back by one image after every
//!   [`REGROW_AFTER`] successful calls made at the cap (additive increase, multiplicative
//!   decrease, as TCP does for its window): memory pressure comes and goes with image sizes,
//!   ControlNets and other users of the device, so the cap probes its way back up instead of
//!   staying low forever, and a persistent limit costs one failed call per probe.
//! - Any other failure of a shared call is retried job by job to find the culprit, which
//!   fails alone ([`EngineError::Failed`]).
//! - A job whose own part failed (its guidance or scheduler step) is in an unspecified state
//!   and fails, whatever the error.
use candle_core::Tensor;
use diffusion::denoise::{self, DenoiseJob};
use diffusion::pipeline::StableDiffusion;
use diffusion::prompt_syntax::PromptSyntax;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::queue::{Queue, Queued, Take};
use crate::{
    is_out_of_memory, simulated_out_of_memory, EngineConfig, EngineError, Event, FaultHook, Stage,
    Stats, StepInfo, Ticket,
};

/// Successful UNet calls at the lowered batch cap before it grows by one image.
pub(crate) const REGROW_AFTER: usize = 25;

struct Running {
    job: DenoiseJob,
    model: usize,
    seeds: Vec<u64>,
    ticket: Ticket,
    /// Set when the job failed; it leaves at the end of the step.
    failed: bool,
}

impl Running {
    /// Jobs share a UNet call when they are on the same base model and their latents and
    /// prompt embeddings have the same shape.
    fn batch_key(&self) -> (usize, Vec<usize>, usize) {
        let latent = self.job.latents.dims()[1..].to_vec();
        let tokens = self.job.embeddings.dims()[1];
        (self.model, latent, tokens)
    }

    fn fail(&mut self, e: EngineError) {
        self.ticket.send(Event::Failed(e));
        self.failed = true;
    }
}

/// Prompt embeddings by (model, prompt, negative prompt, clip skip, guided, prompt syntax),
/// least recently used out first.
struct PromptCache {
    capacity: usize,
    tick: u64,
    entries: HashMap<PromptKey, (Tensor, u64)>,
}

type PromptKey = (usize, String, String, usize, bool, PromptSyntax);

impl PromptCache {
    fn get_or_insert(
        &mut self,
        key: PromptKey,
        stats: &Stats,
        make: impl FnOnce() -> diffusion::Result<Tensor>,
    ) -> diffusion::Result<Tensor> {
        self.tick += 1;
        if let Some((t, used)) = self.entries.get_mut(&key) {
            *used = self.tick;
            stats.prompt_cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(t.clone());
        }
        stats.prompt_cache_misses.fetch_add(1, Ordering::Relaxed);
        let t = make()?;
        if self.capacity == 0 {
            return Ok(t);
        }
        if self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(key, (t.clone(), self.tick));
        Ok(t)
    }
}

pub(crate) struct Worker {
    models: Vec<StableDiffusion>,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
    config: EngineConfig,
    running: Vec<Running>,
    prompts: PromptCache,
    cap: BatchCap,
    faults: Arc<Mutex<Option<FaultHook>>>,
}

/// A panic's message, for the job's error.
pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

impl Worker {
    pub fn new(
        models: Vec<StableDiffusion>,
        queue: Arc<Queue>,
        stats: Arc<Stats>,
        faults: Arc<Mutex<Option<FaultHook>>>,
        config: EngineConfig,
    ) -> Self {
        let cap = BatchCap::new(config.max_batch);
        cap.publish(&stats);
        Self {
            models,
            queue,
            stats,
            config,
            running: Vec::new(),
            prompts: PromptCache {
                capacity: config.prompt_cache,
                tick: 0,
                entries: HashMap::new(),
            },
            cap,
            faults,
        }
    }

    /// The fault-injection hook now (tests only; `None` in service).
    fn fault_hook(&self) -> Option<FaultHook> {
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn run(mut self) {
        loop {
            self.queue.sweep();
            let images: usize = self.running.iter().map(|r| r.job.n_images()).sum();
            // After an out-of-memory step, admit no more than the worker will batch.
            let room = self.cap.cap.saturating_sub(images);
            let idle = self.running.is_empty();
            let delay = if idle {
                self.config.max_queue_delay
            } else {
                std::time::Duration::ZERO
            };
            match self.queue.take(room, idle, delay) {
                Take::Closed => return,
                Take::Work(jobs, annotation) => {
                    for j in jobs {
                        self.admit(j);
                    }
                    if let Some(task) = annotation {
                        task.run();
                    }
                }
            }
            self.drop_stopped();
            self.publish();
            if self.running.is_empty() {
                continue;
            }
            self.step_groups();
            self.finish();
            self.publish();
        }
    }

    fn publish(&self) {
        let images: usize = self.running.iter().map(|r| r.job.n_images()).sum();
        self.stats
            .running_jobs
            .store(self.running.len(), Ordering::SeqCst);
        self.stats.running_images.store(images, Ordering::SeqCst);
    }

    /// Turns a queued job into a running one (prompt embeddings, initial latents).
    fn admit(&mut self, q: Queued) {
        if let Some(reason) = q.ticket.stop_reason(Instant::now()) {
            q.ticket.send(Event::Failed(reason));
            return;
        }
        metrics::histogram!("engine_queue_seconds").record(q.enqueued.elapsed().as_secs_f64());
        let fault = self.fault_hook();
        let model = &self.models[q.model];
        let req = &q.request;
        let guided = req.guidance_scale > 1.0;
        let key = (
            q.model,
            req.prompt.clone(),
            req.negative_prompt.clone(),
            req.clip_skip,
            guided,
            req.prompt_syntax,
        );
        let prompts = &mut self.prompts;
        let stats = &self.stats;
        let info = StepInfo {
            stage: Stage::Encode,
            jobs: 1,
            images: req.num_images,
            seeds: vec![req.seed],
        };
        let made = catch_unwind(AssertUnwindSafe(|| {
            if fault.is_some_and(|f| f(&info)) {
                return Err(simulated_out_of_memory().into());
            }
            let embeddings = prompts.get_or_insert(key, stats, || {
                model.prompt_embeddings_in(
                    req.prompt_syntax,
                    &req.prompt,
                    &req.negative_prompt,
                    req.clip_skip,
                    guided,
                )
            })?;
            model.new_job_with_embeddings(req, &embeddings)
        }));
        match made {
            Ok(Ok(job)) => {
                q.ticket.send(Event::Started);
                let seeds = (0..req.num_images as u64)
                    .map(|k| req.seed.wrapping_add(k))
                    .collect();
                self.running.push(Running {
                    job,
                    model: q.model,
                    seeds,
                    ticket: q.ticket,
                    failed: false,
                });
            }
            // One job, not a batch: nothing smaller to retry.
            Ok(Err(e)) if is_out_of_memory(&e) => {
                count_oom_failure(&self.stats, Stage::Encode);
                q.ticket.send(Event::Failed(EngineError::OutOfMemory(
                    "encoding the prompt and preparing the control images".into(),
                )))
            }
            Ok(Err(e)) => q
                .ticket
                .send(Event::Failed(EngineError::Invalid(e.to_string()))),
            Err(p) => {
                let failure = Failure::panicked(p);
                if failure.oom {
                    count_oom_failure(&self.stats, Stage::Encode);
                }
                q.ticket
                    .send(Event::Failed(failure.into_error(Stage::Encode)))
            }
        }
    }

    /// Drops cancelled jobs, jobs whose caller has gone, and jobs past their deadline.
    fn drop_stopped(&mut self) {
        let now = Instant::now();
        self.running.retain(|r| match r.ticket.stop_reason(now) {
            None => true,
            Some(reason) => {
                r.ticket.send(Event::Failed(reason));
                false
            }
        });
    }

    /// One step for every group of jobs that can share a UNet call, in order of arrival; a
    /// group bigger than the batch cap runs in chunks.
    fn step_groups(&mut self) {
        let mut keys: Vec<(usize, Vec<usize>, usize)> = Vec::new();
        for r in &self.running {
            let k = r.batch_key();
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let fault = self.fault_hook();
        for key in keys {
            let group: Vec<&mut Running> = self
                .running
                .iter_mut()
                .filter(|r| r.batch_key() == key)
                .collect();
            let mut stepper = Stepper {
                unet: &self.models[key.0].unet,
                stats: &self.stats,
                cap: &mut self.cap,
                fault: fault.as_ref(),
            };
            stepper.step_chunked(group);
        }
        self.cap.publish(&self.stats);
    }

    /// Removes failed and finished jobs; decodes the finished ones, a batch per model and size.
    fn finish(&mut self) {
        let (done, running): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.running)
            .into_iter()
            .filter(|r| !r.failed)
            .partition(|r| r.job.is_done());
        self.running = running;
        let mut groups: Vec<Vec<Running>> = Vec::new();
        for r in done {
            match groups.iter_mut().find(|g| {
                g[0].model == r.model && g[0].job.latents.dims()[1..] == r.job.latents.dims()[1..]
            }) {
                Some(g) => g.push(r),
                None => groups.push(vec![r]),
            }
        }
        let fault = self.fault_hook();
        for group in groups {
            let decoder = Decoder {
                model: &self.models[group[0].model],
                stats: &self.stats,
                fault: fault.as_ref(),
            };
            let started = Instant::now();
            if group.len() == 1 {
                let r = group.into_iter().next().expect("one job");
                let images = decoder.decode_split(&r.job.latents, &r.seeds[..1]);
                metrics::histogram!("engine_decode_seconds")
                    .record(started.elapsed().as_secs_f64());
                done_event(r, images);
                continue;
            }
            let seeds: Vec<u64> = group.iter().map(|r| r.seeds[0]).collect();
            let decoded = decoder.try_decode(
                || {
                    let latents: Vec<&Tensor> = group.iter().map(|r| &r.job.latents).collect();
                    Tensor::cat(&latents, 0)
                },
                &seeds,
            );
            match decoded {
                Ok(mut images) => {
                    for r in group {
                        let rest = images.split_off(r.job.n_images());
                        let mine = std::mem::replace(&mut images, rest);
                        done_event(r, Ok(mine));
                    }
                }
                // Decode each alone (in halves if it runs out of memory itself), so only the
                // job that fails, fails.
                Err(failure) => {
                    if failure.oom {
                        count_oom_retry(&self.stats, Stage::Decode);
                    }
                    for r in group {
                        let images = decoder.decode_split(&r.job.latents, &r.seeds[..1]);
                        done_event(r, images);
                    }
                }
            }
            metrics::histogram!("engine_decode_seconds").record(started.elapsed().as_secs_f64());
        }
    }
}

/// Why a device call failed: its message, and whether the device ran out of memory.
struct Failure {
    message: String,
    oom: bool,
}

impl Failure {
    fn error(e: &dyn std::fmt::Display) -> Self {
        Self {
            message: e.to_string(),
            oom: is_out_of_memory(e),
        }
    }

    /// A panic (candle panics on some device errors): classified by its message too.
    fn panicked(p: Box<dyn std::any::Any + Send>) -> Self {
        let message = format!("internal error: {}", panic_message(p));
        Self {
            oom: is_out_of_memory(&message),
            message,
        }
    }

    fn into_error(self, stage: Stage) -> EngineError {
        if self.oom {
            EngineError::OutOfMemory(
                match stage {
                    Stage::Encode => "encoding the prompt and preparing the control images",
                    Stage::Denoise => "denoising",
                    Stage::Decode => "decoding the images",
                }
                .into(),
            )
        } else {
            EngineError::Failed(self.message)
        }
    }
}

fn stage_label(stage: Stage) -> &'static str {
    match stage {
        Stage::Encode => "encode",
        Stage::Denoise => "denoise",
        Stage::Decode => "decode",
    }
}

fn count_oom_retry(stats: &Stats, stage: Stage) {
    stats.oom_retries.fetch_add(1, Ordering::SeqCst);
    metrics::counter!("engine_oom_retries_total", "stage" => stage_label(stage)).increment(1);
}

fn count_oom_failure(stats: &Stats, stage: Stage) {
    stats.oom_failures.fetch_add(1, Ordering::SeqCst);
    metrics::counter!("engine_oom_failures_total", "stage" => stage_label(stage)).increment(1);
}

/// Fails a job with `failure`, counting it when it is out of memory.
fn fail_job(stats: &Stats, r: &mut Running, failure: Failure, stage: Stage) {
    if failure.oom {
        count_oom_failure(stats, stage);
    }
    r.fail(failure.into_error(stage));
}

/// The images the worker puts in one UNet call, learnt from out-of-memory errors.
struct BatchCap {
    /// `max_batch` until a step runs out of memory; never below 1.
    cap: usize,
    max: usize,
    /// Successful calls at the cap since it last changed.
    at_cap: usize,
}

impl BatchCap {
    fn new(max_batch: usize) -> Self {
        Self {
            cap: max_batch.max(1),
            max: max_batch.max(1),
            at_cap: 0,
        }
    }

    /// A call of `images` ran out of memory: batch at most half of that from now on.
    fn lower(&mut self, images: usize) {
        self.cap = self.cap.min((images / 2).max(1));
        self.at_cap = 0;
    }

    /// A call of `images` succeeded. Only calls at the cap say the cap is safe: a light load
    /// that never fills it proves nothing about one image more.
    fn succeeded(&mut self, images: usize) {
        if self.cap >= self.max || images < self.cap {
            return;
        }
        self.at_cap += 1;
        if self.at_cap >= REGROW_AFTER {
            self.cap += 1;
            self.at_cap = 0;
        }
    }

    fn publish(&self, stats: &Stats) {
        stats.batch_cap.store(self.cap, Ordering::SeqCst);
        metrics::gauge!("engine_batch_cap").set(self.cap as f64);
    }
}

/// Steps jobs that share a UNet call, splitting the batch on failure.
struct Stepper<'a> {
    unet: &'a diffusion::UNet2DConditionModel,
    stats: &'a Stats,
    cap: &'a mut BatchCap,
    fault: Option<&'a FaultHook>,
}

fn images_of(jobs: &[&mut Running]) -> usize {
    jobs.iter().map(|r| r.job.n_images()).sum()
}

impl Stepper<'_> {
    /// Steps `jobs` in chunks of at most the cap's images, in order (a job bigger than the
    /// cap is a chunk of its own).
    fn step_chunked(&mut self, jobs: Vec<&mut Running>) {
        let mut chunk: Vec<&mut Running> = Vec::new();
        let mut images = 0;
        for r in jobs {
            let n = r.job.n_images();
            if !chunk.is_empty() && images + n > self.cap.cap {
                self.step(std::mem::take(&mut chunk));
                images = 0;
            }
            images += n;
            chunk.push(r);
        }
        if !chunk.is_empty() {
            self.step(chunk);
        }
    }

    /// One UNet call for `jobs`; on failure of the shared part (no job changed), reruns them
    /// smaller: in chunks under a lowered cap when out of memory, one by one otherwise.
    fn step(&mut self, mut jobs: Vec<&mut Running>) {
        let images = images_of(&jobs);
        let rows: usize = jobs.iter().map(|r| r.job.n_rows()).sum();
        let info = StepInfo {
            stage: Stage::Denoise,
            jobs: jobs.len(),
            images,
            seeds: jobs.iter().map(|r| r.seeds[0]).collect(),
        };
        let shared = if self.fault.is_some_and(|f| f(&info)) {
            Err(Failure::error(&simulated_out_of_memory()))
        } else {
            let started = Instant::now();
            let result = {
                let mut djobs: Vec<&mut DenoiseJob> = jobs.iter_mut().map(|r| &mut r.job).collect();
                let unet = self.unet;
                catch_unwind(AssertUnwindSafe(|| {
                    denoise::step_batch_each(unet, &mut djobs)
                }))
            };
            self.stats.steps_run.fetch_add(1, Ordering::SeqCst);
            self.stats.last_batch_rows.store(rows, Ordering::SeqCst);
            metrics::histogram!("engine_step_seconds").record(started.elapsed().as_secs_f64());
            metrics::histogram!("engine_batch_rows").record(rows as f64);
            match result {
                Ok(Ok(outcomes)) => Ok(outcomes),
                Ok(Err(e)) => Err(Failure::error(&e)),
                Err(p) => Err(Failure::panicked(p)),
            }
        };
        match shared {
            Ok(outcomes) => {
                self.cap.succeeded(images);
                for (r, outcome) in jobs.into_iter().zip(outcomes) {
                    match outcome {
                        Ok(()) => report_step(r),
                        // The job's own part failed: its state is unspecified, it cannot rerun.
                        Err(e) => fail_job(self.stats, r, Failure::error(&e), Stage::Denoise),
                    }
                }
            }
            Err(failure) if jobs.len() == 1 => {
                let r = jobs.pop().expect("one job");
                fail_job(self.stats, r, failure, Stage::Denoise);
            }
            // Too big a batch: rerun it in smaller chunks, and form smaller ones for a while.
            Err(failure) if failure.oom => {
                count_oom_retry(self.stats, Stage::Denoise);
                self.cap.lower(images);
                self.step_chunked(jobs);
            }
            // Find the culprit by running each job alone, so one bad job does not take the
            // others down.
            Err(_) => {
                for r in jobs {
                    self.step(vec![r]);
                }
            }
        }
    }
}

/// Decodes finished jobs' latents on one base model, splitting on out-of-memory.
struct Decoder<'a> {
    model: &'a diffusion::pipeline::StableDiffusion,
    stats: &'a Stats,
    fault: Option<&'a FaultHook>,
}

impl Decoder<'_> {
    /// One VAE call on the latents `latents` makes; `seeds` are its jobs' first seeds.
    fn try_decode(
        &self,
        latents: impl FnOnce() -> candle_core::Result<Tensor>,
        seeds: &[u64],
    ) -> Result<Vec<image::RgbImage>, Failure> {
        let decoded = catch_unwind(AssertUnwindSafe(|| {
            let latents = latents()?;
            let info = StepInfo {
                stage: Stage::Decode,
                jobs: seeds.len(),
                images: latents.dims()[0],
                seeds: seeds.to_vec(),
            };
            if self.fault.is_some_and(|f| f(&info)) {
                return Err(simulated_out_of_memory().into());
            }
            self.model.decode(&latents)
        }));
        match decoded {
            Ok(Ok(images)) => Ok(images),
            Ok(Err(e)) => Err(Failure::error(&e)),
            Err(p) => Err(Failure::panicked(p)),
        }
    }

    /// One job's images (`latents` `[n, 4, h, w]`; `seed`: the job's first seed): in one call,
    /// or in halves, down to single images, while the device runs out of memory.
    fn decode_split(
        &self,
        latents: &Tensor,
        seed: &[u64],
    ) -> Result<Vec<image::RgbImage>, EngineError> {
        match self.try_decode(|| Ok(latents.clone()), seed) {
            Ok(images) => Ok(images),
            Err(failure) => {
                let n = latents.dims()[0];
                if !failure.oom || n < 2 {
                    if failure.oom {
                        count_oom_failure(self.stats, Stage::Decode);
                    }
                    return Err(failure.into_error(Stage::Decode));
                }
                count_oom_retry(self.stats, Stage::Decode);
                let half = n / 2;
                let halves = latents
                    .narrow(0, 0, half)
                    .and_then(|a| Ok((a, latents.narrow(0, half, n - half)?)))
                    .map_err(|e| EngineError::Failed(e.to_string()))?;
                let mut images = self.decode_split(&halves.0, seed)?;
                images.extend(self.decode_split(&halves.1, seed)?);
                Ok(images)
            }
        }
    }
}

fn report_step(r: &mut Running) {
    let total = r.job.n_steps() - r.job.start_step;
    let step = r.job.step - r.job.start_step;
    r.ticket.send(Event::Step { step, total });
}

fn done_event(r: Running, images: Result<Vec<image::RgbImage>, EngineError>) {
    let event = match images {
        Ok(images) => Event::Done {
            images,
            seeds: r.seeds,
            latents: r.job.latents,
        },
        Err(e) => Event::Failed(e),
    };
    r.ticket.send(event);
}
