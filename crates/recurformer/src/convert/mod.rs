//! The conversion stages (DESIGN.md, "Recency score", "Selection is per KV group",
//! "Initialisation from the replaced heads"): `analyze` measures every head on calibration text,
//! `select` turns the scores into a plan, `init` builds the hybrid from the base model and the plan.

pub mod analyze;
pub mod init;
pub mod recency;
pub mod select;
