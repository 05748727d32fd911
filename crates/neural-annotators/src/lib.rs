//! Neural annotators: the preprocessors that need a network (HED, PiDiNet, M-LSD, the line-art
//! generators), in candle, on whatever `Device` and dtype they are loaded with.
//!
//! Each network lives in its own module in the candle-transformers style — a `new(vb)` that
//! reads the reference's `state_dict` names through a `VarBuilder`, a `forward` — next to the
//! detector's documented pre- and post-processing (controlnet_aux 0.0.10), split so that the
//! discontinuous post-processing can be tested on the reference's own float maps.
//!
//! Contract of [`Detector::detect`]: the input is the photo already resized to its detect size
//! (`annotators::ops::resize_image`), the parameters are already validated (in the order of the
//! preprocessor's `ParamSpec`s), and the hint comes back at that same size, RGB. Host↔device
//! copies happen only at the edges of `detect`: the image goes up once, the map comes back once.
//!
//! Which network serves which preprocessor, and from which file, is [`Network`]; loading a file
//! is [`load`]. Keeping networks resident, the memory budget and running them between denoising
//! steps belong to the engine.
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use image::RgbImage;

pub mod ade20k;
pub mod formula;
pub mod hed;
pub mod lineart;
pub mod lineart_anime;
pub mod mlsd;
pub mod pidinet;
pub mod tensor_ops;

pub type Result<T> = std::result::Result<T, diffusion::Error>;

/// A loaded annotator network with its pre- and post-processing.
pub trait Detector: Send + Sync {
    /// Runs preprocessor `preprocessor` (an A1111 module name this network serves) on `image`
    /// (at its detect size) with validated `params`; returns the hint at the same size.
    fn detect(&self, preprocessor: &str, image: &RgbImage, params: &[f64]) -> Result<RgbImage>;
}

/// Every preprocessor a network of this crate serves, by network.
pub const PREPROCESSORS: [&str; 10] = [
    "softedge_hed",
    "softedge_hedsafe",
    "scribble_hed",
    "softedge_pidinet",
    "softedge_pidisafe",
    "scribble_pidinet",
    "mlsd",
    "lineart_realistic",
    "lineart_coarse",
    "lineart_anime",
];

/// The annotator networks, one per weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    Hed,
    Pidinet,
    Mlsd,
    LineartRealistic,
    LineartCoarse,
    LineartAnime,
}

impl Network {
    pub const ALL: [Network; 6] = [
        Network::Hed,
        Network::Pidinet,
        Network::Mlsd,
        Network::LineartRealistic,
        Network::LineartCoarse,
        Network::LineartAnime,
    ];

    /// The network that serves A1111 module `preprocessor`, if a network of this crate does.
    pub fn for_preprocessor(preprocessor: &str) -> Option<Network> {
        Some(match preprocessor {
            "softedge_hed" | "softedge_hedsafe" | "scribble_hed" => Network::Hed,
            "softedge_pidinet" | "softedge_pidisafe" | "scribble_pidinet" => Network::Pidinet,
            "mlsd" => Network::Mlsd,
            "lineart_realistic" => Network::LineartRealistic,
            "lineart_coarse" => Network::LineartCoarse,
            "lineart_anime" => Network::LineartAnime,
            _ => return None,
        })
    }

    /// The weight file's name in the `lllyasviel/Annotators` collection; a `.safetensors` file
    /// with the same stem is accepted too (and preferred).
    pub fn file_name(self) -> &'static str {
        match self {
            Network::Hed => "ControlNetHED.pth",
            Network::Pidinet => "table5_pidinet.pth",
            Network::Mlsd => "mlsd_large_512_fp32.pth",
            Network::LineartRealistic => "sk_model.pth",
            Network::LineartCoarse => "sk_model2.pth",
            Network::LineartAnime => "netG.pth",
        }
    }

    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Network::Hed => "hed",
            Network::Pidinet => "pidinet",
            Network::Mlsd => "mlsd",
            Network::LineartRealistic => "lineart_realistic",
            Network::LineartCoarse => "lineart_coarse",
            Network::LineartAnime => "lineart_anime",
        }
    }

    /// The file this network is read from in `folder`: `<stem>.safetensors` if present, else
    /// the `.pth`. Errors name the network, both candidates and the folder.
    pub fn find_file(self, folder: &Path) -> std::result::Result<std::path::PathBuf, String> {
        let pth = folder.join(self.file_name());
        let st = pth.with_extension("safetensors");
        if st.is_file() {
            Ok(st)
        } else if pth.is_file() {
            Ok(pth)
        } else {
            Err(format!(
                "annotator weights {} (or {}) not found in {}",
                self.file_name(),
                st.file_name().unwrap().to_string_lossy(),
                folder.display()
            ))
        }
    }

    /// The dtype this network runs in when `requested` is asked for. PiDiNet stays in f32: it
    /// is small (0.7 M parameters), and in f16 its error grows through its 16 residual blocks
    /// to ~1e-1 of the logits (measured on formula weights), against ~5e-3 for the others.
    pub fn dtype(self, requested: DType) -> DType {
        match self {
            Network::Pidinet => DType::F32,
            _ => requested,
        }
    }

    /// Builds the network from a `VarBuilder` whose names are the reference's `state_dict`
    /// keys (prefixes and nesting already resolved by the loader).
    pub fn build(self, vb: VarBuilder) -> Result<Box<dyn Detector>> {
        Ok(match self {
            Network::Hed => Box::new(hed::Hed::new(vb)?),
            Network::Pidinet => Box::new(pidinet::PiDiNet::new(vb)?),
            Network::Mlsd => Box::new(mlsd::Mlsd::new(vb)?),
            Network::LineartRealistic | Network::LineartCoarse => {
                Box::new(lineart::Lineart::new(vb)?)
            }
            Network::LineartAnime => Box::new(lineart_anime::LineartAnime::new(vb)?),
        })
    }
}

/// Loads `network` from weight file `path` (`.pth` in any torch format, or `.safetensors`) onto
/// `device` as `dtype` (see [`Network::dtype`]). Also returns the bytes of weights it read onto
/// the device.
pub fn load(
    network: Network,
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Box<dyn Detector>, usize)> {
    let file = diffusion::weights::WeightFile::open(path)?;
    let (vb, bytes) = diffusion::weights::Counting::var_builder(file, network.dtype(dtype), device);
    let detector = network.build(vb)?;
    Ok((detector, bytes.load(std::sync::atomic::Ordering::Relaxed)))
}
