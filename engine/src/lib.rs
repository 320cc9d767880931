//! Baton engine.

pub mod data;
