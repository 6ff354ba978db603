#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod budget;
mod decide;
mod properties;
mod spec;
mod support;
