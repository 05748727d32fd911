//! ControlNet adapters by name: loaded, replaced and unloaded while traffic flows.
//!
//! A job takes an `Arc` of each adapter it names when it is admitted and keeps it until it
//! finishes, so replacing or unloading a name never changes or frees weights under a running
//! job: the old weights live on until their last job lets go. Loading runs on the caller's
//! thread (the server's blocking pool, or the engine's loader thread), never on the device
//! worker, so the denoising loop goes on while gigabytes are read.
//!
//! Files may come only from the configured roots: a relative path is looked up in each root, an
//! absolute one must lie inside one, and both are checked after symlinks and `..` are resolved.
//! `embedded:N` names a generated ControlNet for the embedded model (no file).
//!
//! A memory budget counts every adapter's weights still held: the resident ones and the
//! replaced or unloaded ones that jobs still use. An adapter counts the bytes its weights take
//! on the device: the sum over its tensors of elements × the size of the dtype they are loaded
//! as (f16/bf16 2, f32 4), whatever the file stores ([`ControlNetModel::size_in_bytes`], which
//! counts each tensor as the model takes it from its weight source), so the same adapter
//! loaded as f32 counts twice its f16 size. Above it, idle resident adapters are evicted,
//! least recently used first; an adapter in use is never evicted. An evicted adapter stays
//! registered and is loaded again the next time a job names it.
use candle_core::{DType, Device};
use diffusion::controlnet::ControlNetModel;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::EngineError;

/// Where adapters may come from, and how much of the device they may hold.
#[derive(Debug, Clone)]
pub struct AdapterSettings {
    /// Folders adapters may be loaded from (nothing outside them).
    pub roots: Vec<PathBuf>,
    /// Bytes of adapter weights to keep on the device; `None` = no limit.
    pub budget_bytes: Option<u64>,
    pub dtype: DType,
    pub device: Device,
}

/// Where an adapter's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterSource {
    /// A ControlNet file or diffusers folder inside a root (canonical path).
    File(PathBuf),
    /// A generated ControlNet for the embedded model.
    Embedded(u64),
}

impl std::fmt::Display for AdapterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdapterSource::File(p) => write!(f, "{}", p.display()),
            AdapterSource::Embedded(seed) => write!(f, "embedded:{seed}"),
        }
    }
}

/// What the registry says about one adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    pub source: String,
    /// Loaded on the device now (else loaded again on next use).
    pub resident: bool,
    /// Bytes of weights, when resident or once loaded.
    pub bytes: Option<usize>,
    /// Jobs holding it now (queued or running).
    pub in_use: usize,
    /// Bumped each time the name is pointed at new weights.
    pub generation: u64,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdapterCounters {
    pub loads: u64,
    pub evictions: u64,
    /// Bytes held: resident adapters plus replaced/unloaded ones still in use.
    pub bytes_held: u64,
}

struct Resident {
    net: Arc<ControlNetModel>,
    bytes: usize,
    last_used: u64,
}

struct Slot {
    source: AdapterSource,
    resident: Option<Resident>,
    last_bytes: Option<usize>,
    generation: u64,
}

/// Weights no longer under a name but still held by jobs: they count against the budget.
struct Retired {
    net: Weak<ControlNetModel>,
    bytes: usize,
}

#[derive(Default)]
struct State {
    slots: BTreeMap<String, Slot>,
    retired: Vec<Retired>,
    tick: u64,
    generation: u64,
    loads: u64,
    evictions: u64,
}

impl State {
    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn bytes_held(&mut self) -> u64 {
        self.retired.retain(|r| r.net.strong_count() > 0);
        let retired: usize = self.retired.iter().map(|r| r.bytes).sum();
        let resident: usize = self
            .slots
            .values()
            .filter_map(|s| s.resident.as_ref().map(|r| r.bytes))
            .sum();
        (retired + resident) as u64
    }

    /// Moves a resident adapter out of its slot: kept in the accounting while jobs hold it.
    fn retire(&mut self, resident: Resident) {
        if Arc::strong_count(&resident.net) > 1 {
            self.retired.push(Retired {
                net: Arc::downgrade(&resident.net),
                bytes: resident.bytes,
            });
        }
    }

