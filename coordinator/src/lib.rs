//! The coordinator side of Pinazu Flows: one [`FlowRunner`](flow_runner::FlowRunner) per
//! flow run, the [`Scheduler`](scheduler::Scheduler) (agent registry and dispatch), the
//! [`CacheActor`](cache::CacheActor) in front of the object store, and the
//! [`StatusPublisher`](status::StatusPublisher). [`Coordinator`] wires them together.

pub mod cache;
pub mod calls;
pub mod context;
pub mod coordinator;
pub mod flow_runner;
pub mod ha;
pub mod journal;
pub mod journal_js;
pub mod limits;
pub mod metrics;
pub mod nats;
pub mod scheduler;
pub mod schedules;
pub mod stats;
pub mod status;
pub(crate) mod supervisor;

pub use context::{
    call_task, call_task_keyed, current_flow_run_id, limit_key, map, spawn_in_flow, with_priority,
    FlowContext, Payload,
};
pub use coordinator::{
    Coordinator, CoordinatorConfig, FlowLogHandle, FlowRunOutcome, JournalHandle, OwnershipHandle,
    RemoteCancelHandle, RunHandle, RunOptions, StartError,
};
pub use flow_runner::Seeds;
pub use scheduler::SchedulerTiming;
pub use stats::{RunStats, StatsSnapshot};
pub use status::{CollectingSink, EventSink, LogSink};
#[cfg(test)]
mod size_probe {
    #[test]
    fn sizes() {
        eprintln!(
            "FlowRunnerMsg {}",
            std::mem::size_of::<crate::flow_runner::FlowRunnerMsg>()
        );
        eprintln!(
            "AttemptFinished {}",
            std::mem::size_of::<pinazu_shared::wire::AttemptFinished>()
        );
        eprintln!(
            "Report {}",
            std::mem::size_of::<pinazu_shared::wire::Report>()
        );
        eprintln!(
            "SpawnTask {}",
            std::mem::size_of::<pinazu_shared::wire::SpawnTask>()
        );
        eprintln!(
            "ErrorInfo {}",
            std::mem::size_of::<pinazu_shared::error::ErrorInfo>()
        );
        eprintln!(
            "SchedulerMsg {}",
            std::mem::size_of::<crate::scheduler::SchedulerMsg>()
        );
    }
}
