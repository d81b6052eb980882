//! Hand-written CPU kernels of the inference path, each tested against the plain reference it
//! replaces (DESIGN.md, "Inference precision").

pub mod decode_attention;
