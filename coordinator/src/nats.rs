//! The coordinator's side of the NATS transport: the `AgentLink` that publishes attempts
//! to agents, the `EventSink` that publishes Pinazu Core status events, and the service
//! loops that take agents' heartbeats and reports and answer the API.

use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use pinazu_shared::api::{ApiReply, ApiRequest, RunInfo};
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::{AgentId, AttemptId, FlowRunId};
use pinazu_shared::nats::{Drops, Publisher};
use pinazu_shared::registry::Registry;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::{valid_token, Subjects};
use pinazu_shared::transport::{AgentLink, ResultSink};
use pinazu_shared::wire::{
    payload_key, payload_prefix, AttemptFinished, Heartbeat, Report, ReportAck, ReportBatch,
    SpawnTask,
};
use pinazu_shared::BoxFuture;

use crate::coordinator::{Coordinator, RunOptions, StartError};
use crate::flow_runner::Seeds;
use crate::scheduler::Origin;
use crate::status::EventSink;

/// Publishes attempts and cancellations to agents' subjects. Arguments larger than the
/// payload threshold go to the object store first and travel by reference.
pub struct NatsAgentLink {
    publisher: Publisher,
    subjects: Subjects,
    max_payload: usize,
    payloads: Payloads,
    /// Where an attempt whose arguments cannot be stored is reported failed.
    failures: OnceLock<Arc<dyn ResultSink>>,
    /// The coordinator's lease (several coordinators): nothing is dispatched while it
    /// is stale (the attempts are taken for lost and sent again, or the run moved).
    lease: OnceLock<Arc<crate::ha::Leases>>,
}

/// Where large payloads go, and from what size.
#[derive(Clone)]
pub struct Payloads {
    /// The store (shared with the agents).
    pub store: Arc<dyn ObjectStore>,
    /// Payloads above this many bytes go by reference.
    pub threshold: usize,
}

/// How long storing an attempt's large arguments may take, retries included: less than
/// the scheduler's loss grace (3 s), after which the attempt would be sent again.
const SPAWN_STORE_BOUND: Duration = Duration::from_millis(2500);

impl NatsAgentLink {
    /// A link publishing through `publisher`; batches above `max_payload` are split.
    pub fn new(
        publisher: Publisher,
        subjects: Subjects,
        max_payload: usize,
        payloads: Payloads,
    ) -> Self {
        NatsAgentLink {
            publisher,
            subjects,
            max_payload,
            payloads,
            failures: OnceLock::new(),
            lease: OnceLock::new(),
        }
    }

    /// Where to report attempts that could not be sent (the coordinator's result sink).
    pub fn report_failures_to(&self, sink: Arc<dyn ResultSink>) {
        let _ = self.failures.set(sink);
    }

    /// Dispatches only while this lease is current.
    pub fn guard_with(&self, lease: Arc<crate::ha::Leases>) {
        let _ = self.lease.set(lease);
    }

    /// Stores an attempt's large arguments, then dispatches it; within
    /// [`SPAWN_STORE_BOUND`], or the attempt fails (and is retried per its policy).
    fn spawn_large(&self, agent: &AgentId, mut task: SpawnTask) {
        let subject = self.subjects.agent_spawn(agent);
        let publisher = self.publisher.clone();
        let store = self.payloads.store.clone();
        let failures = self.failures.get().cloned();
        let agent = agent.clone();
        tokio::spawn(async move {
            let key = payload_key(task.flow_run_id, task.call_id, task.attempt_id, "args");
            let size = task.args.len();
            // bounded as a whole (each try may hang on a store that does not answer):
            // past the scheduler's loss grace the attempt is taken for lost and sent
            // again, so this one must not be published after it
            let stored = tokio::time::timeout(
                SPAWN_STORE_BOUND,
                pinazu_shared::store::put_retrying(
                    &*store,
                    &key,
                    std::mem::take(&mut task.args),
                    pinazu_shared::store::PUT_RETRY_DELAYS_SHORT,
                ),
            )
            .await
            .unwrap_or_else(|_| {
                Err(pinazu_shared::error::StoreError::Io {
                    op: "put",
                    key: key.clone(),
                    reason: format!("no answer within {} s", SPAWN_STORE_BOUND.as_secs_f32()),
                })
            });
            match stored {
                Ok(()) => {
                    task.args_ref = Some(key);
                    match encode_envelope(&[task]) {
                        Ok(b) => publisher.publish(subject, Bytes::from(b)),
                        Err(e) => tracing::error!(error = %e, "could not encode an attempt"),
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, size, "large arguments could not be stored; failing the attempt");
                    if let Some(sink) = failures {
                        sink.finished(AttemptFinished {
                            flow_run_id: task.flow_run_id,
                            call_id: task.call_id,
                            attempt_id: task.attempt_id,
                            agent_id: agent,
                            outcome: Err(ErrorInfo::new(
                                FailureKind::Error,
                                format!("arguments of {size} bytes are too large for a NATS message and could not be stored: {e}"),
                            )),
                            result_ref: None,
                            elapsed_us: 0,
                            result_cache_key: None,
                        });
                    }
                }
            }
        });
    }

