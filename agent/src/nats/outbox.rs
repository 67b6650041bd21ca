//! Report batches kept until the coordinators acknowledge them, bounded, and sent
//! again to whoever answers for their runs now.

use bytes::Bytes;
use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pinazu_shared::codec::encode_envelope;
use pinazu_shared::ids::FlowRunId;
use pinazu_shared::wire::{Report, ReportBatch};

use super::*;

/// Report batches sent and not yet acknowledged. Every batch stays here until
/// acknowledged, so a coordinator that died before journaling its results gets them
/// again from its successor (on its hello, or after `RESEND_AFTER`). With several
/// coordinators each acknowledges the runs it answers for: a batch leaves once every
/// run in it is acknowledged, and is sent again with only the reports still pending.
pub(super) struct Outbox {
    /// This process's incarnation (random).
    pub(super) incarnation: u64,
    /// The last batch number used.
    pub(super) seq: u64,
    /// Every batch up to this one is acknowledged whole.
    pub(super) acked: u64,
    /// Batches not acknowledged whole, oldest first.
    pub(super) kept: VecDeque<Kept>,
    /// The encoded size of `kept`.
    pub(super) bytes: usize,
    /// Batches dropped since the last warning, and when it was given.
    pub(super) dropped: u64,
    pub(super) warned: Option<Instant>,
}

pub(super) struct Kept {
    pub(super) batch: ReportBatch,
    /// When last sent.
    pub(super) at: Instant,
    /// Encoded size.
    pub(super) size: usize,
    /// Runs whose reports in it are not acknowledged yet.
    pub(super) pending: HashSet<FlowRunId>,
}

/// Unacknowledged batches are sent again after this long.
pub(super) const RESEND_AFTER: Duration = Duration::from_secs(10);

impl Outbox {
    /// Empty, for this process's incarnation.
    pub(super) fn new(incarnation: u64) -> Outbox {
        Outbox {
            incarnation,
            seq: 0,
            acked: 0,
            kept: VecDeque::new(),
            bytes: 0,
            dropped: 0,
            warned: None,
        }
    }

    /// Takes an acknowledgement; one addressed to another process that had this id
    /// before (another incarnation; 0 is from a coordinator that does not say) is
    /// ignored, or it would drop batches that coordinator never saw.
    pub(super) fn ack(&mut self, incarnation: u64, seq: u64, runs: Option<&[FlowRunId]>) {
        if incarnation != 0 && incarnation != self.incarnation {
            return;
        }
        match runs {
            None => {
                for k in self.kept.iter_mut().take_while(|k| k.batch.seq <= seq) {
                    k.pending.clear();
                }
            }
            Some(runs) => {
                for k in self.kept.iter_mut().take_while(|k| k.batch.seq <= seq) {
                    for r in runs {
                        k.pending.remove(r);
                    }
                }
            }
        }
        while self.kept.front().is_some_and(|k| k.pending.is_empty()) {
            if let Some(k) = self.kept.pop_front() {
                self.bytes -= k.size;
                self.acked = self.acked.max(k.batch.seq);
            }
        }
        self.acked = self.acked.max(match runs {
            None => seq,
            Some(_) => 0,
        });
    }

    /// Keeps a batch until acknowledged. Beyond `MAX_KEPT` batches or `MAX_KEPT_BYTES`
    /// the oldest are dropped, and counted as acknowledged: the coordinator must not
    /// wait for them (their attempts left the heartbeat's list, so the coordinator
    /// takes them for lost and runs their calls again).
    pub(super) fn keep(&mut self, batch: ReportBatch, size: usize) {
        let pending = batch.reports.iter().map(report_run).collect();
        self.kept.push_back(Kept {
            batch,
            at: Instant::now(),
            size,
            pending,
        });
        self.bytes += size;
        while self.kept.len() > MAX_KEPT || (self.bytes > MAX_KEPT_BYTES && self.kept.len() > 1) {
            if let Some(k) = self.kept.pop_front() {
                self.bytes -= k.size;
                self.acked = self.acked.max(k.batch.seq);
                self.dropped += 1;
            }
        }
        // (one warning every 5 s at most, with the count since the last one)
        if self.dropped > 0
            && self
                .warned
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            tracing::warn!(
                dropped = self.dropped,
                kept = self.kept.len(),
                bytes = self.bytes,
                "too many reports unacknowledged (coordinator unreachable?): dropped the oldest; calls whose results the coordinator did not hold yet run again"
            );
            self.dropped = 0;
            self.warned = Some(Instant::now());
        }
    }

    /// Batches to send again: all of them, or those unacknowledged for `RESEND_AFTER`,
    /// with the reports still pending; each carries the current acknowledgement, so a
    /// new coordinator knows where the agent's sequence stands.
    pub(super) fn resend(&mut self, all: bool) -> Vec<Vec<u8>> {
        let now = Instant::now();
        let stale = self
            .kept
            .front()
            .is_some_and(|k| now.duration_since(k.at) >= RESEND_AFTER);
        if !(all || stale) {
            return Vec::new();
        }
        let acked = self.acked;
        self.kept
            .iter_mut()
            .filter(|k| !k.pending.is_empty())
            .filter_map(|k| {
                k.at = now;
                k.batch.acked = acked;
                if k.batch
                    .reports
                    .iter()
                    .all(|r| k.pending.contains(&report_run(r)))
                {
                    return encode_envelope(&k.batch).ok();
                }
                let partial = ReportBatch {
                    agent_id: k.batch.agent_id.clone(),
                    incarnation: k.batch.incarnation,
                    seq: k.batch.seq,
                    acked,
                    reports: k
                        .batch
                        .reports
                        .iter()
                        .filter(|r| k.pending.contains(&report_run(r)))
                        .cloned()
                        .collect(),
                };
                encode_envelope(&partial).ok()
            })
            .collect()
    }
}

