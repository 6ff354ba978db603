//! flyball-tests (placeholder)