    fn publish_batch(&self, subject: &str, tasks: &[SpawnTask]) {
        match encode_envelope(&tasks) {
            Ok(bytes) if bytes.len() <= self.max_payload || tasks.len() == 1 => {
                if bytes.len() > self.max_payload {
                    tracing::error!(subject, bytes = bytes.len(), max = self.max_payload, task = %tasks[0].task, "attempt arguments exceed the NATS max payload; the attempt will be reported lost and retried");
                }
                self.publisher
                    .publish(subject.to_string(), Bytes::from(bytes));
            }
            Ok(_) => {
                let (a, b) = tasks.split_at(tasks.len() / 2);
                self.publish_batch(subject, a);
                self.publish_batch(subject, b);
            }
            Err(e) => tracing::error!(subject, error = %e, "could not encode attempts"),
        }
    }
}

impl AgentLink for NatsAgentLink {
    fn spawn(&self, agent: &AgentId, tasks: Vec<SpawnTask>) {
        if self.lease.get().is_some_and(|l| !l.valid()) {
            // this process may have lost its runs (it was stopped or cut off past its
            // lease): the attempts are taken for lost and sent again once it knows
            tracing::debug!(attempts = tasks.len(), "lease stale: not dispatching");
            return;
        }
        let threshold = self.payloads.threshold;
        let (large, small): (Vec<_>, Vec<_>) =
            tasks.into_iter().partition(|t| t.args.len() > threshold);
        if !small.is_empty() {
            self.publish_batch(&self.subjects.agent_spawn(agent), &small);
        }
        for task in large {
            self.spawn_large(agent, task);
        }
    }

    fn cancel(&self, agent: &AgentId, attempts: Vec<(FlowRunId, AttemptId)>) {
        match encode_envelope(&attempts) {
            Ok(b) => self
                .publisher
                .publish(self.subjects.agent_cancel(agent), Bytes::from(b)),
            Err(e) => tracing::error!(error = %e, "could not encode a cancellation"),
        }
    }
}

/// Publishes status events on the Pinazu Core subjects.
pub struct NatsEventSink {
    publisher: Publisher,
}

impl NatsEventSink {
    /// A sink publishing through `publisher`.
    pub fn new(publisher: Publisher) -> Self {
        NatsEventSink { publisher }
    }
}

impl EventSink for NatsEventSink {
    fn publish(&self, subject: &'static str, payload: Bytes) {
        self.publisher.publish(subject.to_string(), payload);
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.publisher.flush())
    }
}

/// Counters of the coordinator service.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// Messages dropped (undecodable, wrong version, invalid).
    pub drops: Drops,
}

