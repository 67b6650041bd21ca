//! The agent side of Pinazu Flows: an [`Agent`] root actor, its [`TaskSupervisor`], and one
//! [`TaskActor`] per task attempt. Agents talk to the coordinator only through the
//! [`ResultSink`](pinazu_shared::transport::ResultSink) they are given.

pub mod agent;
pub mod metrics;
pub mod nats;
pub mod supervisor;
pub mod task_actor;

pub use agent::{spawn_agent, Agent, AgentConfig, AgentMsg};
pub use supervisor::{SupervisorMsg, TaskSupervisor};
pub use task_actor::{TaskActor, TaskMsg};
