//! Agents -> coordinator: heartbeats and report batches (checked against their
//! subject and where each attempt was dispatched), results fetched from the store, and
//! the acknowledgements that let agents drop what is durably handled.

use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::{AgentId, FlowRunId};
use pinazu_shared::nats::Publisher;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::{valid_token, Subjects};
use pinazu_shared::wire::{AttemptFinished, Heartbeat, Report, ReportAck, ReportBatch};

use crate::coordinator::Coordinator;
use crate::scheduler::{Origin, Origins};

use super::ServiceCounters;

/// Takes agents' heartbeats (each on its agent's subject) to the scheduler.
pub(super) fn serve_heartbeats(
    c: Coordinator,
    mut heartbeats: async_nats::Subscriber,
    k: Arc<ServiceCounters>,
    hs: Subjects,
) {
    tokio::spawn(async move {
        while let Some(msg) = heartbeats.next().await {
            match decode_envelope::<Heartbeat>(&msg.payload) {
                // an agent speaks for itself only: the subject (which NATS permissions
                // can restrict per agent) must name the agent the body names
                Ok(hb) if hs.agent_of(&msg.subject) != Some(hb.info.agent_id.0.as_str()) => {
                    k.drops.record(
                        &msg.subject,
                        &format!(
                            "heartbeat of agent {:?} on another agent's subject",
                            hb.info.agent_id.0
                        ),
                    )
                }
                Ok(hb) if valid_token(&hb.info.agent_id.0) => c.heartbeat(hb),
                Ok(hb) => k.drops.record(
                    &msg.subject,
                    &format!("invalid agent id {:?}", hb.info.agent_id.0),
                ),
                Err(e) => k.drops.record(&msg.subject, &e),
            }
        }
    });
}

/// Takes agents' report batches to the runners (each report checked against where its
/// attempt was dispatched), fetches large results, and acknowledges what is handled.
pub(super) fn serve_reports(
    coordinator: Coordinator,
    mut reports: async_nats::Subscriber,
    origins: Arc<Origins>,
    counters: Arc<ServiceCounters>,
    subjects: Subjects,
    publisher: Publisher,
    store: Arc<dyn ObjectStore>,
) {
    let acks = Arc::new(Mutex::new(Acks::default()));
    let ack_due = Arc::new(Notify::new());
    tokio::spawn(acknowledge(
        coordinator.clone(),
        acks.clone(),
        ack_due.clone(),
        publisher.clone(),
        subjects.clone(),
    ));
    let (sink, k, store, rs) = (
        coordinator.result_sink(),
        counters.clone(),
        store,
        subjects.clone(),
    );
    tokio::spawn(async move {
        while let Some(msg) = reports.next().await {
            let batch = match decode_envelope::<ReportBatch>(&msg.payload) {
                Ok(b) if rs.agent_of(&msg.subject) != Some(b.agent_id.0.as_str()) => {
                    k.drops.record(
                        &msg.subject,
                        &format!(
                            "reports of agent {:?} on another agent's subject",
                            b.agent_id.0
                        ),
                    );
                    continue;
                }
                Ok(b) if valid_token(&b.agent_id.0) && b.seq > 0 => b,
                Ok(b) => {
                    k.drops.record(
                        &msg.subject,
                        &format!(
                            "invalid report batch from {:?} (seq {})",
                            b.agent_id.0, b.seq
                        ),
                    );
                    continue;
                }
                Err(e) => {
                    k.drops.record(&msg.subject, &e);
                    continue;
                }
            };
            let meta = BatchMeta {
                agent: batch.agent_id.clone(),
                incarnation: batch.incarnation,
                seq: batch.seq,
                acked: batch.acked,
            };
            let (agent, seq) = (batch.agent_id.clone(), batch.seq);
            let mut runs = Vec::new();
            let mut fetching = 0;
            let mut inline = Vec::with_capacity(batch.reports.len());
            let mut refused: Option<(usize, Arc<str>)> = None;
            for report in batch.reports {
                let (run, attempt) = match &report {
                    Report::Started(s) => (s.flow_run_id, s.attempt_id),
                    Report::Finished(f) => (f.flow_run_id, f.attempt_id),
                };
                // an agent reports only what was dispatched to it
                match origins.of(run, attempt, &agent.0) {
                    Origin::Its | Origin::Unknown => {}
                    Origin::Ended => continue,
                    Origin::Elsewhere(to) => {
                        let n = refused.as_ref().map_or(0, |(n, _)| *n);
                        refused = Some((n + 1, to));
                        continue;
                    }
                }
                match report {
                    Report::Started(s) => inline.push(Report::Started(s)),
                    Report::Finished(f) if f.result_ref.is_some() => {
                        runs.push(f.flow_run_id);
                        fetching += 1;
                        let (sink, store, acks, due) =
                            (sink.clone(), store.clone(), acks.clone(), ack_due.clone());
                        let agent = agent.clone();
                        tokio::spawn(async move {
                            let run = f.flow_run_id;
                            sink.finished(fetch_result(&*store, f).await);
                            if let Ok(mut a) = acks.lock() {
                                a.fetched(&agent, seq, run);
                            }
                            due.notify_one();
                        });
                    }
                    Report::Finished(f) => {
                        runs.push(f.flow_run_id);
                        inline.push(Report::Finished(f));
                    }
                }
            }
            if let Some((n, to)) = refused {
                k.drops.record(
                    &msg.subject,
                    &format!(
                        "{n} report(s) of agent {:?} for attempts dispatched to another agent (e.g. {to:?}): refused",
                        agent.0
                    ),
                );
            }
            sink.report(inline);
            if let Ok(mut a) = acks.lock() {
                a.received(&meta, fetching, runs);
            }
            ack_due.notify_one();
        }
    });
}

