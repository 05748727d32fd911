//! Annotators on the engine: the preprocessors that need a network run here, on the engine's
//! device, between denoising steps.
//!
//! - [`AnnotatorPool`] keeps the networks: loaded from the configured folder on first use (on
//!   the caller's blocking thread, never on the device worker), resident afterwards, and under
//!   a memory budget evicted least-recently-used — never one that a running annotation holds.
//!   One network serves several preprocessors (HED: `softedge_hed`, `softedge_hedsafe`,
//!   `scribble_hed`) and is loaded once for all of them.
//! - [`crate::Engine::annotate`] is the one entry point for every preprocessor, weight-free or
//!   not, used alike by `/v1/detect`, A1111's detect and a generate request's controls. It
//!   checks the request, runs a weight-free one on the calling thread (pure CPU), and hands a
//!   network one to the device worker, which runs at most one annotation between two denoising
//!   steps: a burst of detect requests cannot starve running generations, nor the other way
//!   round. It blocks: call it from a blocking thread.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use annotators::{AnnotatorError, Preprocessor};
use candle_core::{DType, Device};
use image::RgbImage;
use neural_annotators::{Detection, Detector, Network};

use crate::EngineError;

/// Where annotator networks come from and how much device memory they may hold.
#[derive(Clone, Debug)]
pub struct AnnotatorSettings {
    /// The folder holding the weight files by their usual names (`ControlNetHED.pth`, …).
    /// `None`: no network preprocessor is available.
    pub root: Option<PathBuf>,
    /// Bytes of annotator weights kept on the device; `None` = no limit.
    pub budget_bytes: Option<usize>,
    pub dtype: DType,
    pub device: Device,
}

/// Whether a preprocessor can run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Weight-free, or its network's file is in the folder.
    Ready,
    /// Its network's weight file is not in the folder (or no folder is configured).
    MissingWeights(Vec<String>),
    /// Listed, but its network is not implemented in this build.
    NotImplemented,
    /// Listed, deliberately not run by this server: why, and what to use instead.
    Unsupported(&'static str),
}

impl Availability {
    /// The weight files it lacks (empty unless [`Availability::MissingWeights`]).
    pub fn missing_weights(&self) -> Vec<String> {
        match self {
            Availability::MissingWeights(files) => files.clone(),
            _ => Vec::new(),
        }
    }
}

/// Load and eviction figures, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AnnotatorCounters {
    pub loads: u64,
    pub evictions: u64,
    pub resident: usize,
    pub resident_bytes: usize,
}

struct Resident {
    detector: Arc<dyn Detector>,
    bytes: usize,
    used: u64,
}

#[derive(Default)]
struct PoolState {
    resident: HashMap<Network, Resident>,
    tick: u64,
}

/// The resident annotator networks (see the module docs).
pub struct AnnotatorPool {
    settings: AnnotatorSettings,
    state: Mutex<PoolState>,
    /// One load at a time: two requests for a network that is not resident load it once.
    loading: Mutex<()>,
    loads: AtomicU64,
    evictions: AtomicU64,
}