/// Serves the coordinator on NATS until the client closes: heartbeats, reports and the
/// API. Returns once every subscription is in place.
pub async fn serve(
    coordinator: Coordinator,
    client: async_nats::Client,
    subjects: Subjects,
    registry: &'static Registry,
    publisher: Publisher,
    payloads: Payloads,
) -> Result<Arc<ServiceCounters>, async_nats::SubscribeError> {
    let counters = Arc::new(ServiceCounters::default());
    // before any heartbeat can register an agent: every dispatch is recorded
    let origins = coordinator.track_origins();
    // an object every agent must be able to read: then it shares this store
    let probe = StoreProbe::start(payloads.store.clone());
    let mut heartbeats = client.subscribe(subjects.heartbeats()).await?;
    let mut reports = client.subscribe(subjects.reports()).await?;
    // one coordinator answers each request (a queue group: several coordinators share
    // the load); a request about a run another coordinator hosts is passed on to that
    // one's own subject (`<prefix>.coord.<id>.api.<verb>`), answered there
    let api = client
        .queue_subscribe(
            format!("{}.api.*", subjects.prefix()),
            API_QUEUE.to_string(),
        )
        .await?;
    let own = match coordinator.leases() {
        Some(l) => Some(
            client
                .subscribe(format!("{}.coord.{}.api.*", subjects.prefix(), l.me()))
                .await?,
        ),
        None => None,
    };
    let mut api = futures_util::stream::select(
        api.map(|m| (m, false)),
        futures_util::stream::iter(own).flatten().map(|m| (m, true)),
    );

    let (c, k, hs) = (coordinator.clone(), counters.clone(), subjects.clone());
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
        payloads.store.clone(),
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

    let (c, k, s, payloads) = (
        coordinator.clone(),
        counters.clone(),
        subjects.clone(),
        payloads.clone(),
    );
    // starts (and rejections, which ask whether an id names a run) are taken one at a
    // time, in order: two starts of one id must not race. Everything else is answered
    // concurrently (a `cancel` waiting for its run to end holds up nothing), at most
    // `API_CONCURRENCY` at once; beyond, the subscription waits (backpressure).
    let api_ctx = Arc::new(ApiCtx {
        c,
        registry,
        subjects: s,
        publisher,
        payloads,
        client,
    });
    let (start_tx, mut start_rx) =
        tokio::sync::mpsc::channel::<(ApiRequest, Option<async_nats::Subject>, bool)>(1024);
    {
        let ctx = api_ctx.clone();
        tokio::spawn(async move {
            while let Some((req, to, passed)) = start_rx.recv().await {
                // a start of a run another live coordinator hosts goes there, without
                // holding up the starts behind it
                if let (
                    ApiRequest::Start {
                        flow_run_id: Some(id),
                        ..
                    },
                    false,
                ) = (&req, passed)
                {
                    if let Some(owner) = ctx.owner_elsewhere(*id).await {
                        let (ctx, id) = (ctx.clone(), *id);
                        tokio::spawn(async move {
                            let reply = match ctx.pass_on(&owner, &req).await {
                                ApiReply::Error(e) => match ctx.c.unhosted_run(id).await {
                                    // its owner does not answer (stopped, or dying): the
                                    // client follows the run while it is taken over
                                    Some(run) => ApiReply::Started {
                                        run,
                                        existing: true,
                                    },
                                    None => ApiReply::Error(e),
                                },
                                reply => reply,
                            };
                            ctx.respond(to, &reply).await;
                        });
                        continue;
                    }
                }
                let reply = ctx.handle(req, passed).await;
                ctx.respond(to, &reply).await;
            }
        });
    }
    let lease_ctx = api_ctx.clone();
    tokio::spawn(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(API_CONCURRENCY));
        while let Some((msg, passed)) = api.next().await {
            let req = match decode_envelope::<ApiRequest>(&msg.payload) {
                Ok(req) => req,
                Err(e) => {
                    k.drops.record(&msg.subject, &e);
                    let reply =
                        ApiReply::Error(format!("malformed request on {}: {e}", msg.subject));
                    api_ctx.respond(msg.reply, &reply).await;
                    continue;
                }
            };
            // each verb has a subject of its own, so NATS permissions can grant some
            // verbs only (agents may ask `store_probe` and nothing else)
            if msg.subject.rsplit('.').next() != Some(verb_of(&req)) {
                let why = format!(
                    "a {:?} request on {}: refused (send it on {})",
                    verb_of(&req),
                    msg.subject,
                    api_ctx.subjects.api(verb_of(&req))
                );
                k.drops.record(&msg.subject, &why);
                api_ctx.respond(msg.reply, &ApiReply::Error(why)).await;
                continue;
            }
            match req {
                ApiRequest::StoreProbe => {
                    let reply = ApiReply::StoreProbe {
                        key: probe.key(),
                        token: probe.token.clone(),
                        store: api_ctx.payloads.store.describe(),
                    };
                    api_ctx.respond(msg.reply, &reply).await;
                }
                req @ (ApiRequest::Start { .. } | ApiRequest::Reject { .. }) => {
                    if start_tx.send((req, msg.reply, passed)).await.is_err() {
                        return;
                    }
                }
                req => {
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let ctx = api_ctx.clone();
                    tokio::spawn(async move {
                        let reply = ctx.handle(req, passed).await;
                        ctx.respond(msg.reply, &reply).await;
                        drop(permit);
                    });
                }
            }
        }
    });
    if let Some(leases) = coordinator.leases().cloned() {
        tokio::spawn(keep_leases(
            coordinator.clone(),
            leases,
            registry,
            subjects.clone(),
            lease_ctx.publisher.clone(),
            lease_ctx.payloads.store.clone(),
        ));
    }
    Ok(counters)
}

