//! The shape of an autoscaler's pools: one unified pool, or a prefill pool and a decode pool.
//!
//! [`Pools`] carries that shape for the spec, the inputs and the decision alike, so a decode
//! decision can never be computed from prefill inputs.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a pool serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Prefill and decode on the same replicas.
    Unified,
    /// Prompt processing up to the first token (disaggregated serving).
    Prefill,
    /// Token generation after the first token (disaggregated serving).
    Decode,
}

impl Role {
    /// Stable lower-case name, usable as a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Unified => "unified",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which shape an autoscaler has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Topology {
    Unified,
    Disaggregated,
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Topology::Unified => "unified",
            Topology::Disaggregated => "prefill + decode",
        })
    }
}

/// One `T` per pool of an autoscaler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Pools<T> {
    Unified(T),
    Disaggregated { prefill: T, decode: T },
}

// === impl Pools ===

impl<T> Pools<T> {
    pub fn topology(&self) -> Topology {
        match self {
            Pools::Unified(_) => Topology::Unified,
            Pools::Disaggregated { .. } => Topology::Disaggregated,
        }
    }

    /// The pool with this role, if the autoscaler has one.
    pub fn get(&self, role: Role) -> Option<&T> {
        match (self, role) {
            (Pools::Unified(t), Role::Unified) => Some(t),
            (Pools::Disaggregated { prefill, .. }, Role::Prefill) => Some(prefill),
            (Pools::Disaggregated { decode, .. }, Role::Decode) => Some(decode),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, role: Role) -> Option<&mut T> {
        match (self, role) {
            (Pools::Unified(t), Role::Unified) => Some(t),
            (Pools::Disaggregated { prefill, .. }, Role::Prefill) => Some(prefill),
            (Pools::Disaggregated { decode, .. }, Role::Decode) => Some(decode),
            _ => None,
        }
    }

    /// The pools in a fixed order (prefill before decode), each with its role.
    pub fn iter(&self) -> impl Iterator<Item = (Role, &T)> {
        let (first, second) = match self {
            Pools::Unified(t) => ((Role::Unified, t), None),
            Pools::Disaggregated { prefill, decode } => {
                ((Role::Prefill, prefill), Some((Role::Decode, decode)))
            }
        };
        std::iter::once(first).chain(second)
    }

    /// The pools in the order of [`Pools::iter`], mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        let (first, second) = match self {
            Pools::Unified(t) => (t, None),
            Pools::Disaggregated { prefill, decode } => (prefill, Some(decode)),
        };
        std::iter::once(first).chain(second)
    }

    pub fn map<U>(self, mut f: impl FnMut(Role, T) -> U) -> Pools<U> {
        match self {
            Pools::Unified(t) => Pools::Unified(f(Role::Unified, t)),
            Pools::Disaggregated { prefill, decode } => Pools::Disaggregated {
                prefill: f(Role::Prefill, prefill),
                decode: f(Role::Decode, decode),
            },
        }
    }

    pub fn as_ref(&self) -> Pools<&T> {
        match self {
            Pools::Unified(t) => Pools::Unified(t),
            Pools::Disaggregated { prefill, decode } => Pools::Disaggregated { prefill, decode },
        }
    }
}
