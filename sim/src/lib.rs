//! flyball-sim (placeholder)