/// Who sent a report batch, and where its numbering stands.
struct BatchMeta {
    agent: AgentId,
    incarnation: u64,
    seq: u64,
    acked: u64,
}

/// Report batches received per agent and not yet acknowledged.
#[derive(Default)]
struct Acks {
    agents: HashMap<AgentId, AgentAcks>,
}

#[derive(Default)]
struct AgentAcks {
    /// The agent process these marks belong to.
    incarnation: u64,
    /// Every batch up to this one was received (or is not ours to wait for).
    contiguous: u64,
    /// Batches received above a gap (one went missing; the agent will send it again).
    above: BTreeSet<u64>,
    /// Batches whose large results are still being fetched, with how many.
    fetching: BTreeMap<u64, usize>,
    /// The last acknowledgement sent.
    acked: u64,
    /// When a batch was last received.
    seen: Option<Instant>,
    /// The runs each batch not yet acknowledged handed results to: they get their
    /// `Barrier` in the round that acknowledges the batch, not before and not never.
    touched: BTreeMap<u64, Vec<FlowRunId>>,
}

impl Acks {
    fn received(&mut self, b: &BatchMeta, fetching: usize, runs: Vec<FlowRunId>) {
        let (seq, acked) = (b.seq, b.acked);
        let a = self.agents.entry(b.agent.clone()).or_default();
        if a.incarnation != b.incarnation {
            // a new agent process under this id: its numbering starts again
            *a = AgentAcks {
                incarnation: b.incarnation,
                ..AgentAcks::default()
            };
        }
        a.seen = Some(Instant::now());
        if !runs.is_empty() {
            a.touched.entry(seq).or_default().extend(runs);
        }
        // what the agent saw acknowledged needs nothing from us (e.g. after a restart)
        if acked > a.contiguous {
            a.contiguous = acked;
            a.above.retain(|s| *s > acked);
        }
        if fetching > 0 {
            *a.fetching.entry(seq).or_default() += fetching;
        }
        if seq > a.contiguous {
            a.above.insert(seq);
        }
        while a.above.first() == Some(&(a.contiguous + 1)) {
            a.above.pop_first();
            a.contiguous += 1;
        }
    }

