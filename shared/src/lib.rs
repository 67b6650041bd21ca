//! The vocabulary of Pinazu Flows, shared by the coordinator, the agents and the facade:
//! ids, task and flow definitions, options, status events, cache records, wire messages,
//! the codec, the transport seam and the errors a user can act on.

pub mod api;
pub mod breaker;
pub mod cache;
pub mod codec;
pub mod error;
pub mod events;
pub mod ids;
pub mod nats;
pub mod options;
pub mod redact;
pub mod registry;
pub mod schedule;
pub mod store;
pub mod subjects;
pub mod task_context;
#[cfg(feature = "otel")]
pub mod trace;
pub mod transport;
pub mod wire;

/// A boxed, sendable future: the shape of everything invoked through a registry entry.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