/// How long a run taken over waits before its body runs: agents send the results the
/// dead coordinator did not acknowledge and list their running attempts meanwhile.
const TAKEOVER_SETTLE: Duration = Duration::from_millis(1500);

/// Renews this coordinator's lease every second; looks for coordinators that stopped
/// renewing theirs every half second, and takes their runs over (each run resumed from
/// its journal, as after a restart). A lease that lapsed here (this process was stopped
/// or cut off) is renewed, then every hosted run is checked: those another coordinator
/// took meanwhile are let go.
async fn keep_leases(
    c: Coordinator,
    leases: Arc<crate::ha::Leases>,
    registry: &'static Registry,
    subjects: Subjects,
    publisher: Publisher,
    store: Arc<dyn ObjectStore>,
) {
    let mut poll = tokio::time::interval(crate::ha::POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known: HashSet<String> = leases.live().into_iter().collect();
    // coordinators missing from the live set, since when: dead once missing for a
    // second poll in a row (a lease renewed a moment late is not a death)
    let mut missing: HashMap<String, Instant> = HashMap::new();
    // runs orphaned while this coordinator was starting, or whose takeover failed, are
    // looked for again now and then
    let mut last_scan: Option<Instant> = None;
    let mut unhealthy = false;
    let started = Instant::now();
    loop {
        poll.tick().await;
        if leases.suspect() {
            tracing::warn!("this coordinator's lease lapsed (the process was stopped or cut off from NATS): checking which runs are still its own");
            if leases.valid_ignoring_suspicion() {
                c.recheck_ownership().await;
                leases.cleared();
            }
            continue;
        }
        let Ok(live) = leases.poll_live().await else {
            continue;
        };
        let now = Instant::now();
        for id in known.difference(&live) {
            missing.entry(id.clone()).or_insert(now);
        }
        missing.retain(|id, _| !live.contains(id));
        let dead: Vec<String> = missing
            .iter()
            .filter(|(id, since)| {
                id.as_str() != leases.me() && now.duration_since(**since) >= crate::ha::POLL_EVERY
            })
            .map(|(id, _)| id.clone())
            .collect();
        known = live;
        if !leases.healthy() {
            unhealthy = true;
            continue;
        }
        if std::mem::take(&mut unhealthy) && started.elapsed() > crate::ha::LEASE_TTL * 2 {
            // NATS was out of reach: agents send again what may have been lost meanwhile
            // (before this coordinator misses those attempts) and heartbeat now
            publisher.publish(subjects.hello(), Bytes::new());
        }
        let scan_due = last_scan.is_none_or(|t| now.duration_since(t) >= ORPHAN_SCAN_EVERY);
        if !dead.is_empty() || scan_due {
            if !dead.is_empty() {
                tracing::warn!(coordinators = ?dead, "coordinators stopped renewing their leases: taking their runs over");
                for id in &dead {
                    missing.remove(id);
                }
            }
            last_scan = Some(now);
            take_over(&c, &leases, registry, &subjects, &publisher, &store).await;
        }
    }
}

/// How often a coordinator looks for runs nobody alive owns, deaths aside.
const ORPHAN_SCAN_EVERY: Duration = Duration::from_secs(5);

/// Takes over the runs whose owner is dead: each is claimed (compare-and-set: one
/// coordinator wins it) and resumed from its journal.
async fn take_over(
    c: &Coordinator,
    leases: &crate::ha::Leases,
    registry: &'static Registry,
    subjects: &Subjects,
    publisher: &Publisher,
    store: &Arc<dyn ObjectStore>,
) {
    let mut orphans = match leases.orphans().await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the runs of dead coordinators; trying again at the next death");
            return;
        }
    };
    if orphans.is_empty() {
        return;
    }
    // coordinators taking over at once meet in different places: the runs spread
    fastrand::shuffle(&mut orphans);
    let started = Instant::now();
    let mut taken = 0;
    for run in orphans {
        match c.resume_one(registry, run, TAKEOVER_SETTLE).await {
            crate::coordinator::Resume::Resumed => {
                taken += 1;
                watch_run(
                    c.clone(),
                    run,
                    subjects.clone(),
                    publisher.clone(),
                    store.clone(),
                );
            }
            crate::coordinator::Resume::Skipped => {}
            crate::coordinator::Resume::Failed(why) => {
                tracing::error!(flow_run_id = %run, error = %why, "a run of a dead coordinator could not be resumed")
            }
        }
    }
    if taken > 0 {
        tracing::info!(
            runs = taken,
            took_ms = started.elapsed().as_millis() as u64,
            "took over runs of dead coordinators"
        );
        // agents: send what the dead coordinator did not acknowledge, list what runs
        publisher.publish(subjects.hello(), Bytes::new());
    }
}

