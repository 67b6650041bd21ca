//! The agent's side of the NATS transport: takes attempts from its spawn subject, reports
//! back in batches, heartbeats with the list of what it runs, and drains on shutdown.

mod identity;
mod outbox;
mod reports;
mod store_check;

pub use store_check::check_store;

use identity::*;
use outbox::*;
use reports::*;
use store_check::*;

use bytes::Bytes;
use futures_util::StreamExt;
use ractor::ActorRef;
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::ids::{AttemptId, FlowRunId};
use pinazu_shared::nats::Drops;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::Subjects;
use pinazu_shared::wire::{
    Heartbeat, Report, ReportAck, ReportBatch, RunningAttempt, SpawnTask, StealRequest,
};

use crate::agent::{spawn_agent, AgentConfig, AgentMsg, StealAsk};

/// Reports per published batch, at most.
pub(super) const MAX_BATCH: usize = 512;

/// Settings of a NATS-connected agent.
#[derive(Clone)]
pub struct AgentServeConfig {
    /// Where large arguments and results go (shared with the coordinator).
    pub store: Arc<dyn ObjectStore>,
    /// Results above this many bytes go to the store and travel by reference.
    pub payload_threshold: usize,
    /// The agent.
    pub agent: AgentConfig,
    /// Subjects.
    pub subjects: Subjects,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// On shutdown, how long running attempts may take to finish.
    pub drain_timeout: Duration,
    /// Prometheus metrics, when served (`agent --metrics`).
    pub metrics: Option<Arc<crate::metrics::AgentMetrics>>,
}

#[derive(Default)]
pub(super) struct Tracker {
    /// Started, until their report is in the outbox.
    running: HashSet<RunningAttempt>,
    /// Received and not started yet (in the agent's queue, or their arguments being
    /// read).
    waiting: HashSet<RunningAttempt>,
}

impl Tracker {
    pub(super) fn wait(&mut self, a: RunningAttempt) {
        self.waiting.insert(a);
    }

    pub(super) fn start(&mut self, a: RunningAttempt) {
        self.waiting.remove(&a);
        self.running.insert(a);
    }

    /// Reported ended, or handed back unstarted.
    pub(super) fn end(&mut self, a: &RunningAttempt) {
        self.waiting.remove(a);
        self.running.remove(a);
    }

    /// Forgets every attempt (its task supervisor failed: they are gone).
    pub(super) fn clear(&mut self) {
        self.running.clear();
        self.waiting.clear();
    }

    /// Attempts here, running or waiting.
    pub(super) fn len(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// What a heartbeat lists: running ones, then waiting ones (`queued`).
    fn listed(&self) -> Vec<RunningAttempt> {
        let mut v: Vec<_> = self.running.iter().copied().collect();
        v.extend(
            self.waiting
                .iter()
                .map(|a| RunningAttempt { queued: true, ..*a }),
        );
        v
    }
}

/// Empties the agent's queue (the attempts never start here) and takes them off the list
/// of what runs here; how many there were.
async fn drop_queue(agent: &ActorRef<AgentMsg>, tracker: &Mutex<Tracker>, idle: &Notify) -> usize {
    let dropped = ractor::call!(agent, AgentMsg::Steal, StealAsk::ALL).unwrap_or_default();
    forget_given(tracker, idle, &dropped);
    dropped.len()
}

/// Attempts that left the agent's queue unstarted (handed back or dropped) leave the
/// list of what runs here.
pub(super) fn forget_given(tracker: &Mutex<Tracker>, idle: &Notify, given: &[SpawnTask]) {
    if let Ok(mut t) = tracker.lock() {
        for task in given {
            t.end(&RunningAttempt::new(
                task.flow_run_id,
                task.call_id,
                task.attempt_id,
            ));
        }
        if t.len() == 0 {
            idle.notify_waiters();
        }
    }
}

pub(super) fn heartbeat(
    cfg: &AgentServeConfig,
    tracker: &Mutex<Tracker>,
    draining: bool,
    leaving: bool,
) -> Heartbeat {
    let running: Vec<_> = match tracker.lock() {
        Ok(t) => t.listed(),
        Err(_) => Vec::new(),
    };
    if let Some(m) = &cfg.metrics {
        m.set_running(running.iter().filter(|a| !a.queued).count());
    }
    Heartbeat {
        info: cfg.agent.info(),
        running,
        draining,
        leaving,
    }
}

pub(super) async fn publish(
    client: &async_nats::Client,
    subject: String,
    body: &impl serde::Serialize,
) {
    match encode_envelope(body) {
        Ok(b) => {
            publish_bytes(client, subject, Bytes::from(b)).await;
        }
        Err(e) => tracing::error!(error = %e, "could not encode a message"),
    }
}

/// How long a publish may wait for room in the client's buffer (full while NATS is
/// unreachable): the agent's loop never blocks on NATS, so it heartbeats, checks its
/// id and stops on a signal whatever the connection does.
pub(super) const PUBLISH_WAIT: Duration = Duration::from_secs(2);

/// Whether it went out (it did not: the connection is down, or the client's queue full).
pub(super) async fn publish_bytes(
    client: &async_nats::Client,
    subject: String,
    body: Bytes,
) -> bool {
    match tokio::time::timeout(PUBLISH_WAIT, client.publish(subject, body)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "NATS publish failed");
            false
        }
        Err(_) => {
            tracing::debug!("NATS publish timed out (connection down)");
            false
        }
    }
}

