//! The CUDA build links one CUDA library, candle-kernels' `libcudart.so.11.0` (cuBLAS, cuRAND and
//! the driver are opened at run time: vendor/README.md). A RUNPATH of `$ORIGIN/lib` lets the
//! binary find a copy shipped beside it (the GPU bundle, a container image) on machines whose
//! CUDA is another version; LD_LIBRARY_PATH still comes first.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN/lib");
    }
}
