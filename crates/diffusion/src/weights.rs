//! Weight files: memory-mapped safetensors and torch pickles (`.pth`/`.ckpt`/`.bin`), read by
//! name through a candle `VarBuilder`, optionally through a renaming table when the file uses
//! another layout than diffusers (the original LDM/ControlNet single files). A table entry may
//! also say that the stored tensor is a 1×1 convolution kernel of what the model reads as a
//! linear weight (the LDM VAE's attention projections), which is reshaped at load.
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
    Torch(crate::torch_pickle::TorchFile),
}

/// Where a model tensor is stored in a file of another layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    pub key: String,
    /// Stored as a 1×1 convolution kernel (`[out, in, 1, 1]`, or `[out, in, 1]` for a 1-D
    /// conv) where the model has a linear weight `[out, in]`: read without the trailing 1s
    /// (a tensor already stored as `[out, in]` is read as it is).
    pub conv_as_linear: bool,
}

impl StoredTensor {
    pub fn renamed(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            conv_as_linear: false,
        }
    }
}

/// One weight file, opened (safetensors are memory-mapped, not read).
pub struct WeightFile {
    path: PathBuf,
    store: Store,
    /// diffusers name -> stored tensor, and the layout's name, for files in another layout.
    renames: Option<(HashMap<String, StoredTensor>, &'static str)>,
}

impl WeightFile {
    /// Opens `.safetensors` by mmap, and `.pth`/`.pt`/`.ckpt`/`.bin` with
    /// [`crate::torch_pickle`] (zip or legacy torch format; a plain state dict or one nested
    /// under `state_dict`/`model`, `module.` dropped; tensors read when asked for).
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
                Store::Torch(crate::torch_pickle::TorchFile::open(path)?)
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