    fn fetched(&mut self, agent: &AgentId, seq: u64, run: FlowRunId) {
        if let Some(a) = self.agents.get_mut(agent) {
            a.touched.entry(seq).or_default().push(run);
            if let Some(n) = a.fetching.get_mut(&seq) {
                *n -= 1;
                if *n == 0 {
                    a.fetching.remove(&seq);
                }
            }
        }
    }

    /// What can be acknowledged once the runs it touched are settled: per agent, the
    /// highest batch with every batch up to it received and its results handed over,
    /// and the runs those batches touched.
    fn due(&mut self) -> (Vec<Due>, Vec<FlowRunId>) {
        let now = Instant::now();
        // forget agents silent for long (they left; their ids are not reused)
        self.agents.retain(|_, a| {
            !a.fetching.is_empty() || a.seen.is_none_or(|t| now.duration_since(t) < AGENT_FORGET)
        });
        let mut due = Vec::new();
        let mut all = HashSet::new();
        for (id, a) in &mut self.agents {
            let ready = match a.fetching.keys().next() {
                Some(first) => a.contiguous.min(first - 1),
                None => a.contiguous,
            };
            // batches up to `ready` are acknowledged in this round (or were before: a
            // batch sent again, already journaled)
            let later = a.touched.split_off(&(ready.max(a.acked) + 1));
            let mut runs = HashSet::new();
            for (_, r) in std::mem::replace(&mut a.touched, later) {
                runs.extend(r);
            }
            all.extend(runs.iter().copied());
            // batches sent again (their acknowledgement was lost, or they wait for
            // another coordinator's runs) are acknowledged again
            if ready > a.acked || !runs.is_empty() {
                due.push(Due {
                    agent: id.clone(),
                    incarnation: a.incarnation,
                    seq: ready.max(a.acked),
                    runs: runs.into_iter().collect(),
                });
            }
        }
        (due, all.into_iter().collect())
    }

    fn sent(&mut self, agent: &AgentId, seq: u64) {
        if let Some(a) = self.agents.get_mut(agent) {
            a.acked = a.acked.max(seq);
        }
    }
}

/// An acknowledgement due to an agent: every batch up to `seq`, which touched `runs`.
#[derive(Debug, PartialEq, Eq)]
struct Due {
    agent: AgentId,
    incarnation: u64,
    seq: u64,
    runs: Vec<FlowRunId>,
}

/// Agents silent this long are forgotten by the acknowledger.
const AGENT_FORGET: Duration = Duration::from_secs(600);

/// Acknowledges report batches to their agents once their results are durable: the
/// runners that got them have handled them and the journal is flushed. Rounds run
/// back to back under load, so one round covers many batches.
async fn acknowledge(
    c: Coordinator,
    acks: Arc<Mutex<Acks>>,
    due: Arc<Notify>,
    publisher: Publisher,
    subjects: Subjects,
) {
    let mut owners = OwnerCache::new();
    loop {
        due.notified().await;
        let Ok((ready, runs)) = acks.lock().map(|mut a| a.due()) else {
            return;
        };
        if ready.is_empty() {
            continue;
        }
        if let Err(e) = c.settle_runs(runs).await {
            // nothing is acknowledged; the agents send the batches again later
            tracing::error!(error = %e, "results could not be journaled; not acknowledging them yet");
            tokio::time::sleep(Duration::from_millis(500)).await;
            due.notify_one();
            continue;
        }
        if c.leases().is_some_and(|l| !l.valid()) {
            // this process may have lost its runs while it could not renew its lease:
            // nothing is acknowledged until it knows (agents keep the reports)
            tokio::time::sleep(Duration::from_millis(500)).await;
            due.notify_one();
            continue;
        }
        for d in ready {
            let runs = match c.leases() {
                None => None,
                Some(leases) => Some(answerable(&c, leases, &mut owners, d.runs).await),
            };
            let ack = ReportAck {
                seq: d.seq,
                incarnation: d.incarnation,
                runs,
            };
            match encode_envelope(&ack) {
                Ok(b) => publisher.publish(subjects.agent_ack(&d.agent), Bytes::from(b)),
                Err(e) => tracing::error!(error = %e, "could not encode an acknowledgement"),
            }
            if let Ok(mut a) = acks.lock() {
                a.sent(&d.agent, d.seq);
            }
        }
    }
}