/// The object agents read to show they share the coordinator's store.
struct StoreProbe {
    /// Set once the object is written.
    written: Arc<std::sync::OnceLock<String>>,
    token: String,
}

impl StoreProbe {
    /// Writes the probe in the background, again and again while the store is down
    /// (agents asking meanwhile are not checked, and check again on the next hello).
    fn start(store: Arc<dyn ObjectStore>) -> StoreProbe {
        let token = uuid::Uuid::new_v4().to_string();
        let written = Arc::new(std::sync::OnceLock::new());
        let (w, t) = (written.clone(), token.clone());
        tokio::spawn(async move {
            let key = format!("probes/{t}");
            let mut wait = Duration::from_secs(1);
            loop {
                match store.put(&key, Bytes::from(t.clone())).await {
                    Ok(()) => {
                        let _ = w.set(key);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "could not write the store probe; agents cannot check they share this store until it is");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(60));
                    }
                }
            }
        });
        StoreProbe { written, token }
    }

    fn key(&self) -> Option<String> {
        self.written.get().cloned()
    }
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

/// API requests answered at once, at most (`status`, `cancel`, `runs`, `agents`).
const API_CONCURRENCY: usize = 64;

/// The queue group of the coordinators' API subscriptions.
const API_QUEUE: &str = "pinazu-coordinators";

/// How long a request passed on to another coordinator may take (a `cancel` is given
/// longer: it waits up to 10 s for its run to end).
const PASS_ON_WAIT: Duration = Duration::from_secs(4);

/// The API verb of a request (its subject's last token).
fn verb_of(req: &ApiRequest) -> &'static str {
    match req {
        ApiRequest::Start { .. } => "start",
        ApiRequest::Status { .. } => "status",
        ApiRequest::Runs => "runs",
        ApiRequest::Cancel { .. } => "cancel",
        ApiRequest::Agents => "agents",
        ApiRequest::History(_) => "runs",
        ApiRequest::Reject { .. } => "reject",
        ApiRequest::StoreProbe => "store_probe",
    }
}

/// What the API handlers share.
struct ApiCtx {
    c: Coordinator,
    registry: &'static Registry,
    subjects: Subjects,
    publisher: Publisher,
    payloads: Payloads,
    client: async_nats::Client,
}

