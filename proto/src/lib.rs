//! flyball-proto (placeholder)
