//! The A1111-compatible API end to end. (Filled in by the A1111 work.)
mod common;
