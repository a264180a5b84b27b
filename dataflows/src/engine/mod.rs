//! The keyed core (docs/engine.md, steps 1 and 2), built next to the differential one.
pub mod keyed;
