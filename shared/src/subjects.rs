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

/// Whether `name` can name a limit or a schedule (one subject token each): letters,
/// digits, `_` and `-`, at most 128.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
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

    /// Coordinator -> agent (request/reply): attempts waiting in its queue, handed back
    /// unstarted for an idle agent ([`crate::wire::StealRequest`]).
    pub fn agent_steal(&self, agent: &AgentId) -> String {
        format!("{}.agent.{}.steal", self.prefix, agent)
    }

    /// Coordinator -> agent: report batches handled durably.
    pub fn agent_ack(&self, agent: &AgentId) -> String {
        format!("{}.agent.{}.ack", self.prefix, agent)
    }

    /// Agent -> coordinators: this agent's heartbeats (one subject per agent, so NATS
    /// permissions can keep an agent from speaking for another).
    pub fn heartbeat_of(&self, agent: &AgentId) -> String {
        format!("{}.agent.{}.hb", self.prefix, agent)
    }

    /// Every agent's heartbeats (what coordinators subscribe to).
    pub fn heartbeats(&self) -> String {
        format!("{}.agent.*.hb", self.prefix)
    }

    /// Agent -> coordinators: this agent's batched attempt reports.
    pub fn reports_of(&self, agent: &AgentId) -> String {
        format!("{}.coord.reports.{}", self.prefix, agent)
    }

    /// Every agent's reports (what coordinators subscribe to).
    pub fn reports(&self) -> String {
        format!("{}.coord.reports.*", self.prefix)
    }

    /// The agent a per-agent subject (`heartbeat_of`, `reports_of`) is about.
    pub fn agent_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        if let Some(r) = rest.strip_prefix("coord.reports.") {
            return Some(r);
        }
        rest.strip_prefix("agent.")?.strip_suffix(".hb")
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

    /// Coordinator -> watchers: a flow body's own log lines.
    pub fn run_log(&self, run: FlowRunId) -> String {
        format!("{}.run.{}.log", self.prefix, run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_use_the_prefix() {
        let s = Subjects::new("acme.flows.");
        let a1 = AgentId("a1".into());
        assert_eq!(s.heartbeat_of(&a1), "acme.flows.agent.a1.hb");
        assert_eq!(s.agent_of(&s.heartbeat_of(&a1)), Some("a1"));
        assert_eq!(s.agent_of(&s.reports_of(&a1)), Some("a1"));
        assert_eq!(s.agent_of("acme.flows.agent.a1.spawn"), None);
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