impl ApiCtx {
    async fn respond(&self, to: Option<async_nats::Subject>, reply: &ApiReply) {
        let Some(to) = to else {
            return;
        };
        match encode_envelope(reply) {
            Ok(b) => {
                if let Err(e) = self.client.publish(to, Bytes::from(b)).await {
                    tracing::warn!(error = %e, "could not send an API reply");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not encode an API reply"),
        }
    }

    /// Passes a request on to the coordinator that hosts its run, and returns its reply.
    async fn pass_on(&self, coordinator: &str, req: &ApiRequest) -> ApiReply {
        let subject = format!(
            "{}.coord.{coordinator}.api.{}",
            self.subjects.prefix(),
            verb_of(req)
        );
        let body = match encode_envelope(req) {
            Ok(b) => Bytes::from(b),
            Err(e) => return ApiReply::Error(e.to_string()),
        };
        let wait = if matches!(req, ApiRequest::Cancel { .. }) {
            PASS_ON_WAIT * 3
        } else {
            PASS_ON_WAIT
        };
        match tokio::time::timeout(wait, self.client.request(subject, body)).await {
            Ok(Ok(msg)) => decode_envelope::<ApiReply>(&msg.payload).unwrap_or_else(|e| {
                ApiReply::Error(format!("coordinator {coordinator} answered garbage: {e}"))
            }),
            Ok(Err(e)) => ApiReply::Error(format!(
                "coordinator {coordinator}, which hosts the run, did not answer: {e}"
            )),
            Err(_) => ApiReply::Error(format!(
                "coordinator {coordinator}, which hosts the run, did not answer within {} s",
                wait.as_secs()
            )),
        }
    }

    /// A cancel whose run's owner did not answer: asked again of whoever owns the run
    /// once it was taken over (here, or elsewhere), for up to 10 s.
    async fn cancel_after_takeover(
        &self,
        run: FlowRunId,
        silent: &str,
        req: &ApiRequest,
        first: ApiReply,
    ) -> ApiReply {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if self.c.hosts(run) {
                return Box::pin(self.handle(req.clone(), true)).await;
            }
            match self.owner_elsewhere(run).await {
                Some(owner) if owner != silent => return self.pass_on(&owner, req).await,
                _ => {}
            }
        }
        first
    }

    /// The live coordinator other than this one that owns the run, if any.
    async fn owner_elsewhere(&self, run: FlowRunId) -> Option<String> {
        let leases = self.c.leases()?;
        if self.c.hosts(run) {
            return None;
        }
        leases.live_owner_elsewhere(run).await
    }

    /// Every live coordinator's runs (this one's alone when it is alone).
    async fn live_runs(&self) -> Vec<RunInfo> {
        let mut runs = self.c.runs();
        if let Some(leases) = self.c.leases() {
            for other in leases.live() {
                if other == leases.me() {
                    continue;
                }
                match self.pass_on(&other, &ApiRequest::Runs).await {
                    ApiReply::Runs(r) => runs.extend(r),
                    ApiReply::Error(e) => {
                        tracing::warn!(coordinator = %other, error = %e, "runs: a coordinator did not answer")
                    }
                    _ => {}
                }
            }
        }
        runs
    }

    /// `runs`: the journal's history, with the live coordinators' runs over it (their
    /// counters are current), filtered, most recent first.
    async fn history(&self, q: &pinazu_shared::api::RunsQuery) -> ApiReply {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut by_id: HashMap<FlowRunId, (RunInfo, u64)> = match self.c.history().await {
            Ok(h) => h
                .into_iter()
                .map(|(r, at)| (r.flow_run_id, (r, at)))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "runs: the journal's history cannot be read; live runs only");
                HashMap::new()
            }
        };
        for r in self.live_runs().await {
            let at = match by_id.get(&r.flow_run_id) {
                Some((_, at)) => *at,
                None => now_ms.saturating_sub(r.wall_ms),
            };
            by_id.insert(r.flow_run_id, (r, at));
        }
        let mut runs: Vec<(RunInfo, u64)> = by_id
            .into_values()
            .filter(|(r, at)| {
                q.status.is_none_or(|s| r.status == s)
                    && q.flow.as_deref().is_none_or(|f| r.flow == f)
                    && q.since_ms.is_none_or(|t| *at >= t)
            })
            .collect();
        runs.sort_by_key(|r| std::cmp::Reverse(r.1));
        runs.truncate(q.limit.max(1) as usize);
        ApiReply::Runs(runs.into_iter().map(|(r, _)| r).collect())
    }

    /// `passed`: the request was passed on by another coordinator (answered here, never
    /// passed on again).
    async fn handle(&self, req: ApiRequest, passed: bool) -> ApiReply {
        if !passed {
            let run = match &req {
                ApiRequest::Status { flow_run_id } | ApiRequest::Cancel { flow_run_id } => {
                    Some(*flow_run_id)
                }
                _ => None,
            };
            if let Some(run) = run {
                if let Some(owner) = self.owner_elsewhere(run).await {
                    let reply = self.pass_on(&owner, &req).await;
                    if !matches!(reply, ApiReply::Error(_)) {
                        return reply;
                    }
                    // its owner does not answer (it just died, or is stopped): a status
                    // says the run is being taken over; a cancel waits for the new owner
                    return match req {
                        ApiRequest::Status { .. } => match self.c.unhosted_run(run).await {
                            Some(info) => ApiReply::Run(info),
                            None => reply,
                        },
                        _ => self.cancel_after_takeover(run, &owner, &req, reply).await,
                    };
                }
            }
            if let ApiRequest::History(q) = &req {
                return self.history(q).await;
            }
            if matches!(req, ApiRequest::Runs) && self.c.leases().is_some() {
                return ApiReply::Runs(self.live_runs().await);
            }
        }
        let (c, registry, subjects, publisher, payloads) = (
            &self.c,
            self.registry,
            &self.subjects,
            &self.publisher,
            &self.payloads,
        );
        // (a start passed on as it came)
        let original = match &req {
            ApiRequest::Start { .. } if !passed && c.leases().is_some() => Some(req.clone()),
            _ => None,
        };
        match req {
            ApiRequest::Start {
                flow,
                params,
                flow_run_id,
                idempotency_key,
                success_task_results,
                events,
            } => {
                let id = flow_run_id.unwrap_or_default();
                let Some(def) = registry.flow(&flow) else {
                    let e = format!(
                        "flow `{flow}` is not defined on this coordinator; flows: {}",
                        registry.flow_names().join(", ")
                    );
                    return reject(c, id, events.as_ref(), e).await;
                };
                // a key names the run it started; then the run id's rules apply (active:
                // followed; SUCCESS: its outcome; FAILED: run again)
                let id = match idempotency_key.as_deref() {
                    // the default key is the run id itself: the run id's rules say it all
                    Some(key) if key == id.to_string() => id,
                    Some(key) => match c.run_for_key(key, def, &params) {
                        Ok(Some(existing)) if existing != id && id != FlowRunId::of_key(key) => {
                            // an explicit run id that is not the key's run
                            return ApiReply::Error(format!(
                                "idempotency key {key:?} names flow run {existing}; this request names flow run {id}: a key names one run. Leave --flow-run-id unset to follow the key's run, or use another key"
                            ));
                        }
                        Ok(Some(existing)) => existing,
                        // not known here (e.g. after a restart): a run under the key's
                        // own id means the key is taken
                        Ok(None)
                            if key != id.to_string()
                                && id != FlowRunId::of_key(key)
                                && c.names_a_run(FlowRunId::of_key(key)).await =>
                        {
                            return ApiReply::Error(format!(
                                "idempotency key {key:?} names flow run {}; this request names flow run {id}: a key names one run. Leave --flow-run-id unset to follow the key's run, or use another key",
                                FlowRunId::of_key(key)
                            ));
                        }
                        Ok(None) => id,
                        Err(e @ StartError::Params(_)) => {
                            return reject(c, id, events.as_ref(), e.to_string()).await
                        }
                        Err(e) => return ApiReply::Error(e.to_string()),
                    },
                    None => id,
                };
                let seeds = match success_task_results.as_deref().map(Seeds::parse) {
                    None => Seeds::default(),
                    Some(Ok(s)) => s,
                    Some(Err(e)) => return reject(c, id, events.as_ref(), e).await,
                };
                let options = RunOptions {
                    idempotency_key,
                    seeds,
                    events,
                    ..RunOptions::default()
                };
                // (a failure here is published by `start_run_with`, unless the id is taken)
                let existing = match c.start_run_with(def, params, id, options).await {
                    // a run that succeeded before answers its recorded outcome
                    Ok(handle) if handle.ended() => true,
                    Ok(_) => {
                        watch_run(
                            c.clone(),
                            id,
                            subjects.clone(),
                            publisher.clone(),
                            payloads.store.clone(),
                        );
                        false
                    }
                    // the same run (same flow and parameters) is running here: follow it
                    Err(StartError::AlreadyRunning(_)) => true,
                    // another live coordinator hosts it: that one answers
                    Err(StartError::OwnedElsewhere { coordinator, .. }) if original.is_some() => {
                        return match &original {
                            Some(req) => self.pass_on(&coordinator, req).await,
                            None => ApiReply::Error(format!(
                                "flow run {id} is hosted by coordinator {coordinator}"
                            )),
                        };
                    }
                    Err(e) => return ApiReply::Error(e.to_string()),
                };
                match c.run_info(id) {
                    Some(run) => ApiReply::Started { run, existing },
                    None => ApiReply::Error(format!("run {id} vanished right after it started")),
                }
            }
            ApiRequest::StoreProbe => ApiReply::Error("handled by the API loop".into()),
            ApiRequest::Reject {
                flow_run_id,
                error,
                events,
            } => {
                if !c.names_a_run(flow_run_id).await {
                    c.publish_rejection(flow_run_id, events.as_ref(), &error);
                    c.flush_events().await;
                }
                ApiReply::Done
            }
            ApiRequest::Status { flow_run_id } => match c.run_info(flow_run_id) {
                Some(run) => ApiReply::Run(run),
                // ended before this coordinator process started: its journal knows
                None => match c.journaled_run(flow_run_id).await {
                    Some(run) => ApiReply::Run(run),
                    // journaled and not ended, hosted nowhere now (its coordinator died
                    // and another is taking it over): running, not unknown, or the
                    // client would submit it again
                    None => match c.unhosted_run(flow_run_id).await {
                        Some(run) => ApiReply::Run(run),
                        None => ApiReply::Unknown(format!(
                            "flow run {flow_run_id} is not known to this coordinator"
                        )),
                    },
                },
            },
            ApiRequest::Runs => ApiReply::Runs(c.runs()),
            // (answered above unless passed on, which it never is)
            ApiRequest::History(q) => self.history(&q).await,
            ApiRequest::Cancel { flow_run_id } => {
                match c.cancel(flow_run_id, "the run was cancelled by an operator") {
                    Ok(()) => {
                        // answer with the ended run, so `cancel` can show the final state
                        let wait = c.wait(flow_run_id);
                        let _ = tokio::time::timeout(Duration::from_secs(10), wait).await;
                        match c.run_info(flow_run_id) {
                            Some(run) => ApiReply::Run(run),
                            None => ApiReply::Error(format!("flow run {flow_run_id} vanished")),
                        }
                    }
                    // ended long ago (no longer in memory): its journal knows
                    Err(_) if c.journaled_run(flow_run_id).await.is_some() => {
                        ApiReply::Error(format!("flow run {flow_run_id} has already ended"))
                    }
                    Err(e) => ApiReply::Error(e),
                }
            }
            ApiRequest::Agents => ApiReply::Agents(c.agents().await),
        }
    }
}

