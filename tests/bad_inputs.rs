//! A catalogue of bad inputs, each answered with a 4xx naming the field, while a good request
//! runs alongside. (Filled in by the end-to-end work.)
mod common;