/// Who owns runs this coordinator does not host, as last looked up (for 2 s).
type OwnerCache = HashMap<FlowRunId, (Option<String>, Instant)>;

/// The runs among `runs` whose reports this coordinator answers for (several
/// coordinators): those it hosts (settled just before), and those no other live
/// coordinator owns (ended, or nobody's: their reports are needed by no one).
async fn answerable(
    c: &Coordinator,
    leases: &crate::ha::Leases,
    owners: &mut OwnerCache,
    runs: Vec<FlowRunId>,
) -> Vec<FlowRunId> {
    let now = Instant::now();
    owners.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(2));
    let mut mine = Vec::with_capacity(runs.len());
    for run in runs {
        if c.hosts(run) {
            // (a run fenced here is another coordinator's: its reports are not ours)
            if !c.fenced(run) {
                mine.push(run);
            }
            continue;
        }
        let owner = match owners.get(&run) {
            Some((o, _)) => o.clone(),
            None => {
                let o = match leases.owner(run).await {
                    Ok((o, _)) => o.map(|o| o.coordinator).filter(|c| !c.is_empty()),
                    // unknown now: left to whoever knows (the agent sends it again)
                    Err(_) => continue,
                };
                owners.insert(run, (o.clone(), now));
                o
            }
        };
        // only a run nobody owns (released: it ended) is answered for by anyone; a run
        // whose owner died is the taker's, one claimed here but not hosted yet is not
        // settled
        if owner.is_none() {
            mine.push(run);
        }
    }
    mine
}