/// A start refused before the run exists: its flow FAILED event, unless its id names a run
/// already (the id is that run's then).
async fn reject(
    c: &Coordinator,
    id: FlowRunId,
    events: Option<&pinazu_shared::events::EventContext>,
    error: String,
) -> ApiReply {
    if !c.names_a_run(id).await {
        c.publish_rejection(id, events, &error);
    }
    ApiReply::Error(error)
}

/// Publishes a run's progress four times a second and its end once; then removes the
/// run's large payloads from the store (nothing reads them any more).
pub fn watch_run(
    c: Coordinator,
    id: FlowRunId,
    subjects: Subjects,
    publisher: Publisher,
    store: Arc<dyn ObjectStore>,
) {
    tokio::spawn(async move {
        let progress = subjects.run_progress(id);
        let wait = c.wait(id);
        tokio::pin!(wait);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let ended = loop {
            tokio::select! {
                o = &mut wait => break o,
                _ = tick.tick() => {
                    if let Some(info) = c.run_info(id) {
                        publish_info(&publisher, progress.clone(), &info);
                    }
                }
            }
        };
        let Some(outcome) = ended else {
            // let go (another coordinator hosts it now): its payloads are that one's
            return;
        };
        // (the run may have left memory already if thousands ended meanwhile)
        let info = c.run_info(id).unwrap_or_else(|| RunInfo {
            result: outcome.result.clone(),
            error: outcome.error.clone(),
            ..outcome
                .stats
                .run_info(id, &outcome.flow, outcome.status, outcome.stats.completed)
        });
        publish_info(&publisher, subjects.run_done(id), &info);
        match store.delete_prefix(&payload_prefix(id)).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(flow_run_id = %id, removed = n, "removed the run's large payloads")
            }
            Err(e) => {
                tracing::warn!(flow_run_id = %id, error = %e, "could not remove the run's large payloads")
            }
        }
    });
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

fn publish_info(publisher: &Publisher, subject: String, info: &RunInfo) {
    match encode_envelope(info) {
        Ok(b) => publisher.publish(subject, Bytes::from(b)),
        Err(e) => tracing::error!(error = %e, "could not encode run progress"),
    }
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
