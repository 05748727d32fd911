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
    Pth(candle_core::pickle::PthTensors),
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
    /// A rewritten copy of a torch pickle that the reader reads instead (see `torch_zip`).
    _copy: Option<torch_zip::TempCopy>,
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
                let (pth, copy) = match open_pickle(path) {
                    Ok(pth) => (pth, None),
                    // The zip reader under candle (zip >= 9.1) rejects archives that carry a
                    // zip64 end-of-directory record, which torch writes into every file. When
                    // that record is redundant, read a copy without it.
                    Err(first) => match torch_zip::without_redundant_zip64(path)? {
                        Some(copy) => (open_pickle(copy.path())?, Some(copy)),
                        None => return Err(first),
                    },
                };
                return Ok(Self {
                    path: path.to_path_buf(),
                    store: Store::Pth(pth),
                    renames: None,
                    _copy: copy,
                });
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
            _copy: None,
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
            Store::Pth(p) => match p.get(key)? {
                Some(t) => t.to_device(device)?,
                None => return Err(self.missing(name)),
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

/// A torch pickle: a plain state dict, or one wrapped under `state_dict`.
fn open_pickle(path: &Path) -> Result<candle_core::pickle::PthTensors> {
    let open = |key| {
        candle_core::pickle::PthTensors::new(path, key)
            .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))
    };
    let plain = open(None)?;
    if plain.tensor_infos().is_empty() {
        open(Some("state_dict"))
    } else {
        Ok(plain)
    }
}

mod torch_zip {
    //! torch's zip writer ends every archive with a zip64 end-of-central-directory record and
    //! locator, even when the classic record holds every value. The `zip` crate from 9.1 on
    //! fails to open such archives ("Invalid Central Directory header"). When the classic
    //! record is complete (under 4 GiB of directory offsets, under 65535 entries) the zip64
    //! record says nothing more, and an archive without it is the same archive: the central
    //! directory and every entry keep their offsets because they all precede it.
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::path::{Path, PathBuf};

    use crate::{Error, Result};

    const EOCD: [u8; 4] = *b"PK\x05\x06";
    const EOCD64: [u8; 4] = *b"PK\x06\x06";
    const LOCATOR64: [u8; 4] = *b"PK\x06\x07";

    /// A file in the temp directory, removed on drop.
    pub struct TempCopy(PathBuf);

    impl TempCopy {
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempCopy {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Where the zip64 record starts and the classic record starts, when the zip64 one is
    /// redundant. `tail` is the end of the file, `tail_start` its offset.
    pub(super) fn redundant_zip64(tail: &[u8], tail_start: u64) -> Option<(u64, u64)> {
        let eocd = tail.windows(4).rposition(|w| w == EOCD)?;
        let rec = tail.get(eocd..eocd + 22)?;
        let u16_at = |i: usize| u16::from_le_bytes([rec[i], rec[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(rec[i..i + 4].try_into().unwrap());
        // Saturated classic fields mean the zip64 record carries the real values.
        if u16_at(8) == 0xFFFF
            || u16_at(10) == 0xFFFF
            || u32_at(12) == u32::MAX
            || u32_at(16) == u32::MAX
        {
            return None;
        }
        let locator = eocd.checked_sub(20)?;
        if tail[locator..locator + 4] != LOCATOR64 {
            return None;
        }
        let eocd64 = u64::from_le_bytes(tail[locator + 8..locator + 16].try_into().unwrap());
        let eocd64_in_tail = usize::try_from(eocd64.checked_sub(tail_start)?).ok()?;
        if tail.get(eocd64_in_tail..eocd64_in_tail + 4)? != EOCD64 {
            return None;
        }
        Some((eocd64, tail_start + eocd as u64))
    }

    /// A copy of `path` without its zip64 end records, or `None` if they are not redundant.
    pub fn without_redundant_zip64(path: &Path) -> Result<Option<TempCopy>> {
        let mut file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        // The end records plus the largest possible archive comment.
        let tail_len = len.min(64 * 1024 + 128);
        let tail_start = len - tail_len;
        let mut tail = vec![0; tail_len as usize];
        file.seek(SeekFrom::Start(tail_start)).map_err(io(path))?;
        file.read_exact(&mut tail).map_err(io(path))?;
        let Some((cut_from, resume_at)) = redundant_zip64(&tail, tail_start) else {
            return Ok(None);
        };
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let copy = TempCopy(std::env::temp_dir().join(format!(
            "controlnet-serve-{}-{}.pth",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )));
        let mut out = File::create(copy.path()).map_err(io(copy.path()))?;
        file.seek(SeekFrom::Start(0)).map_err(io(path))?;
        std::io::copy(&mut (&mut file).take(cut_from), &mut out).map_err(io(copy.path()))?;
        out.write_all(&tail[(resume_at - tail_start) as usize..])
            .map_err(io(copy.path()))?;
        Ok(Some(copy))
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

#[cfg(test)]
mod tests {
    use super::torch_zip::redundant_zip64;

    /// zip64 end record (56 bytes) at `at`, its locator, and a classic end record.
    fn tail(at: u64, entries: u16, cd_offset: u32) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend(b"PK\x06\x06");
        t.extend([0u8; 52]);
        t.extend(b"PK\x06\x07");
        t.extend(0u32.to_le_bytes());
        t.extend(at.to_le_bytes());
        t.extend(1u32.to_le_bytes());
        t.extend(b"PK\x05\x06");
        t.extend([0u8; 4]);
        t.extend(entries.to_le_bytes());
        t.extend(entries.to_le_bytes());
        t.extend(100u32.to_le_bytes());
        t.extend(cd_offset.to_le_bytes());
        t.extend(0u16.to_le_bytes());
        t
    }

    #[test]
    fn zip64_records_are_cut_only_when_redundant() {
        // As torch writes it: complete classic record, zip64 record right after the directory.
        assert_eq!(
            redundant_zip64(&tail(1000, 3, 900), 1000),
            Some((1000, 1076))
        );
        // Saturated classic fields: the zip64 record holds the real values.
        assert_eq!(redundant_zip64(&tail(1000, 0xFFFF, 900), 1000), None);
        assert_eq!(redundant_zip64(&tail(1000, 3, u32::MAX), 1000), None);
        // A locator pointing elsewhere than a zip64 record.
        assert_eq!(redundant_zip64(&tail(1004, 3, 900), 1000), None);
        // No zip64 records at all.
        assert_eq!(redundant_zip64(&tail(1000, 3, 900)[76..], 1076), None);
    }
}
