//! flyball-control (placeholder)