pub(super) fn report_run(r: &Report) -> FlowRunId {
    match r {
        Report::Started(s) => s.flow_run_id,
        Report::Finished(f) => f.flow_run_id,
    }
}

/// Unacknowledged batches kept at most, and their bytes; beyond, the oldest are dropped
/// (their calls are run again by the coordinator, which takes those attempts for lost).
/// Batches are small (often one report): a coordinator that cannot journal for 10 s
/// (a NATS cluster electing a leader) must not make agents drop what they hold.
pub(super) const MAX_KEPT: usize = 65_536;
pub(super) const MAX_KEPT_BYTES: usize = 64 << 20;

/// Sends unacknowledged report batches again (all, or those waiting too long).
pub(super) async fn resend(
    client: &async_nats::Client,
    subject: &str,
    outbox: &Mutex<Outbox>,
    all: bool,
) {
    if !connected(client) {
        // sent once the connection is back (the next tick finds them stale)
        return;
    }
    let batches = match outbox.lock() {
        Ok(mut o) => o.resend(all),
        Err(_) => return,
    };
    if !batches.is_empty() {
        tracing::debug!(
            batches = batches.len(),
            all,
            "sending unacknowledged reports again"
        );
    }
    // (stopping at the first that does not go out: with the connection lost meanwhile
    // each would wait its publish bound, and tens of thousands would hold up the
    // heartbeats for hours; the rest go again on the next hello or after RESEND_AFTER)
    for b in batches {
        if !connected(client) || !publish_bytes(client, subject.to_string(), Bytes::from(b)).await {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinazu_shared::wire::AttemptStarted;

    fn started(run: FlowRunId) -> Report {
        Report::Started(AttemptStarted {
            flow_run_id: run,
            call_id: pinazu_shared::ids::CallId { key: 1, seq: 0 },
            attempt_id: pinazu_shared::ids::AttemptId::new(1, 1),
            agent_id: pinazu_shared::ids::AgentId("a".into()),
        })
    }

    fn outbox_of(incarnation: u64, batches: &[(u64, Vec<FlowRunId>)]) -> Outbox {
        let mut o = Outbox::new(incarnation);
        for (seq, runs) in batches {
            o.seq = *seq;
            o.keep(
                ReportBatch {
                    agent_id: pinazu_shared::ids::AgentId("a".into()),
                    incarnation,
                    seq: *seq,
                    acked: 0,
                    reports: runs.iter().map(|r| started(*r)).collect(),
                },
                10,
            );
        }
        o
    }

    fn outbox_with(incarnation: u64, seqs: &[u64]) -> Outbox {
        let run = FlowRunId::new();
        let batches: Vec<(u64, Vec<FlowRunId>)> = seqs.iter().map(|s| (*s, vec![run])).collect();
        outbox_of(incarnation, &batches)
    }

    #[test]
    fn with_several_coordinators_a_batch_leaves_once_each_of_its_runs_is_acknowledged() {
        let (a, b) = (FlowRunId::new(), FlowRunId::new());
        let mut o = outbox_of(7, &[(1, vec![a, b]), (2, vec![b])]);
        // the coordinator of run a acknowledges up to 2: batch 1 still holds b's report
        o.ack(7, 2, Some(&[a]));
        assert_eq!(o.kept.len(), 2);
        assert_eq!(o.acked, 0);
        // what is sent again is b's report only
        let again = o.resend(true);
        let first: ReportBatch = decode_envelope(&again[0]).unwrap();
        assert_eq!(first.reports.len(), 1);
        assert_eq!(report_run(&first.reports[0]), b);
        // b's coordinator acknowledges 1 (2 is still on its way): 1 leaves
        o.ack(7, 1, Some(&[b]));
        assert_eq!(o.kept.len(), 1);
        assert_eq!(o.acked, 1);
        o.ack(7, 2, Some(&[b]));
        assert!(o.kept.is_empty());
        assert_eq!((o.acked, o.bytes), (2, 0));
    }

    #[test]
    fn an_acknowledgement_for_another_incarnation_keeps_the_batches() {
        let mut o = outbox_with(7, &[1, 2, 3]);
        o.ack(8, 3, None);
        assert_eq!(
            o.kept.len(),
            3,
            "an ack for the id's previous process drops nothing"
        );
        o.ack(7, 2, None);
        assert_eq!(o.kept.len(), 1);
        o.ack(0, 3, None);
        assert!(o.kept.is_empty(), "an ack without incarnation is taken");
        assert_eq!(o.bytes, 0);
    }

    #[test]
    fn an_overflowing_outbox_drops_the_oldest_and_counts_them_acknowledged() {
        let seqs: Vec<u64> = (1..=MAX_KEPT as u64 + 2).collect();
        let o = outbox_with(7, &seqs);
        assert_eq!(o.kept.len(), MAX_KEPT);
        assert_eq!(o.acked, 2, "the coordinator is not left waiting for a gap");
        assert_eq!(o.kept.front().map(|k| k.batch.seq), Some(3));
        assert_eq!(o.bytes, MAX_KEPT * 10);
    }
}