/// Runs an agent on NATS until `shutdown` resolves, then drains: advertises `draining`,
/// lets running attempts finish (up to the drain timeout), sends their reports and a
/// `leaving` heartbeat, and returns.
pub async fn serve_agent(
    client: async_nats::Client,
    cfg: AgentServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let subjects = cfg.subjects.clone();
    let agent_id = cfg.agent.id.clone();
    let incarnation = fastrand::u64(..);
    // an id whose subjects this NATS user may not use (per-agent users,
    // scripts/nats-auth.conf) is refused now, not found out as silence: one of them is
    // subscribed to (its acknowledgements: harmless) before the id is claimed, and
    // NATS's objection, which it sends before answering what follows, is looked for
    // once the claim's round trips are done
    let probe = client
        .subscribe(subjects.agent_ack(&agent_id))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    // one process per id: a second one would run every attempt sent to the id twice
    let (whois, me) = claim_id(&client, &subjects, &agent_id, incarnation).await?;
    // (the objection reaches the event handler a moment after it was read)
    for _ in 0..5 {
        if let Some(e) = refused(&subjects, &agent_id, false) {
            whois.abort();
            return Err(e);
        }
        tokio::task::yield_now().await;
    }
    drop(probe);
    tokio::pin!(shutdown);
    // the coordinator's store must be this agent's too (large payloads go through it):
    // no work is taken before a coordinator has answered that question
    let mut waiting_since: Option<Instant> = None;
    loop {
        if !matches!(
            probe_once(&client, &subjects, &*cfg.store).await,
            Probe::NoCoordinator
        ) {
            break;
        }
        if waiting_since.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            tracing::info!(agent = %agent_id, "waiting for a coordinator (this agent takes work once one has confirmed it shares its store)");
            waiting_since = Some(Instant::now());
        }
        tokio::select! {
            _ = &mut shutdown => {
                whois.abort();
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    check_store(&client, &subjects, &*cfg.store).await?;
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let idle = Arc::new(Notify::new());
    // asks the serve loop to check the id now (after a freeze)
    let recheck_id = Arc::new(Notify::new());
    let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
    let freeze = Arc::new(FreezeWatch::new());
    let sink = Arc::new(NatsReportSink {
        agent_id: agent_id.clone(),
        tx: Mutex::new(Some(tx)),
        tracker: tracker.clone(),
        metrics: cfg.metrics.clone(),
        freeze: freeze.clone(),
        idle: idle.clone(),
    });

    // reports: one task, so their order is kept; batched under load, numbered, and kept
    // until the coordinator acknowledges them
    let outbox = Arc::new(Mutex::new(Outbox::new(incarnation)));
    let mut reporter = {
        let client = client.clone();
        let subject = subjects.reports_of(&agent_id);
        let (store, threshold) = (cfg.store.clone(), cfg.payload_threshold);
        let (outbox, agent_id) = (outbox.clone(), agent_id.clone());
        let (tracker, idle) = (tracker.clone(), idle.clone());
        tokio::spawn(async move {
            // a report that did not fit the previous batch
            let mut carried: Option<Report> = None;
            loop {
                let first = match carried.take() {
                    Some(r) => r,
                    None => match rx.recv().await {
                        Some(r) => r,
                        None => break,
                    },
                };
                // batches stay under the payload threshold (results above it go by
                // reference), so a batch always fits in a NATS message
                let mut bytes = report_size(&first, threshold);
                let mut reports = vec![first];
                while reports.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => {
                            let size = report_size(&r, threshold);
                            if bytes + size > threshold {
                                carried = Some(r);
                                break;
                            }
                            bytes += size;
                            reports.push(r);
                        }
                        Err(_) => break,
                    }
                }
                // large results of a batch are stored side by side
                futures_util::future::join_all(reports.iter_mut().filter_map(|r| match r {
                    Report::Finished(f) => {
                        if let Err(e) = &mut f.outcome {
                            redact_error(e);
                        }
                        Some(store_large_result(&*store, threshold, f))
                    }
                    Report::Started(_) => None,
                }))
                .await;
                let encoded = match outbox.lock() {
                    Ok(mut o) => {
                        o.seq += 1;
                        let batch = ReportBatch {
                            agent_id: agent_id.clone(),
                            incarnation: o.incarnation,
                            seq: o.seq,
                            acked: o.acked,
                            reports,
                        };
                        let encoded = encode_envelope(&batch);
                        if let Ok(mut t) = tracker.lock() {
                            for r in &batch.reports {
                                if let Report::Finished(f) = r {
                                    t.end(&RunningAttempt::new(
                                        f.flow_run_id,
                                        f.call_id,
                                        f.attempt_id,
                                    ));
                                }
                            }
                            if t.len() == 0 {
                                idle.notify_waiters();
                            }
                        }
                        let size = encoded.as_ref().map_or(0, Vec::len);
                        o.keep(batch, size);
                        encoded
                    }
                    Err(_) => break,
                };
                match encoded {
                    // kept in the outbox: sent again later if this is lost
                    Ok(b) => {
                        publish_bytes(&client, subject.clone(), Bytes::from(b)).await;
                    }
                    Err(e) => tracing::error!(error = %e, "could not encode reports"),
                }
            }
        })
    };

    let agent: ActorRef<AgentMsg> = spawn_agent(cfg.agent.clone(), sink.clone())
        .await
        .map_err(|e| format!("could not start the agent actor: {e}"))?;

    let drops = Arc::new(Drops::default());
    let mut spawns = client
        .subscribe(subjects.agent_spawn(&agent_id))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut cancels = client
        .subscribe(subjects.agent_cancel(&agent_id))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut hello = client
        .subscribe(subjects.hello())
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut acks = client
        .subscribe(subjects.agent_ack(&agent_id))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut steals = client
        .subscribe(subjects.agent_steal(&agent_id))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;

    // a process that was frozen (SIGSTOP, a paused VM) finds spawns NATS queued for it
    // meanwhile: the coordinator took it for dead and sent those attempts elsewhere, and
    // another process may hold its id now. They are dropped (until a heartbeat had time
    // to reach the coordinator), and the id is checked again at once.

    // (the watch starts from now: setting up since it was made is no freeze)
    freeze.beat_ms.store(freeze.now_ms(), Relaxed);
    let ticker = {
        let (freeze, recheck) = (freeze.clone(), recheck_id.clone());
        let (a, tr, idle) = (agent.clone(), tracker.clone(), idle.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if freeze.beat() {
                    recheck.notify_one();
                }
                if freeze.take_froze() {
                    // attempts waiting here may have run elsewhere meanwhile (the
                    // coordinator took this process for dead): dropped, unstarted; any
                    // still wanted here is missing from the heartbeats, so taken for
                    // lost and sent again
                    let n = drop_queue(&a, &tr, &idle).await;
                    if n > 0 {
                        tracing::warn!(attempts = n, "this process was frozen: the attempts waiting in its queue are dropped (the coordinator sends them again)");
                    }
                }
            }
        })
    };
    let (a, d, s, store) = (
        agent.clone(),
        drops.clone(),
        sink.clone(),
        cfg.store.clone(),
    );
    let (frozen, recheck) = (freeze.clone(), recheck_id.clone());
    let spawn_loop = tokio::spawn(async move {
        while let Some(msg) = spawns.next().await {
            if frozen.dropping() {
                recheck.notify_one();
                d.record(&msg.subject, &"sent while this process was frozen; dropped (the coordinator sends it elsewhere)");
                continue;
            }
            match decode_envelope::<Vec<SpawnTask>>(&msg.payload) {
                Ok(tasks) => {
                    let (by_ref, inline): (Vec<_>, Vec<_>) =
                        tasks.into_iter().partition(|t| t.args_ref.is_some());
                    // listed from now (waiting, until they start)
                    if let Ok(mut t) = s.tracker.lock() {
                        for task in &inline {
                            t.wait(RunningAttempt::new(
                                task.flow_run_id,
                                task.call_id,
                                task.attempt_id,
                            ));
                        }
                    }
                    if !inline.is_empty() {
                        let _ = a.send_message(AgentMsg::Spawn(inline));
                    }
                    for task in by_ref {
                        let (a, s, store) = (a.clone(), s.clone(), store.clone());
                        tokio::spawn(async move { fetch_args(&*store, &a, &s, task).await });
                    }
                }
                Err(e) => d.record(&msg.subject, &e),
            }
        }
    });
    let (a, d) = (agent.clone(), drops.clone());
    let cancel_loop = tokio::spawn(async move {
        while let Some(msg) = cancels.next().await {
            match decode_envelope::<Vec<(FlowRunId, AttemptId)>>(&msg.payload) {
                Ok(attempts) => {
                    let _ = a.send_message(AgentMsg::Cancel(attempts));
                }
                Err(e) => d.record(&msg.subject, &e),
            }
        }
    });

    // a coordinator asks back attempts waiting here, for an idle agent: they leave
    // the heartbeat's list as they leave the queue (a lost reply: the coordinator
    // takes them for lost and runs them again)
    let (a, d, tr, c) = (
        agent.clone(),
        drops.clone(),
        tracker.clone(),
        client.clone(),
    );
    let idle_s = idle.clone();
    let max_bytes = cfg.payload_threshold / 2;
    let steal_loop = tokio::spawn(async move {
        while let Some(msg) = steals.next().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let ask = match decode_envelope::<StealRequest>(&msg.payload) {
                Ok(r) => StealAsk {
                    epochs: Some(std::iter::once(r.epoch).chain(r.also).collect()),
                    max: r.max as usize,
                    max_bytes,
                },
                Err(e) => {
                    d.record(&msg.subject, &e);
                    continue;
                }
            };
            // (no time bound here: the supervisor always answers, and what it hands
            // back must leave the list of what runs here)
            let given = ractor::call!(a, AgentMsg::Steal, ask).unwrap_or_default();
            forget_given(&tr, &idle_s, &given);
            match encode_envelope(&given) {
                Ok(b) => {
                    let _ = c.publish(reply, Bytes::from(b)).await;
                }
                Err(e) => tracing::error!(error = %e, "could not encode attempts handed back"),
            }
        }
    });

    let (o, d, acked) = (outbox.clone(), drops.clone(), Arc::new(Notify::new()));
    let all_acked = acked.clone();
    let ack_loop = tokio::spawn(async move {
        while let Some(msg) = acks.next().await {
            match decode_envelope::<ReportAck>(&msg.payload) {
                Ok(ack) => {
                    if let Ok(mut o) = o.lock() {
                        o.ack(ack.incarnation, ack.seq, ack.runs.as_deref());
                        if o.kept.is_empty() {
                            acked.notify_waiters();
                        }
                    }
                }
                Err(e) => d.record(&msg.subject, &e),
            }
        }
    });

    // a coordinator (re)started: it gets every unacknowledged batch again, then a
    // heartbeat listing what runs here
    let hello_now = Arc::new(Notify::new());
    let b = hello_now.clone();
    let hello_loop = tokio::spawn(async move {
        while hello.next().await.is_some() {
            b.notify_one();
        }
    });

    let hb_subject = subjects.heartbeat_of(&agent_id);
    tracing::info!(agent = %agent_id, slots = cfg.agent.slots, tasks = cfg.agent.registry.task_names().len(), "agent serving");
    publish(
        &client,
        hb_subject.clone(),
        &heartbeat(&cfg, &tracker, false, false),
    )
    .await;
    // why this process cannot serve: (message, whether it must leave at once)
    let (misfit_tx, mut misfit_rx) = mpsc::unbounded_channel::<(String, bool)>();
    // one background check of each kind at a time, and none while NATS is unreachable
    let (id_checking, store_checking) = (
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let mut tick = tokio::time::interval(cfg.heartbeat);
    // the id is checked again now and then: after a partition or a NATS restart two
    // processes may hold it (each started while the other was unreachable); the newer
    // one stops
    let mut id_check =
        tokio::time::interval_at(tokio::time::Instant::now() + ID_CHECK_EVERY, ID_CHECK_EVERY);
    id_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reports_subject = subjects.reports_of(&agent_id);
    let mut failure: Option<String> = None;
    let mut was_connected = true;
    let mut reconnects_seen = pinazu_shared::nats::outage::reconnects();
    loop {
        let all = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                // (later too: permissions changed under a running agent)
                if let Some(e) = refused(&subjects, &agent_id, true) {
                    let _ = misfit_tx.send((e, true));
                }
                false
            }
            after_freeze = async {
                tokio::select! {
                    _ = id_check.tick() => false,
                    _ = recheck_id.notified() => true,
                }
            } => {
                if connected(&client) && !id_checking.swap(true, Relaxed) {
                    let (c, subject, me, tx) = (client.clone(), subjects.agent_whois(&agent_id), me.clone(), misfit_tx.clone());
                    let busy = id_checking.clone();
                    tokio::spawn(async move {
                        let asked = tokio::time::timeout(Duration::from_secs(5), holders(&c, &subject, me.incarnation, true)).await;
                        if let Ok(Ok(others)) = asked {
                            // after a freeze this process is the stale one: the id was
                            // given to another while it slept, whichever started first
                            if let Some(other) = others.into_iter().find(|o| after_freeze || o.older_than(&me)) {
                                let why = if after_freeze {
                                    "which took it while this process was frozen"
                                } else {
                                    "which started first (both took it while NATS kept them apart)"
                                };
                                let _ = tx.send((format!(
                                    "agent id {} is also held by {other}, {why}: this process leaves now, so that no attempt runs twice. Give each agent its own --agent-id",
                                    me.agent_id
                                ), true));
                            }
                        }
                        busy.store(false, Relaxed);
                    });
                }
                continue;
            }
            _ = hello_now.notified() => {
                // a coordinator (re)started: is its store ours?
                if connected(&client) && !store_checking.swap(true, Relaxed) {
                    let (c, s, store, tx) = (client.clone(), subjects.clone(), cfg.store.clone(), misfit_tx.clone());
                    let busy = store_checking.clone();
                    tokio::spawn(async move {
                        if let Err(e) = check_store(&c, &s, &*store).await {
                            let _ = tx.send((e, false));
                        }
                        busy.store(false, Relaxed);
                    });
                }
                true
            }
            Some((e, at_once)) = misfit_rx.recv() => {
                tracing::error!(agent = %agent_id, "{e}");
                if at_once {
                    // another process holds the id: every attempt here runs there too.
                    // Leave without a word under the id (a `leaving` heartbeat would
                    // make the coordinator drop the other process's attempts)
                    spawn_loop.abort();
                    cancel_loop.abort();
                    steal_loop.abort();
                    hello_loop.abort();
                    ack_loop.abort();
                    whois.abort();
                    reporter.abort();
                    ticker.abort();
                    agent.stop(None);
                    return Err(e);
                }
                // drained like a stop: what runs here finishes and is reported
                failure = Some(e);
                break;
            }
        };
        // the heartbeat first: after a coordinator restart it must arrive within the
        // resumed runs' hold window, whatever the resend costs
        publish(
            &client,
            hb_subject.clone(),
            &heartbeat(&cfg, &tracker, false, false),
        )
        .await;
        // back from a NATS outage: what was sent meanwhile may be lost; sent again now,
        // before the coordinator misses those attempts in the heartbeats and runs them
        // again
        let now_connected = connected(&client);
        let backs = pinazu_shared::nats::outage::reconnects();
        let all = all || (now_connected && (!was_connected || backs != reconnects_seen));
        was_connected = now_connected;
        reconnects_seen = backs;
        resend(&client, &reports_subject, &outbox, all).await;
    }

    // drain: take nothing new, let what runs finish, hand over the reports; the drain
    // timeout bounds all of it (NATS may be down: every wait on it is inside)
    tracing::info!(agent = %agent_id, timeout_s = cfg.drain_timeout.as_secs(), "draining: finishing running attempts, taking no new ones");
    // attempts waiting in its queue are handed back, unstarted: they leave the list the
    // draining heartbeat shows, so the coordinator sends them to other agents (started
    // here, they could outlast the drain and run twice)
    let n = drop_queue(&agent, &tracker, &idle).await;
    if n > 0 {
        tracing::info!(attempts = n, "draining: attempts waiting in the queue handed back (the coordinator runs them elsewhere)");
    }
    let drain = async {
        publish(
            &client,
            hb_subject.clone(),
            &heartbeat(&cfg, &tracker, true, false),
        )
        .await;
        loop {
            let busy = tracker.lock().map(|t| t.len()).unwrap_or(0);
            if busy == 0 {
                break;
            }
            tokio::select! {
                _ = idle.notified() => {}
                _ = tokio::time::sleep(cfg.heartbeat) => {
                    publish(&client, hb_subject.clone(), &heartbeat(&cfg, &tracker, true, false)).await;
                }
            }
        }
        spawn_loop.abort();
        cancel_loop.abort();
        steal_loop.abort();
        agent.stop(None);
        sink.close();
        let _ = (&mut reporter).await;
        // the coordinator acknowledges the last results, so none is lost if it
        // restarts right now
        loop {
            let pending = outbox.lock().map(|o| o.kept.len()).unwrap_or(0);
            if pending == 0 {
                break;
            }
            let wait = all_acked.notified();
            tokio::select! {
                _ = wait => {}
                _ = hello_now.notified() => resend(&client, &reports_subject, &outbox, true).await,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    resend(&client, &reports_subject, &outbox, false).await
                }
            }
        }
    };
    let drained = tokio::time::timeout(cfg.drain_timeout, drain).await.is_ok();
    if !drained {
        let running = tracker.lock().map(|t| t.len()).unwrap_or(0);
        let pending = outbox.lock().map(|o| o.kept.len()).unwrap_or(0);
        tracing::warn!(
            agent = %agent_id,
            running,
            unacknowledged_batches = pending,
            "drain timeout: leaving now; attempts still running and results the coordinator has not acknowledged are lost to this agent (the coordinator runs those calls again)"
        );
        spawn_loop.abort();
        cancel_loop.abort();
        steal_loop.abort();
        agent.stop(None);
        sink.close();
        reporter.abort();
    }
    hello_loop.abort();
    ack_loop.abort();
    whois.abort();
    ticker.abort();
    // a last word, if NATS takes it within a second
    let leaving = async {
        publish(&client, hb_subject, &heartbeat(&cfg, &tracker, true, true)).await;
        client.flush().await
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(1), leaving).await,
        Ok(Ok(()))
    ) {
        tracing::warn!(agent = %agent_id, "could not say goodbye to the coordinator (NATS unreachable); it notices in a few seconds");
    }
    tracing::info!(agent = %agent_id, dropped = drops.count(), drained, "agent stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
