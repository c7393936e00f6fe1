//! petald's pure-Rust core. No Python here: `cargo test` runs it alone.
//!
//! - [`dtype`]: the element types a tensor frame can carry.
//! - [`codec`]: lossless (zstd) and lossy (fp16, bf16, blockwise int8) payload codecs.
//! - [`frame`]: the versioned, checksummed, chunked binary frame for tensors.
//! - [`kad`]: the Kademlia routing table and the sans-IO iterative lookup.
//! - [`gguf`]: the index (metadata and tensor offsets) of a GGUF checkpoint file.

pub mod codec;
pub mod dtype;
pub mod frame;
pub mod gguf;
pub mod kad;
