//! flyball-filter-core (placeholder)
