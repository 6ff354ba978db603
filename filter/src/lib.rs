//! flyball-filter (placeholder)
