//! flyball-policy (placeholder)