impl AnnotatorPool {
    pub fn new(settings: AnnotatorSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(PoolState::default()),
            loading: Mutex::new(()),
            loads: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> &AnnotatorSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `pre` can run now, and if not which file it lacks.
    pub fn availability(&self, pre: &Preprocessor) -> Availability {
        if pre.model_free {
            return Availability::Ready;
        }
        if let Some(reason) = pre.unsupported {
            return Availability::Unsupported(reason);
        }
        let Some(network) = Network::for_preprocessor(pre.name) else {
            return Availability::NotImplemented;
        };
        let missing = network.missing_files(pre.name, self.settings.root.as_deref());
        if missing.is_empty() {
            Availability::Ready
        } else {
            Availability::MissingWeights(missing)
        }
    }

    /// The networks now resident, with their bytes.
    pub fn resident(&self) -> Vec<(Network, usize)> {
        let mut v: Vec<_> = self
            .lock()
            .resident
            .iter()
            .map(|(n, r)| (*n, r.bytes))
            .collect();
        v.sort();
        v
    }

    pub fn counters(&self) -> AnnotatorCounters {
        let state = self.lock();
        AnnotatorCounters {
            loads: self.loads.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            resident: state.resident.len(),
            resident_bytes: state.resident.values().map(|r| r.bytes).sum(),
        }
    }

    /// The resident network, if it serves `preprocessor`. One that does not (OpenPose loaded
    /// before its hand or face file was added) is dropped from the pool here, to be reloaded;
    /// annotations holding it finish with it.
    fn resident_hit(&self, network: Network, preprocessor: &str) -> Option<Arc<dyn Detector>> {
        let mut state = self.lock();
        state.tick += 1;
        let tick = state.tick;
        let serves = state.resident.get(&network)?.detector.serves(preprocessor);
        if !serves {
            state.resident.remove(&network);
            return None;
        }
        state.resident.get_mut(&network).map(|r| {
            r.used = tick;
            r.detector.clone()
        })
    }

    /// The network for `preprocessor`, loading it if it is not resident. The returned handle
    /// keeps it from eviction while held.
    pub fn acquire(
        &self,
        preprocessor: &str,
        network: Network,
    ) -> Result<Arc<dyn Detector>, EngineError> {
        if let Some(d) = self.resident_hit(network, preprocessor) {
            return Ok(d);
        }
        let _one_load = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = self.resident_hit(network, preprocessor) {
            return Ok(d);
        }
        let root = self.settings.root.as_deref();
        let missing = network.missing_files(preprocessor, root);
        if !missing.is_empty() {
            return Err(EngineError::Annotator(AnnotatorError::MissingWeights {
                preprocessor: preprocessor.to_string(),
                file: missing.join(", "),
                folder: root.map_or_else(
                    || "(no annotator folder configured: [annotators] root)".to_string(),
                    |r| r.display().to_string(),
                ),
            }));
        }
        let root = root.expect("no file is missing, so there is a folder");
        let path = network.find_file(root).map_err(|e| {
            EngineError::AnnotatorLoad(format!("annotator {}: {e}", network.name()))
        })?;
        let started = Instant::now();
        let (detector, bytes) =
            neural_annotators::load(network, &path, self.settings.dtype, &self.settings.device)
                .map_err(|e| {
                    EngineError::AnnotatorLoad(format!(
                        "annotator {} from {}: {e}",
                        network.name(),
                        path.display()
                    ))
                })?;
        let detector: Arc<dyn Detector> = Arc::from(detector);
        let mut state = self.lock();
        if let Some(budget) = self.settings.budget_bytes {
            let mut held: usize = state.resident.values().map(|r| r.bytes).sum();
            while held + bytes > budget {
                // Idle: nobody but the pool holds it.
                let victim = state
                    .resident
                    .iter()
                    .filter(|(_, r)| Arc::strong_count(&r.detector) == 1)
                    .min_by_key(|(_, r)| r.used)
                    .map(|(n, _)| *n);
                let Some(victim) = victim else {
                    return Err(EngineError::MemoryBudget(format!(
                        "annotator {} needs {bytes} bytes; the annotator budget of {budget} \
                         bytes is held by annotators in use",
                        network.name()
                    )));
                };
                let r = state.resident.remove(&victim).expect("listed");
                held -= r.bytes;
                self.evictions.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("engine_annotator_evictions_total", "network" => victim.name())
                    .increment(1);
            }
        }
        state.tick += 1;
        let used = state.tick;
        state.resident.insert(
            network,
            Resident {
                detector: detector.clone(),
                bytes,
                used,
            },
        );
        self.loads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("engine_annotator_loads_total", "network" => network.name()).increment(1);
        metrics::histogram!("engine_annotator_load_seconds", "network" => network.name())
            .record(started.elapsed().as_secs_f64());
        Ok(detector)
    }
}

/// A network annotation waiting for the device worker.
pub(crate) struct AnnotateTask {
    pub detector: Arc<dyn Detector>,
    pub preprocessor: &'static str,
    /// At its detect size.
    pub image: RgbImage,
    pub params: Vec<f64>,
    pub reply: tokio::sync::oneshot::Sender<Result<Detection, EngineError>>,
    pub enqueued: Instant,
}

impl AnnotateTask {
    /// On the device worker: runs the network (a panic fails this annotation alone), unless
    /// its caller has gone.
    pub fn run(self) {
        if self.reply.is_closed() {
            return;
        }
        metrics::histogram!("engine_annotate_queue_seconds")
            .record(self.enqueued.elapsed().as_secs_f64());
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.detector
                .detect_keypoints(self.preprocessor, &self.image, &self.params)
        }));
        let result = match result {
            Ok(Ok(hint)) => Ok(hint),
            // One image, nothing smaller to retry: a 503 rather than a 500 (see the worker).
            Ok(Err(e)) if crate::is_out_of_memory(&e) => Err(EngineError::OutOfMemory(format!(
                "running the {} preprocessor",
                self.preprocessor
            ))),
            Ok(Err(e)) => Err(EngineError::Failed(format!("{}: {e}", self.preprocessor))),
            Err(p) => Err(EngineError::Failed(format!(
                "{}: internal error: {}",
                self.preprocessor,
                crate::worker::panic_message(p)
            ))),
        };
        metrics::histogram!("engine_annotate_seconds", "preprocessor" => self.preprocessor)
            .record(started.elapsed().as_secs_f64());
        let _ = self.reply.send(result);
    }
}

/// Why a pose cannot be drawn.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoseError {
    /// The module asked to draw it is not an OpenPose one (nor `none`).
    #[error("a pose is drawn by an OpenPose preprocessor or none, not `{0}`")]
    Module(String),
    /// The JSON: `path` is the offending field inside it (`people[0].pose_keypoints_2d`;
    /// empty for the whole value).
    #[error("{reason}")]
    Json { path: String, reason: String },
}

/// Draws `pose` (OpenPose JSON: what `/v1/detect` returns for the OpenPose preprocessors, or a
/// pose editor writes) as a hint at its canvas size, with the standard skeleton. `module`
/// chooses the parts drawn as the OpenPose preprocessors do (`openpose`: body;
/// `openpose_hand`: body and hands; `openpose_face`: body and face; `openpose_faceonly`: face;
/// `openpose_full`, `none` or absent: all). A canvas over `max_pixels` is refused. Pure CPU.
pub fn draw_pose(
    pose: &serde_json::Value,
    module: Option<&str>,
    max_pixels: u64,
) -> Result<RgbImage, PoseError> {
    use neural_annotators::openpose::{draw, module_parts, pose_json};
    let (draw_hands, draw_face, draw_body) = match module {
        None | Some("none") => (true, true, true),
        Some(m) => module_parts(m).ok_or_else(|| PoseError::Module(m.to_string()))?,
    };
    let (poses, width, height) = pose_json::decode(pose).map_err(|e| PoseError::Json {
        path: e.path.clone(),
        reason: e.to_string(),
    })?;
    if width as u64 * height as u64 > max_pixels {
        return Err(PoseError::Json {
            path: "canvas_width".into(),
            reason: format!("a {width}×{height} canvas is over the limit of {max_pixels} pixels"),
        });
    }
    Ok(draw::draw_poses(
        &poses, height, width, draw_body, draw_hands, draw_face,
    ))
}
