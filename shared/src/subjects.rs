//! NATS subjects, all under a configurable prefix (default `pinazu`). The status-event
//! subjects are fixed by Pinazu Core and live in `events`.

use crate::ids::{AgentId, FlowRunId};

/// The default subject prefix.
pub const DEFAULT_PREFIX: &str = "pinazu";

/// API verbs served by the coordinator on `<prefix>.api.<verb>`.
pub const API_VERBS: [&str; 5] = ["start", "status", "runs", "cancel", "agents"];

/// Builds every subject for one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new(DEFAULT_PREFIX)
    }
}

/// Whether `token` can stand in a subject as one token.
pub fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '.' | '*' | '>'))
}

impl Subjects {
    /// Subjects under `prefix` (which may itself contain dots, e.g. `team.pinazu`).
    pub fn new(prefix: &str) -> Self {
        Subjects {
            prefix: prefix.trim_matches('.').to_string(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Coordinator -> agent: attempts to run.
    pub fn agent_spawn(&self, agent: &AgentId) -> String {
        format!("{}.agent.{}.spawn", self.prefix, agent)
    }

    /// Coordinator -> agent: attempts to stop.
    pub fn agent_cancel(&self, agent: &AgentId) -> String {
        format!("{}.agent.{}.cancel", self.prefix, agent)
    }

    /// Anyone -> the agent with that id (request/reply): who holds the id
    /// ([`crate::wire::AgentIdentity`]); a starting agent asks, so no id runs twice.
    pub fn agent_whois(&self, agent: &AgentId) -> String {
        format!("{}.agent.{}.whois", self.prefix, agent)
    }

    /// Coordinator -> agent: report batches handled durably.
    pub fn agent_ack(&self, agent: &AgentId) -> String {
        format!("{}.agent.{}.ack", self.prefix, agent)
    }

    /// Agent -> coordinator: heartbeats.
    pub fn heartbeat(&self) -> String {
        format!("{}.agent.heartbeat", self.prefix)
    }

    /// Agent -> coordinator: batched attempt reports.
    pub fn reports(&self) -> String {
        format!("{}.coord.reports", self.prefix)
    }

    /// Coordinator -> agents: "I (re)started; heartbeat now".
    pub fn hello(&self) -> String {
        format!("{}.coord.hello", self.prefix)
    }

    /// Client -> coordinator: one API verb.
    pub fn api(&self, verb: &str) -> String {
        format!("{}.api.{}", self.prefix, verb)
    }

    /// Coordinator -> watchers: a run's progress.
    pub fn run_progress(&self, run: FlowRunId) -> String {
        format!("{}.run.{}.progress", self.prefix, run)
    }

    /// Coordinator -> watchers: a run's end.
    pub fn run_done(&self, run: FlowRunId) -> String {
        format!("{}.run.{}.done", self.prefix, run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_use_the_prefix() {
        let s = Subjects::new("acme.flows.");
        assert_eq!(s.heartbeat(), "acme.flows.agent.heartbeat");
        assert_eq!(
            s.agent_spawn(&AgentId("a1".into())),
            "acme.flows.agent.a1.spawn"
        );
        assert_eq!(s.api("start"), "acme.flows.api.start");
        assert!(valid_token("host-12_ab"));
        assert!(
            !valid_token("a.b") && !valid_token("*") && !valid_token("a b") && !valid_token("")
        );
    }
}
