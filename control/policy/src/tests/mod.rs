#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod budget;
mod closed_loop;
mod cross_talk_and_queues;
mod decide;
mod lower_bound;
mod properties;
mod spec;
mod support;
