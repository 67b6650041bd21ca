//! One process per agent id: who else answers for it, at start and every
//! `ID_CHECK_EVERY`; and whether this NATS user may use the id's subjects at all.

use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::subjects::Subjects;
use pinazu_shared::wire::AgentIdentity;

/// How often an agent checks no other process holds its id.
pub(super) const ID_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Why this agent cannot work under its id, when NATS refused one of the id's subjects
/// to this process's user (per-agent users, scripts/nats-auth.conf); `reporting`: only
/// a refusal of its heartbeats or reports (without those it cannot work at all).
pub(super) fn refused(
    subjects: &Subjects,
    agent_id: &pinazu_shared::ids::AgentId,
    reporting: bool,
) -> Option<String> {
    let quoted = |s: String| format!("\"{s}\"");
    let own_prefix = format!("\"{}.agent.{agent_id}.", subjects.prefix());
    let vital = [
        quoted(subjects.heartbeat_of(agent_id)),
        quoted(subjects.reports_of(agent_id)),
    ];
    let why = pinazu_shared::nats::refusals().into_iter().find(|r| {
        vital.iter().any(|v| r.contains(v.as_str())) || (!reporting && r.contains(&own_prefix))
    })?;
    Some(format!(
        "NATS does not let this agent's user use agent id {agent_id}'s subjects ({why}): with one NATS user per agent (scripts/nats-auth.conf) start the agent with the id its user's permissions name (user agent-1: --agent-id agent-1)"
    ))
}

/// Takes the agent id for this process: refused (an error naming the other process) if a
/// live agent holds it. Asks who holds it, then answers that question itself, then asks
/// again: of two processes started at the same moment, the later one gives way.
pub(super) async fn claim_id(
    client: &async_nats::Client,
    subjects: &Subjects,
    agent_id: &pinazu_shared::ids::AgentId,
    incarnation: u64,
) -> Result<(tokio::task::JoinHandle<()>, AgentIdentity), String> {
    let subject = subjects.agent_whois(agent_id);
    let me = AgentIdentity {
        agent_id: agent_id.clone(),
        host: std::fs::read_to_string("/etc/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into()),
        pid: std::process::id(),
        since: pinazu_shared::events::now_timestamp(),
        incarnation,
    };
    let refuse = |other: &AgentIdentity| {
        format!(
            "agent id {agent_id} is already in use by {other}: two agents with one id would both run every attempt sent to it. Give this agent another --agent-id (or leave it unset for <host>-<pid>-<random>), or stop the other one first"
        )
    };
    if let Some(other) = holders(client, &subject, incarnation, false).await?.first() {
        return Err(refuse(other));
    }
    let mut requests = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let answer = encode_envelope(&me).map_err(|e| e.to_string())?;
    let (c, answer) = (client.clone(), Bytes::from(answer));
    let responder = tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            if let Some(reply) = msg.reply {
                let _ = c.publish(reply, answer.clone()).await;
            }
        }
    });
    // another process that took the id at the same moment: whichever saw the other
    // gives way (both may: then both stop, and neither runs anything twice)
    if let Some(other) = holders(client, &subject, incarnation, true)
        .await?
        .into_iter()
        .next()
    {
        responder.abort();
        return Err(refuse(&other));
    }
    Ok((responder, me))
}

pub(super) fn connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// The other processes answering for an agent id: the first answer only (`all` false:
/// none is the common case, known at once), or every answer within 300 ms.
pub(super) async fn holders(
    client: &async_nats::Client,
    subject: &str,
    incarnation: u64,
    all: bool,
) -> Result<Vec<AgentIdentity>, String> {
    let decode = |payload: &[u8]| {
        decode_envelope::<AgentIdentity>(payload)
            .ok()
            .filter(|i| i.incarnation != incarnation)
    };
    if !all {
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(subject.to_string(), Bytes::new()),
        )
        .await;
        return Ok(match reply {
            Ok(Ok(msg)) => decode(&msg.payload).into_iter().collect(),
            _ => Vec::new(),
        });
    }
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    client
        .publish_with_reply(subject.to_string(), inbox, Bytes::new())
        .await
        .map_err(|e| format!("publish: {e}"))?;
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
        found.extend(decode(&msg.payload));
    }
    Ok(found)
}

/// Notices that this process did not run for a while (stopped, or a paused machine).
pub(super) struct FreezeWatch {
    pub(super) base: Instant,
    /// When the ticker last ran (ms since `base`).
    pub(super) beat_ms: std::sync::atomic::AtomicU64,
    /// Spawns are dropped until then (ms since `base`).
    pub(super) drop_until_ms: std::sync::atomic::AtomicU64,
    /// A freeze was seen and the agent's queue not yet dropped for it.
    pub(super) froze: std::sync::atomic::AtomicBool,
}

/// A gap this long between ticks (every 250 ms) is a freeze.
pub(super) const FROZEN_AFTER: Duration = Duration::from_secs(2);
/// Spawns are dropped this long after a freeze: a heartbeat reaches the coordinator
/// meanwhile, and what it sends after is meant for this process as it is now.
pub(super) const DROP_AFTER_FREEZE: Duration = Duration::from_secs(1);

impl FreezeWatch {
    pub(super) fn new() -> Self {
        FreezeWatch {
            base: Instant::now(),
            beat_ms: std::sync::atomic::AtomicU64::new(0),
            drop_until_ms: std::sync::atomic::AtomicU64::new(0),
            froze: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether this process was frozen and has not ticked since, or spawns are still
    /// being dropped after a freeze (no side effect).
    pub(super) fn holding(&self) -> bool {
        let now = self.now_ms();
        now.saturating_sub(self.beat_ms.load(Relaxed)) > FROZEN_AFTER.as_millis() as u64
            || now < self.drop_until_ms.load(Relaxed)
    }

    /// Whether a freeze was seen since last asked.
    pub(super) fn take_froze(&self) -> bool {
        self.froze.swap(false, Relaxed)
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Whether the gap since the last beat says this process was frozen; then spawns
    /// are dropped for a while.
    pub(super) fn frozen_now(&self, now: u64, last: u64) -> bool {
        if now.saturating_sub(last) > FROZEN_AFTER.as_millis() as u64 {
            self.froze.store(true, Relaxed);
            self.drop_until_ms
                .fetch_max(now + DROP_AFTER_FREEZE.as_millis() as u64, Relaxed);
            tracing::warn!(
                frozen_ms = now.saturating_sub(last),
                "this process did not run for a while (stopped or paused): dropping the attempts sent meanwhile (the coordinator sends them elsewhere) and checking the agent id again"
            );
            return true;
        }
        false
    }

    /// The ticker's beat; true when it found a freeze.
    pub(super) fn beat(&self) -> bool {
        let now = self.now_ms();
        let last = self.beat_ms.swap(now, Relaxed);
        self.frozen_now(now, last)
    }

    /// Whether a spawn arriving now is to be dropped.
    pub(super) fn dropping(&self) -> bool {
        let now = self.now_ms();
        // the spawn loop may wake before the ticker: it looks at the gap itself
        let last = self.beat_ms.load(Relaxed);
        if self.frozen_now(now, last) {
            self.beat_ms.store(now, Relaxed);
            return true;
        }
        now < self.drop_until_ms.load(Relaxed)
    }
}