/// Loads a result that travelled by reference (the reference stays, so the journal can
/// point at the stored object instead of copying it); a missing or unreadable payload is
/// a failed attempt (retried per the task's policy).
async fn fetch_result(store: &dyn ObjectStore, mut f: AttemptFinished) -> AttemptFinished {
    let Some(key) = f.result_ref.clone() else {
        return f;
    };
    // (the batch is not acknowledged until this settles: the agent keeps the result)
    let read =
        pinazu_shared::store::get_retrying(store, &key, pinazu_shared::store::PUT_RETRY_DELAYS)
            .await;
    f.outcome = match read {
        Ok(Some(bytes)) => {
            return AttemptFinished {
                outcome: Ok(bytes),
                ..f
            }
        }
        Ok(None) => Err(ErrorInfo::new(
            FailureKind::Error,
            format!("the result payload {key} is missing from the store"),
        )),
        Err(e) => Err(ErrorInfo::new(
            FailureKind::Error,
            format!("the result payload {key} could not be read: {e}"),
        )),
    };
    f.result_ref = None;
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(agent: &str, incarnation: u64, seq: u64, acked: u64) -> BatchMeta {
        BatchMeta {
            agent: AgentId(agent.into()),
            incarnation,
            seq,
            acked,
        }
    }

    fn due_for(acks: &mut Acks, agent: &str) -> Option<u64> {
        let (due, _) = acks.due();
        let seq = due.iter().find(|d| d.agent.0 == agent).map(|d| d.seq);
        if let Some(s) = seq {
            acks.sent(&AgentId(agent.into()), s);
        }
        seq
    }

    #[test]
    fn acknowledgements_wait_for_gaps_and_fetches_and_follow_a_restarted_agent() {
        let mut acks = Acks::default();
        let run = FlowRunId::new();
        acks.received(&meta("a", 1, 1, 0), 0, vec![run]);
        acks.received(&meta("a", 1, 3, 0), 0, vec![]);
        // batch 2 is missing: only 1 can be acknowledged
        assert_eq!(due_for(&mut acks, "a"), Some(1));
        assert_eq!(due_for(&mut acks, "a"), None);
        // 2 arrives, with a large result still being fetched: wait for it
        acks.received(&meta("a", 1, 2, 1), 1, vec![run]);
        assert_eq!(due_for(&mut acks, "a"), None);
        acks.fetched(&AgentId("a".into()), 2, run);
        assert_eq!(due_for(&mut acks, "a"), Some(3));
        // the agent restarts under the same id: numbering from 1 again
        acks.received(&meta("a", 2, 1, 0), 0, vec![]);
        assert_eq!(due_for(&mut acks, "a"), Some(1));
        // a new coordinator hears first from an agent whose earlier batches were
        // acknowledged by its predecessor
        let mut fresh = Acks::default();
        fresh.received(&meta("b", 9, 8, 6), 0, vec![]);
        // (6 again: what the agent already has; harmless)
        assert_eq!(due_for(&mut fresh, "b"), Some(6), "7 is still missing");
        assert_eq!(due_for(&mut fresh, "b"), None);
        fresh.received(&meta("b", 9, 7, 6), 0, vec![]);
        assert_eq!(due_for(&mut fresh, "b"), Some(8));
    }

    #[test]
    fn a_batch_sent_again_is_acknowledged_again() {
        let mut acks = Acks::default();
        let r = FlowRunId::new();
        acks.received(&meta("a", 1, 1, 0), 0, vec![r]);
        assert_eq!(due_for(&mut acks, "a"), Some(1));
        // the acknowledgement was lost (or it left r to another coordinator): the agent
        // sends the batch again, and hears about it again
        acks.received(&meta("a", 1, 1, 0), 0, vec![r]);
        let (due, _) = acks.due();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].seq, due[0].runs.clone()), (1, vec![r]));
    }

    #[test]
    fn a_batch_is_acknowledged_only_with_a_barrier_to_the_runs_it_touched() {
        let mut acks = Acks::default();
        let (r1, r2, r3) = (FlowRunId::new(), FlowRunId::new(), FlowRunId::new());
        // batch 2 comes first (1 is missing): nothing to acknowledge yet
        acks.received(&meta("a", 1, 2, 0), 0, vec![r2]);
        let (due, _) = acks.due();
        assert!(due.is_empty());
        // batch 1 arrives: 1 and 2 are due, and both their runs get the barrier
        acks.received(&meta("a", 1, 1, 0), 0, vec![r1]);
        let (due, runs) = acks.due();
        assert_eq!(
            due.iter()
                .map(|d| (d.agent.0.as_str(), d.incarnation, d.seq))
                .collect::<Vec<_>>(),
            vec![("a", 1, 2)]
        );
        assert!(runs.contains(&r1) && runs.contains(&r2), "{runs:?}");
        acks.sent(&AgentId("a".into()), 2);
        // batch 3's large result is still being fetched: not due; once fetched, its run
        // gets the barrier with it
        acks.received(&meta("a", 1, 3, 2), 1, vec![r3]);
        let (due, _) = acks.due();
        assert!(due.is_empty());
        acks.fetched(&AgentId("a".into()), 3, r3);
        let (due, runs) = acks.due();
        assert_eq!(
            due.iter()
                .map(|d| (d.agent.0.as_str(), d.incarnation, d.seq))
                .collect::<Vec<_>>(),
            vec![("a", 1, 3)]
        );
        assert_eq!(due[0].runs, vec![r3]);
        assert_eq!(runs, vec![r3]);
    }
}