    /// Evicts idle resident adapters (least recently used first, never `keep`) until `extra`
    /// more bytes fit in `budget`. Whether they now fit.
    fn make_room(&mut self, budget: Option<u64>, extra: usize, keep: &str) -> bool {
        let Some(budget) = budget else { return true };
        while self.bytes_held() + extra as u64 > budget {
            let victim = self
                .slots
                .iter()
                .filter(|(name, _)| name.as_str() != keep)
                .filter_map(|(name, s)| s.resident.as_ref().map(|r| (name, r)))
                .filter(|(_, r)| Arc::strong_count(&r.net) == 1)
                .min_by_key(|(_, r)| r.last_used)
                .map(|(name, _)| name.clone());
            match victim {
                Some(name) => {
                    let slot = self.slots.get_mut(&name).expect("victim exists");
                    slot.resident = None;
                    self.evictions += 1;
                    metrics::counter!("adapter_evictions_total").increment(1);
                }
                None => return false,
            }
        }
        true
    }
}

pub struct AdapterRegistry {
    settings: AdapterSettings,
    /// Canonical roots.
    roots: Vec<PathBuf>,
    state: Mutex<State>,
}

/// Adapter names: what may follow `/v1/adapters/` and sit in a config file.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.')
}

impl AdapterRegistry {
    /// A registry over `settings.roots` (roots that do not exist are an error: a typo in a
    /// config should stop the start, not hide every adapter).
    pub fn new(settings: AdapterSettings) -> Result<Self, EngineError> {
        let roots = settings
            .roots
            .iter()
            .map(|r| {
                std::fs::canonicalize(r)
                    .map_err(|e| EngineError::Invalid(format!("adapter root {}: {e}", r.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            settings,
            roots,
            state: Mutex::new(State::default()),
        })
    }

    pub fn settings(&self) -> &AdapterSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (every change is one
        // assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves a user's path (relative to a root, or absolute inside one) or `embedded:N`.
    pub fn resolve(&self, path: &str) -> Result<AdapterSource, EngineError> {
        if let Some(seed) = path.strip_prefix("embedded:") {
            return seed
                .parse()
                .map(AdapterSource::Embedded)
                .map_err(|_| EngineError::Invalid(format!("`{path}`: embedded:N needs a number")));
        }
        let given = Path::new(path);
        let candidates: Vec<PathBuf> = if given.is_absolute() {
            vec![given.to_path_buf()]
        } else {
            self.roots.iter().map(|r| r.join(given)).collect()
        };
        for candidate in candidates {
            let Ok(real) = std::fs::canonicalize(&candidate) else {
                continue;
            };
            if self.roots.iter().any(|r| real.starts_with(r)) {
                return Ok(AdapterSource::File(real));
            }
            return Err(EngineError::Forbidden(format!(
                "`{path}` is outside the adapter roots"
            )));
        }
        Err(EngineError::NotFound(format!(
            "`{path}`: no such file in the adapter roots ({})",
            self.roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    fn load(&self, name: &str, source: &AdapterSource) -> Result<ControlNetModel, EngineError> {
        let (dtype, device) = (self.settings.dtype, &self.settings.device);
        let net = match source {
            AdapterSource::Embedded(seed) => diffusion::embedded::controlnet(*seed, dtype, device),
            AdapterSource::File(path) => ControlNetModel::load(path, None, dtype, device),
        };
        net.map_err(|e| EngineError::AdapterLoad(format!("adapter `{name}`: {e}")))
    }

    fn over_budget(&self, state: &mut State, name: &str, bytes: usize) -> EngineError {
        let held = state.bytes_held();
        EngineError::MemoryBudget(format!(
            "adapter `{name}` needs {bytes} bytes; {held} of the {} byte budget are held by \
             adapters in use",
            self.settings.budget_bytes.unwrap_or(0)
        ))
    }

    /// Puts `net` under `name` (replacing whatever was there) if it fits the budget.
    fn insert(
        &self,
        state: &mut State,
        name: &str,
        source: AdapterSource,
        net: Arc<ControlNetModel>,
    ) -> Result<(), EngineError> {
        // Real bytes by dtype (see the module header), not a parameter count.
        let bytes = net.size_in_bytes();
        // The weights this name held leave the count unless jobs still hold them.
        let previous = state.slots.get_mut(name).and_then(|s| s.resident.take());
        let previous_held = previous
            .as_ref()
            .filter(|p| Arc::strong_count(&p.net) > 1)
            .map_or(0, |p| p.bytes);
        if !state.make_room(self.settings.budget_bytes, bytes + previous_held, name) {
            if let (Some(previous), Some(slot)) = (previous, state.slots.get_mut(name)) {
                slot.resident = Some(previous);
            }
            return Err(self.over_budget(state, name, bytes));
        }
        if let Some(previous) = previous {
            state.retire(previous);
        }
        state.generation += 1;
        let generation = state.generation;
        let last_used = state.touch();
        state.loads += 1;
        metrics::counter!("adapter_loads_total").increment(1);
        state.slots.insert(
            name.to_string(),
            Slot {
                source,
                resident: Some(Resident {
                    net,
                    bytes,
                    last_used,
                }),
                last_bytes: Some(bytes),
                generation,
            },
        );
        Ok(())
    }

    /// Loads `path` (see [`Self::resolve`]) and points `name` at it, atomically: jobs admitted
    /// before keep the old weights, jobs admitted after get the new. Blocks while loading; call
    /// it off async threads.
    pub fn put(&self, name: &str, path: &str) -> Result<AdapterInfo, EngineError> {
        if !valid_name(name) {
            return Err(EngineError::Invalid(format!(
                "adapter name `{name}`: use 1-128 letters, digits, '.', '_' or '-'"
            )));
        }
        let source = self.resolve(path)?;
        let net = Arc::new(self.load(name, &source)?);
        let mut state = self.lock();
        self.insert(&mut state, name, source, net)?;
        Ok(self.info(&mut state, name).expect("just inserted"))
    }

    /// Forgets `name`. Jobs holding it finish with it; new jobs cannot name it.
    pub fn remove(&self, name: &str) -> Result<(), EngineError> {
        let mut state = self.lock();
        let slot = state
            .slots
            .remove(name)
            .ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))?;
        if let Some(resident) = slot.resident {
            state.retire(resident);
        }
        Ok(())
    }

    /// The adapter under `name` if resident (marking it used), `None` if registered but
    /// evicted (load it with [`Self::acquire`]). Never blocks on a load.
    pub fn try_acquire(&self, name: &str) -> Result<Option<Arc<ControlNetModel>>, EngineError> {
        let mut state = self.lock();
        let tick = state.touch();
        let slot = state
            .slots
            .get_mut(name)
            .ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))?;
        Ok(slot.resident.as_mut().map(|r| {
            r.last_used = tick;
            r.net.clone()
        }))
    }

    /// The adapter under `name`, loading it again if it was evicted. Blocks while loading.
    pub fn acquire(&self, name: &str) -> Result<Arc<ControlNetModel>, EngineError> {
        if let Some(net) = self.try_acquire(name)? {
            return Ok(net);
        }
        let (source, generation) = {
            let mut state = self.lock();
            let slot = state
                .slots
                .get(name)
                .ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))?;
            let (source, generation, bytes) =
                (slot.source.clone(), slot.generation, slot.last_bytes);
            // It was loaded before, so its size is known: refuse before reading it again.
            if let Some(bytes) = bytes {
                if !state.make_room(self.settings.budget_bytes, bytes, name) {
                    return Err(self.over_budget(&mut state, name, bytes));
                }
            }
            (source, generation)
        };
        let net = Arc::new(self.load(name, &source)?);
        let mut state = self.lock();
        match state.slots.get(name) {
            None => return Err(EngineError::UnknownAdapter(name.to_string())),
            // Someone loaded it, or pointed the name elsewhere, meanwhile: theirs wins.
            Some(slot) if slot.generation != generation || slot.resident.is_some() => {
                drop(state);
                return self.acquire(name);
            }
            Some(_) => {}
        }
        self.insert(&mut state, name, source, net.clone())?;
        Ok(net)
    }

    fn info(&self, state: &mut State, name: &str) -> Option<AdapterInfo> {
        let slot = state.slots.get(name)?;
        Some(AdapterInfo {
            name: name.to_string(),
            source: slot.source.to_string(),
            resident: slot.resident.is_some(),
            bytes: slot.last_bytes,
            in_use: slot
                .resident
                .as_ref()
                .map_or(0, |r| Arc::strong_count(&r.net) - 1),
            generation: slot.generation,
        })
    }

    pub fn get(&self, name: &str) -> Option<AdapterInfo> {
        self.info(&mut self.lock(), name)
    }

    /// Every registered adapter, by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let mut state = self.lock();
        let names: Vec<String> = state.slots.keys().cloned().collect();
        names
            .iter()
            .filter_map(|n| self.info(&mut state, n))
            .collect()
    }

    pub fn counters(&self) -> AdapterCounters {
        let mut state = self.lock();
        AdapterCounters {
            loads: state.loads,
            evictions: state.evictions,
            bytes_held: state.bytes_held(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        for ok in ["canny", "control_v11p_sd15_canny", "a.b-c_1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", "ä", &"x".repeat(129)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
