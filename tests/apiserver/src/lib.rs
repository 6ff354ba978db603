//! flyball-apiserver (placeholder)
