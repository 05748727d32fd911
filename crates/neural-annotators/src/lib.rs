//! Neural annotators: the preprocessors that need a network (HED, PiDiNet, M-LSD, the line-art
//! generators, MiDaS and Depth Anything V2 depth, NormalBAE normals, UniFormer and SegFormer
//! segmentation), in candle, on whatever `Device` and dtype they are loaded with. Torch
//! operations candle lacks are in [`tensor_ops`], the ADE20K palette in [`ade20k`].
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
pub mod depth_anything_v2;
pub mod formula;
pub mod hed;
pub mod lineart;
pub mod lineart_anime;
pub mod midas;
pub mod mlsd;
pub mod normal_bae;
pub mod openpose;
pub mod pidinet;
pub mod segformer;
pub mod tensor_ops;
pub mod uniformer;

pub type Result<T> = std::result::Result<T, diffusion::Error>;

/// A hint, and for detectors that find keypoints (OpenPose) the keypoints in the OpenPose JSON
/// layout A1111's pose editors read.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub hint: RgbImage,
    pub keypoints: Option<serde_json::Value>,
}

/// A loaded annotator network with its pre- and post-processing.
pub trait Detector: Send + Sync {
    /// Runs preprocessor `preprocessor` (an A1111 module name this network serves) on `image`
    /// (at its detect size) with validated `params`; returns the hint at the same size.
    fn detect(&self, preprocessor: &str, image: &RgbImage, params: &[f64]) -> Result<RgbImage>;

    /// Whether this loaded detector can run `preprocessor` (one it is meant for). Only OpenPose
    /// can say no: its hand and face networks load only when their files are present, and a
    /// module that needs one that was missing then needs a reload.
    fn serves(&self, _preprocessor: &str) -> bool {
        true
    }

    /// [`Detector::detect`], with the keypoints for detectors that find any.
    fn detect_keypoints(
        &self,
        preprocessor: &str,
        image: &RgbImage,
        params: &[f64],
    ) -> Result<Detection> {
        Ok(Detection {
            hint: self.detect(preprocessor, image, params)?,
            keypoints: None,
        })
    }
}

/// Every preprocessor a network of this crate serves, by network.
pub const PREPROCESSORS: [&str; 21] = [
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
    "depth_midas",
    "normal_midas",
    "depth_anything_v2",
    "normal_bae",
    "seg_ufade20k",
    "seg_segformer",
    "openpose",
    "openpose_hand",
    "openpose_face",
    "openpose_faceonly",
    "openpose_full",
];

/// The annotator networks, one per weight file (per family for Depth Anything V2 and
/// SegFormer, whose size comes from the file: see [`Architecture`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    Hed,
    Pidinet,
    Mlsd,
    LineartRealistic,
    LineartCoarse,
    LineartAnime,
    Midas,
    DepthAnythingV2,
    NormalBae,
    Uniformer,
    Segformer,
    /// The body network's file; the hand and face files beside it are loaded too when present
    /// (see [`Network::missing_files`]).
    Openpose,
}

/// The architecture a network is built with. Most networks have one; Depth Anything V2 has
/// three sizes (told by the file name) and SegFormer six (told by the folder's `config.json`).
#[derive(Debug, Clone)]
pub enum Architecture {
    Fixed,
    DepthAnythingV2(depth_anything_v2::Config),
    Segformer(segformer::Config),
}

/// OpenPose's three files (lllyasviel/Annotators; legacy torch pickles).
const OPENPOSE_BODY: &str = "body_pose_model.pth";
const OPENPOSE_HAND: &str = "hand_pose_model.pth";
const OPENPOSE_FACE: &str = "facenet.pth";

/// `<stem>.safetensors` if present, else `name`, in `folder`.
fn find_named(folder: &Path, name: &str) -> Option<std::path::PathBuf> {
    let path = folder.join(name);
    let st = path.with_extension("safetensors");
    [st, path].into_iter().find(|p| p.is_file())
}

/// Depth Anything V2 sizes in the order the folder is searched (A1111 uses ViT-L).
const DEPTH_ANYTHING_V2_FILES: [&str; 3] = [
    "depth_anything_v2_vitl.pth",
    "depth_anything_v2_vitb.pth",
    "depth_anything_v2_vits.pth",
];

