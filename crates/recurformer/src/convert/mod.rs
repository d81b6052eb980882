//! The conversion stages (DESIGN.md, "Recency score", "Selection is per KV group",
//! "Initialisation from the replaced heads"): `analyze` measures every head on calibration text,
//! `select` turns the scores into a plan, `init` builds the hybrid from the base model and the plan.
//! `probes` (with its `passkey` prompts) measures each head's retrieval role and `protect` keeps
//! the groups with strong probe evidence out of a plan (DESIGN.md, "Retrieval-aware selection").

pub mod analyze;
pub mod ceiling;
pub mod init;
pub mod passkey;
pub mod probes;
pub mod protect;
pub mod recency;
pub mod select;