    /// Wraps an opened torch checkpoint, e.g. one opened at an explicit nesting path with
    /// [`crate::torch_pickle::TorchFile::open_under`].
    pub fn from_torch(file: crate::torch_pickle::TorchFile) -> Self {
        Self {
            path: file.path().to_path_buf(),
            store: Store::Torch(file),
            renames: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keys as stored in the file (for a torch pickle: of the state dict found in it, without
    /// a `module.` prefix).
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = match &self.store {
            Store::Safetensors(st) => st.tensors().into_iter().map(|(k, _)| k).collect(),
            Store::Torch(t) => t.keys(),
        };
        keys.sort();
        keys
    }

    /// Shape of a tensor as stored, by its stored key.
    pub fn stored_shape(&self, key: &str) -> Option<Vec<usize>> {
        match &self.store {
            Store::Safetensors(st) => st.get(key).ok().map(|v| v.shape().to_vec()),
            Store::Torch(t) => t.shape(key).map(<[usize]>::to_vec),
        }
    }

    /// Reads the file through a table from model (diffusers) names to stored keys; `layout`
    /// names the file's layout in errors.
    pub fn with_renames(self, renames: HashMap<String, String>, layout: &'static str) -> Self {
        let table = renames
            .into_iter()
            .map(|(name, key)| (name, StoredTensor::renamed(key)))
            .collect();
        self.with_layout(table, layout)
    }

    /// Like [`Self::with_renames`], with per-tensor storage details.
    pub fn with_layout(
        mut self,
        table: HashMap<String, StoredTensor>,
        layout: &'static str,
    ) -> Self {
        self.renames = Some((table, layout));
        self
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn stored_key<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        match &self.renames {
            Some((map, _)) => map.get(name).map(|s| s.key.as_str()),
            None => Some(name),
        }
    }

    fn conv_as_linear(&self, name: &str) -> bool {
        match &self.renames {
            Some((map, _)) => map.get(name).is_some_and(|s| s.conv_as_linear),
            None => false,
        }
    }

    fn describe(&self, name: &str) -> String {
        match (self.stored_key(name), &self.renames) {
            (Some(key), _) if key != name => format!("`{key}` (model name `{name}`)"),
            (None, Some((_, layout))) => format!("`{name}` (in the {layout} layout)"),
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
        let tensor = match &self.store {
            Store::Safetensors(st) => {
                if st.get(key).is_err() {
                    return Err(self.missing(name));
                }
                st.load(key, device)?
            }
            Store::Torch(t) => match t.get(key) {
                Ok(Some(t)) => t.to_device(device)?,
                Ok(None) => return Err(self.missing(name)),
                Err(e) => return Err(candle_core::Error::Msg(e.to_string())),
            },
        };
        if self.conv_as_linear(name) {
            let dims = tensor.dims();
            if dims.len() >= 2 && dims[2..].iter().all(|&d| d == 1) {
                return tensor.reshape((dims[0], dims[1]));
            }
        }
        Ok(tensor)
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
        let conv = self.conv_as_linear(name);
        match self.stored_shape(key) {
            None => return Err(self.missing(name)),
            Some(actual) => {
                // A conv-as-linear tensor may also come already reshaped (as diffusers' own
                // conversion accepts it): [out, in, 1, 1], [out, in, 1] or [out, in].
                let fits = actual == shape.dims()
                    || (conv
                        && shape.rank() == 2
                        && actual.len() > 2
                        && actual[..2] == *shape.dims()
                        && actual[2..].iter().all(|&d| d == 1));
                if !fits {
                    let expected = if conv {
                        let mut kernel = shape.dims().to_vec();
                        kernel.extend([1, 1]);
                        format!(
                            "{kernel:?} (a 1×1 convolution read as the linear {:?})",
                            shape.dims()
                        )
                    } else {
                        format!("{:?}", shape.dims())
                    };
                    return Err(candle_core::Error::Msg(format!(
                        "{}: tensor {} has shape {:?}, the model config expects {expected}",
                        self.path.display(),
                        self.describe(name),
                        actual,
                    )));
                }
            }
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

/// A weight source that counts the bytes of the tensors a model takes from it (in the dtype
/// they are loaded as): what a loaded model holds on its device, for memory budgets.
pub struct Counting<B> {
    inner: B,
    bytes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<B: SimpleBackend + 'static> Counting<B> {
    /// A `VarBuilder` over `inner`, and the running count of bytes it has handed out.
    pub fn var_builder(
        inner: B,
        dtype: DType,
        device: &Device,
    ) -> (
        VarBuilder<'static>,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let backend = Self {
            inner,
            bytes: bytes.clone(),
        };
        (
            VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
            bytes,
        )
    }
}

impl<B> Counting<B> {
    fn counted(&self, t: candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        if let Ok(t) = &t {
            self.bytes.fetch_add(
                t.elem_count() * t.dtype().size_in_bytes(),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        t
    }
}

impl<B: SimpleBackend> SimpleBackend for Counting<B> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.counted(self.inner.get(shape, name, init, dtype, device))
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.counted(self.inner.get_unchecked(name, dtype, device))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
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

/// A model built with candle_nn's initialisation hints (random weights, for benchmarks), held
/// as inference holds loaded weights: plain tensors, not `Var`s. Built straight from a
/// `VarMap`, a model records every operation for backprop (each intermediate then lives to the
/// end of the step) and the CPU paths that have no backward (the fused attention) stand aside,
/// so it would not time what the service runs.
pub fn with_random_weights<M, E: From<candle_core::Error>>(
    dtype: DType,
    device: &Device,
    build: impl Fn(VarBuilder<'static>) -> std::result::Result<M, E>,
) -> std::result::Result<M, E> {
    let vars = candle_nn::VarMap::new();
    build(VarBuilder::from_varmap(&vars, dtype, device))?;
    let tensors: HashMap<String, Tensor> = vars
        .data()
        .lock()
        .expect("the var map is not poisoned")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    build(VarBuilder::from_tensors(tensors, dtype, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_plain_tensors() {
        let device = Device::Cpu;
        let layer = with_random_weights(DType::F32, &device, |vb| {
            candle_nn::linear(4, 3, vb).map_err(crate::Error::from)
        })
        .unwrap();
        assert!(!layer.weight().is_variable());
        let x = Tensor::ones((2, 4), DType::F32, &device).unwrap();
        let y = candle_core::Module::forward(&layer, &x).unwrap();
        assert!(!y.track_op(), "no operation is recorded for backprop");
        // candle_nn's initialisation: not all zeros.
        assert!(
            layer
                .weight()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}