impl Network {
    pub const ALL: [Network; 12] = [
        Network::Hed,
        Network::Pidinet,
        Network::Mlsd,
        Network::LineartRealistic,
        Network::LineartCoarse,
        Network::LineartAnime,
        Network::Midas,
        Network::DepthAnythingV2,
        Network::NormalBae,
        Network::Uniformer,
        Network::Segformer,
        Network::Openpose,
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
            "depth_midas" | "normal_midas" => Network::Midas,
            "depth_anything_v2" => Network::DepthAnythingV2,
            "normal_bae" => Network::NormalBae,
            "seg_ufade20k" => Network::Uniformer,
            "seg_segformer" => Network::Segformer,
            "openpose" | "openpose_hand" | "openpose_face" | "openpose_faceonly"
            | "openpose_full" => Network::Openpose,
            _ => return None,
        })
    }

    /// The weight file's usual name (mostly from the `lllyasviel/Annotators` collection); a
    /// `.safetensors` file with the same stem is accepted too (and preferred). For Depth
    /// Anything V2 the ViT-L file (ViT-B and ViT-S are accepted too); for SegFormer the weights
    /// of a Hugging Face folder `segformer/` (see [`Network::find_file`]).
    pub fn file_name(self) -> &'static str {
        match self {
            Network::Hed => "ControlNetHED.pth",
            Network::Pidinet => "table5_pidinet.pth",
            Network::Mlsd => "mlsd_large_512_fp32.pth",
            Network::LineartRealistic => "sk_model.pth",
            Network::LineartCoarse => "sk_model2.pth",
            Network::LineartAnime => "netG.pth",
            Network::Midas => "dpt_hybrid-midas-501f0c75.pt",
            Network::DepthAnythingV2 => DEPTH_ANYTHING_V2_FILES[0],
            Network::NormalBae => "scannet.pt",
            Network::Uniformer => "upernet_global_small.pth",
            Network::Segformer => "segformer/model.safetensors",
            Network::Openpose => OPENPOSE_BODY,
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
            Network::Midas => "midas",
            Network::DepthAnythingV2 => "depth_anything_v2",
            Network::NormalBae => "normal_bae",
            Network::Uniformer => "uniformer",
            Network::Segformer => "segformer",
            Network::Openpose => "openpose",
        }
    }

    /// The file this network is read from in `folder`: `<stem>.safetensors` if present, else
    /// the usual file. Depth Anything V2: the first of ViT-L, ViT-B, ViT-S present. SegFormer:
    /// `segformer/model.safetensors`, else the first (by name) `segformer-*/model.safetensors`
    /// (a downloaded `nvidia/segformer-b*-finetuned-ade-*` folder), with its `config.json`
    /// beside it. Errors name the network, the candidates and the folder.
    pub fn find_file(self, folder: &Path) -> std::result::Result<std::path::PathBuf, String> {
        let mut candidates: Vec<std::path::PathBuf> = Vec::new();
        let mut stem_pair = |name: &str| {
            let pth = folder.join(name);
            candidates.push(pth.with_extension("safetensors"));
            candidates.push(pth);
        };
        match self {
            Network::DepthAnythingV2 => DEPTH_ANYTHING_V2_FILES.iter().for_each(|f| stem_pair(f)),
            Network::Segformer => {
                candidates.push(folder.join(self.file_name()));
                let mut dirs: Vec<_> = std::fs::read_dir(folder)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("segformer-"))
                    })
                    .collect();
                dirs.sort();
                candidates.extend(dirs.into_iter().map(|d| d.join("model.safetensors")));
            }
            _ => stem_pair(self.file_name()),
        }
        if let Some(found) = candidates.iter().find(|p| p.is_file()) {
            return Ok(found.clone());
        }
        let names: Vec<String> = candidates
            .iter()
            .map(|p| {
                p.strip_prefix(folder)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        Err(format!(
            "annotator weights for {} not found in {} (looked for {})",
            self.name(),
            folder.display(),
            names.join(", ")
        ))
    }

    /// The files `preprocessor` (one this network serves) needs from `folder` that are not
    /// there, by their usual names; empty when it can run. OpenPose needs its body file, and
    /// the hand or face file for the modules that detect hands or faces.
    pub fn missing_files(self, preprocessor: &str, folder: Option<&Path>) -> Vec<String> {
        let needed: Vec<&str> = match self {
            Network::Openpose => {
                let (hands, face, _) = openpose::module_parts(preprocessor).unwrap_or_default();
                let mut files = vec![OPENPOSE_BODY];
                if hands {
                    files.push(OPENPOSE_HAND);
                }
                if face {
                    files.push(OPENPOSE_FACE);
                }
                files
            }
            _ => {
                return match folder.map(|f| self.find_file(f)) {
                    Some(Ok(_)) => Vec::new(),
                    _ => vec![self.file_name().to_string()],
                }
            }
        };
        needed
            .into_iter()
            .filter(|f| folder.and_then(|d| find_named(d, f)).is_none())
            .map(str::to_string)
            .collect()
    }

    /// The architecture of the weights in `path` (a file [`Network::find_file`] found).
    pub fn architecture(self, path: &Path) -> Result<Architecture> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        Ok(match self {
            Network::DepthAnythingV2 => Architecture::DepthAnythingV2(
                depth_anything_v2::Config::from_file_name(name).ok_or_else(|| {
                    diffusion::Error::Config(format!(
                        "{}: not a Depth Anything V2 file name (depth_anything_v2_vit{{s,b,l}}.pth or .safetensors)",
                        path.display()
                    ))
                })?,
            ),
            Network::Segformer => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let read = |file: &str| std::fs::read_to_string(dir.join(file));
                let config = read("config.json").map_err(|e| {
                    diffusion::Error::Config(format!(
                        "SegFormer needs config.json beside {}: {e}",
                        path.display()
                    ))
                })?;
                let mut cfg = segformer::Config::from_hf_json(&config)?;
                if let Ok(pre) = read("preprocessor_config.json") {
                    cfg = cfg.with_preprocessor_json(&pre)?;
                }
                Architecture::Segformer(cfg)
            }
            _ => Architecture::Fixed,
        })
    }

    /// The architecture [`Network::build`] uses: the only one, or the smallest real size
    /// (Depth Anything V2 ViT-S, SegFormer-B0) — what tests write formula weights for.
    pub fn default_architecture(self) -> Architecture {
        match self {
            Network::DepthAnythingV2 => {
                Architecture::DepthAnythingV2(depth_anything_v2::Config::vits())
            }
            Network::Segformer => Architecture::Segformer(segformer::Config::b0()),
            _ => Architecture::Fixed,
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

    /// Builds the network in its [`Network::default_architecture`] from a `VarBuilder` whose
    /// names are the reference's `state_dict` keys (prefixes and nesting already resolved by
    /// the loader).
    pub fn build(self, vb: VarBuilder) -> Result<Box<dyn Detector>> {
        self.build_as(vb, &self.default_architecture())
    }

    /// Builds the network as `architecture` (which must be one of this network's).
    pub fn build_as(
        self,
        vb: VarBuilder,
        architecture: &Architecture,
    ) -> Result<Box<dyn Detector>> {
        let mismatch = || {
            diffusion::Error::Config(format!(
                "architecture {architecture:?} is not one of {}'s",
                self.name()
            ))
        };
        Ok(match (self, architecture) {
            (Network::Hed, _) => Box::new(hed::Hed::new(vb)?),
            (Network::Pidinet, _) => Box::new(pidinet::PiDiNet::new(vb)?),
            (Network::Mlsd, _) => Box::new(mlsd::Mlsd::new(vb)?),
            (Network::LineartRealistic | Network::LineartCoarse, _) => {
                Box::new(lineart::Lineart::new(vb)?)
            }
            (Network::LineartAnime, _) => Box::new(lineart_anime::LineartAnime::new(vb)?),
            (Network::Midas, _) => Box::new(midas::Midas::new(vb, &midas::Config::dpt_hybrid())?),
            (Network::DepthAnythingV2, Architecture::DepthAnythingV2(cfg)) => {
                Box::new(depth_anything_v2::DepthAnythingV2::new(vb, cfg)?)
            }
            (Network::NormalBae, _) => Box::new(normal_bae::NormalBae::new(
                vb,
                &normal_bae::Config::scannet(),
            )?),
            (Network::Uniformer, _) => {
                Box::new(uniformer::Uniformer::new(vb, &uniformer::Config::small())?)
            }
            (Network::Segformer, Architecture::Segformer(cfg)) => {
                Box::new(segformer::Segformer::new(vb, cfg)?)
            }
            // One backend for the three networks (formula weights: values by key).
            (Network::Openpose, _) => Box::new(openpose::Openpose::new(
                vb.clone(),
                Some(vb.clone()),
                Some(vb),
            )?),
            (Network::DepthAnythingV2 | Network::Segformer, _) => return Err(mismatch()),
        })
    }
}

/// Loads `network` from weight file `path` (`.pth` in any torch format, or `.safetensors`) onto
/// `device` as `dtype` (see [`Network::dtype`]), in the architecture the file tells
/// ([`Network::architecture`]). Also returns the bytes of weights it read onto the device.
pub fn load(
    network: Network,
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(Box<dyn Detector>, usize)> {
    let open = |path: &Path| -> Result<_> {
        let file = diffusion::weights::WeightFile::open(path)?;
        Ok(diffusion::weights::Counting::var_builder(
            file,
            network.dtype(dtype),
            device,
        ))
    };
    let bytes = |counted: &[&std::sync::Arc<std::sync::atomic::AtomicUsize>]| {
        counted
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<usize>()
    };
    if network == Network::Openpose {
        // The body file is `path`; the hand and face files load when they are beside it.
        let folder = path.parent().unwrap_or(Path::new("."));
        let (body, body_bytes) = open(path)?;
        let hand = find_named(folder, OPENPOSE_HAND)
            .map(|p| open(&p))
            .transpose()?;
        let face = find_named(folder, OPENPOSE_FACE)
            .map(|p| open(&p))
            .transpose()?;
        let mut counted = vec![&body_bytes];
        counted.extend(hand.iter().map(|(_, b)| b));
        counted.extend(face.iter().map(|(_, b)| b));
        let detector = openpose::Openpose::new(
            body,
            hand.as_ref().map(|(vb, _)| vb.clone()),
            face.as_ref().map(|(vb, _)| vb.clone()),
        )?;
        let total = bytes(&counted);
        return Ok((Box::new(detector), total));
    }
    let architecture = network.architecture(path)?;
    let (vb, counted) = open(path)?;
    let detector = network.build_as(vb, &architecture)?;
    Ok((detector, bytes(&[&counted])))
}
