//! The coordinator's core actors (`Scheduler`, `CacheActor`, `StatusPublisher`) are
//! linked to a `CoreSupervisor`. Their state (the agent table and dispatch queue, the
//! cache's pending writes, the event backlog) cannot be rebuilt in place without the
//! runs' cooperation, so the policy is to fail loudly: a core actor that fails or stops
//! marks the coordinator failed; the `coordinator` process exits (code 70) so that its
//! supervisor restarts it (or a standby takes its runs), and the runs resume from the
//! journal with nothing journaled run again. An embedded run ends with the error.

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use tokio::sync::watch;

/// Supervises the coordinator's core actors.
pub(crate) struct CoreSupervisor;

/// Messages to the core supervisor.
pub(crate) enum CoreMsg {
    /// A linked child, by name (for the failure message).
    Watch(ActorId, &'static str),
}

pub(crate) struct CoreState {
    failed: watch::Sender<Option<String>>,
    names: HashMap<ActorId, &'static str>,
}

impl Actor for CoreSupervisor {
    type Msg = CoreMsg;
    type State = CoreState;
    type Arguments = watch::Sender<Option<String>>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        failed: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(CoreState {
            failed,
            names: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoreMsg::Watch(id, name) => {
                state.names.insert(id, name);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (id, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell.get_id(), err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => (
                cell.get_id(),
                reason.unwrap_or_else(|| "it stopped".to_string()),
            ),
            _ => return Ok(()),
        };
        let name = state.names.get(&id).copied().unwrap_or("core actor");
        let message = format!(
            "the coordinator's {name} failed ({why}): the coordinator cannot go on; a restart resumes its runs from the journal"
        );
        tracing::error!("{message}");
        state.failed.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(message);
                true
            } else {
                false
            }
        });
        Ok(())
    }
}
