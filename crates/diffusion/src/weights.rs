//! Weight files: memory-mapped safetensors and torch pickles (`.pth`/`.ckpt`/`.bin`), read by
//! name through a candle `VarBuilder`, optionally through a renaming table when the file uses
//! another layout than diffusers (the original LDM/ControlNet single files).
//!
//! Every failure names the file and the key, and for a shape mismatch both shapes, because the
//! people who meet these errors are users pointing the service at a file they downloaded.
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

enum Store {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pth(candle_core::pickle::PthTensors),
}

/// One weight file, opened (safetensors are memory-mapped, not read).
pub struct WeightFile {
    path: PathBuf,
    store: Store,
    /// diffusers name -> key in the file, for files in another layout.
    renames: Option<HashMap<String, String>>,
}

impl WeightFile {
    /// Opens `.safetensors` by mmap, and `.pth`/`.pt`/`.ckpt`/`.bin` with candle's pickle reader
    /// (a plain state dict, or one wrapped under `state_dict`).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Weights(format!(
                "{}: no such weight file",
                path.display()
            )));
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let store = match ext.as_str() {
            "safetensors" => {
                // SAFETY: the file is mapped read-only; like every mmap user we rely on nobody
                // truncating it while the model is loaded from it.
                let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
                    .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))?;
                Store::Safetensors(st)
            }
            "pth" | "pt" | "ckpt" | "bin" => {
                let open = |key| {
                    candle_core::pickle::PthTensors::new(path, key)
                        .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))
                };
                let plain = open(None)?;
                let pth = if plain.tensor_infos().is_empty() {
                    open(Some("state_dict"))?
                } else {
                    plain
                };
                Store::Pth(pth)
            }
            _ => {
                return Err(Error::Weights(format!(
                    "{}: unknown weight format (expected .safetensors, .pth, .pt, .ckpt or .bin)",
                    path.display()
                )))
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            store,
            renames: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keys as stored in the file.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = match &self.store {
            Store::Safetensors(st) => st.tensors().into_iter().map(|(k, _)| k).collect(),
            Store::Pth(p) => p.tensor_infos().keys().cloned().collect(),
        };
        keys.sort();
        keys
    }

    /// Shape of a tensor as stored, by its stored key.
    pub fn stored_shape(&self, key: &str) -> Option<Vec<usize>> {
        match &self.store {
            Store::Safetensors(st) => st.get(key).ok().map(|v| v.shape().to_vec()),
            Store::Pth(p) => p
                .tensor_infos()
                .get(key)
                .map(|i| i.layout.shape().dims().to_vec()),
        }
    }

    /// Reads the file through a table from model (diffusers) names to stored keys.
    pub fn with_renames(mut self, renames: HashMap<String, String>) -> Self {
        self.renames = Some(renames);
        self
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn stored_key<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        match &self.renames {
            Some(map) => map.get(name).map(String::as_str),
            None => Some(name),
        }
    }

    fn describe(&self, name: &str) -> String {
        match self.stored_key(name) {
            Some(key) if key != name => format!("`{key}` (model name `{name}`)"),
            _ => format!("`{name}`"),
        }
    }

    fn missing(&self, name: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{}: tensor {} is missing",
            self.path.display(),
            self.describe(name)
        ))
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let key = self.stored_key(name).ok_or_else(|| self.missing(name))?;
        match &self.store {
            Store::Safetensors(st) => {
                if st.get(key).is_err() {
                    return Err(self.missing(name));
                }
                st.load(key, device)
            }
            Store::Pth(p) => match p.get(key)? {
                Some(t) => t.to_device(device),
                None => Err(self.missing(name)),
            },
        }
    }
}

impl SimpleBackend for WeightFile {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        // Check the shape from the header before touching the data.
        let key = self.stored_key(name).ok_or_else(|| self.missing(name))?;
        match self.stored_shape(key) {
            None => return Err(self.missing(name)),
            Some(actual) if actual != shape.dims() => {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor {} has shape {:?}, the model config expects {:?}",
                    self.path.display(),
                    self.describe(name),
                    actual,
                    shape.dims()
                )))
            }
            Some(_) => {}
        }
        self.load(name, device)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.stored_key(name)
            .is_some_and(|k| self.stored_shape(k).is_some())
    }
}

/// Parses `f32`, `f16`, `bf16` (the dtypes a user may ask the models to run in).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::Config(format!(
            "unknown dtype {other:?} (expected f32, f16 or bf16)"
        ))),
    }
}
