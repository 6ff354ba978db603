//! flyball-sketch (placeholder)
