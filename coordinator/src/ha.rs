//! Several coordinators on one NATS: who is alive, and who owns which run.
//!
//! Two JetStream streams (plain streams, so that nats-server 2.9.10 serves them too):
//!
//! - `<P>_COORDS`, subjects `<prefix>.lease.coord.<coordinator>`, one message per
//!   subject, **max age 3 s** (`LEASE_TTL`): every coordinator publishes its
//!   [`CoordLease`] there every second. A coordinator whose message has expired has not
//!   renewed for 3 s: it is dead (or cut off from NATS). The server's clock alone decides
//!   expiry, so clock skew between machines does not matter.
//! - `<P>_OWNERS`, subjects `<prefix>.lease.run.<run>`, one message per subject: the
//!   [`RunOwner`] of each run, written with `Nats-Expected-Last-Subject-Sequence`
//!   (compare-and-set): a coordinator claims a run that has no owner, a released owner
//!   (empty `coordinator`), or an owner that is dead; exactly one claim wins.
//!
//! A run is owned through both: its owner record names a coordinator, and that
//! coordinator's lease is alive. Renewing one lease per coordinator (not one per run)
//! keeps the cost flat however many runs are active. The hard guarantee against two
//! hosts is the journal's fencing (see `journal_js.rs`): a coordinator that takes a run
//! over appends to its journal first, after which the previous host cannot.

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::ids::FlowRunId;

/// How long a coordinator's lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often a coordinator renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often a coordinator looks for peers that died.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// A lease renewed longer ago than this is not relied on here (a margin under
/// `LEASE_TTL`, after which the others may take this coordinator's runs).
pub const VALID_FOR: Duration = Duration::from_millis(2500);

/// A coordinator's lease: who it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordLease {
    /// The coordinator's id (`<host>-<pid>-<random>`).
    pub coordinator: String,
    /// Its attempt-id epoch.
    pub epoch: u32,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub since: String,
}

/// Who owns a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOwner {
    /// The owning coordinator; empty once the run ended (released).
    pub coordinator: String,
}

/// The outcome of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owned {
    /// This coordinator owns the run now.
    Mine,
    /// Another live coordinator owns it.
    By(String),
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// This coordinator's view of leases and ownership.
pub struct Leases {
    me: CoordLease,
    prefix: String,
    js: jetstream::Context,
    coords: stream::Stream,
    owners: stream::Stream,
    /// When this process started (the base of the millisecond clocks below).
    base: Instant,
    /// When the last successful renewal was sent (ms since `base`; 0: never).
    renewed_ms: AtomicU64,
    /// The lease lapsed here (the process was stopped or cut off): nothing is
    /// dispatched or acknowledged until every hosted run's owner was checked again.
    suspect: std::sync::atomic::AtomicBool,
    /// Given up (a clean stop): not renewed any more.
    resigned: std::sync::atomic::AtomicBool,
    /// Since when renewals have succeeded without a failure (ms since `base`).
    healthy_since_ms: AtomicU64,
    /// The coordinators alive at the last poll.
    live: Mutex<HashSet<String>>,
    /// The sequence of this coordinator's owner record of each run it owns.
    mine: Mutex<HashMap<FlowRunId, u64>>,
}

impl Leases {
    /// Creates (or finds) the streams and renews this coordinator's lease once.
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        me: CoordLease,
        replicas: usize,
    ) -> Result<Leases, String> {
        let js = jetstream::new(client);
        let name = |suffix: &str| crate::journal_js::stream_name(prefix, suffix);
        let coords = crate::journal_js::ensure_stream(
            &js,
            stream::Config {
                name: name("COORDS"),
                subjects: vec![format!("{prefix}.lease.coord.*")],
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                max_age: LEASE_TTL,
                ..Default::default()
            },
            replicas,
        )
        .await
        .map_err(|e| format!("cannot create the coordinators' lease stream: {e}"))?;
        let owners = crate::journal_js::ensure_stream(
            &js,
            stream::Config {
                name: name("OWNERS"),
                subjects: vec![format!("{prefix}.lease.run.*")],
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                max_age: crate::journal::RETENTION,
                ..Default::default()
            },
            replicas,
        )
        .await
        .map_err(|e| format!("cannot create the run owners' stream: {e}"))?;
        let leases = Leases {
            me,
            prefix: prefix.to_string(),
            js,
            coords,
            owners,
            base: Instant::now(),
            renewed_ms: AtomicU64::new(0),
            suspect: std::sync::atomic::AtomicBool::new(false),
            resigned: std::sync::atomic::AtomicBool::new(false),
            healthy_since_ms: AtomicU64::new(0),
            live: Mutex::new(HashSet::new()),
            mine: Mutex::new(HashMap::new()),
        };
        leases.renew().await?;
        leases.poll_live().await?;
        Ok(leases)
    }

    /// This coordinator's id.
    pub fn me(&self) -> &str {
        &self.me.coordinator
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn coord_subject(&self, coordinator: &str) -> String {
        format!("{}.lease.coord.{coordinator}", self.prefix)
    }

    fn run_subject(&self, run: FlowRunId) -> String {
        format!("{}.lease.run.{run}", self.prefix)
    }

    /// Publishes this coordinator's lease (stored before it returns).
    pub async fn renew(&self) -> Result<(), String> {
        self.renew_with(&self.js).await
    }

    /// `renew` through a given JetStream context (the lease thread's own connection).
    pub async fn renew_with(&self, js: &jetstream::Context) -> Result<(), String> {
        if self.resigned.load(Relaxed) {
            return Ok(());
        }
        // the server ages the lease from when it stores it: the send time is the safe
        // side of that
        let sent = self.now_ms();
        let body = encode_envelope(&self.me).map_err(|e| e.to_string())?;
        let stored = async {
            js.publish(self.coord_subject(&self.me.coordinator), Bytes::from(body))
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(RENEW_EVERY, stored).await {
            Ok(Ok(_)) => {
                let before = self.renewed_ms.swap(sent, Relaxed);
                // a gap that made the lease invalid here: suspect until rechecked, and
                // healthy again only from now
                if before == 0 || sent.saturating_sub(before) >= VALID_FOR.as_millis() as u64 {
                    self.healthy_since_ms.store(sent, Relaxed);
                    if before != 0 {
                        self.suspect.store(true, Relaxed);
                    }
                }
                Ok(())
            }
            Ok(Err(e)) => Err(err("cannot renew this coordinator's lease", e)),
            Err(_) => Err("cannot renew this coordinator's lease: no answer within 1 s".into()),
        }
    }

    /// Renews the lease every second from now on, on a thread of its own with its own
    /// NATS connection (`connect`): a coordinator whose runtime is busy for a few
    /// seconds (taking over a large run) must not look dead; one that is stopped, or
    /// cut off from NATS, does. Started as soon as the lease is taken.
    pub fn keep_renewing<F, Fut>(self: &std::sync::Arc<Self>, connect: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Option<async_nats::Client>>,
    {
        let leases = self.clone();
        let spawned = std::thread::Builder::new()
            .name("pinazu-lease".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the lease thread");
                        return;
                    }
                };
                rt.block_on(async move {
                    let Some(client) = connect().await else {
                        tracing::error!("the lease thread cannot reach NATS; the lease is not renewed");
                        return;
                    };
                    let js = jetstream::new(client);
                    let mut tick = tokio::time::interval(RENEW_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut failing = false;
                    loop {
                        tick.tick().await;
                        match leases.renew_with(&js).await {
                            Ok(()) if failing => {
                                failing = false;
                                tracing::info!("coordinator lease renewed again");
                            }
                            Ok(()) => {}
                            Err(e) if !failing => {
                                failing = true;
                                tracing::warn!(error = %e, "cannot renew this coordinator's lease; after 3 s other coordinators take its runs over");
                            }
                            Err(_) => {}
                        }
                    }
                });
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the lease thread");
        }
    }

    /// Gives the lease up (a clean stop): the other coordinators take this one's runs
    /// over at their next look, without waiting for the lease to expire.
    pub async fn resign(&self) {
        self.resigned.store(true, Relaxed);
        if let Err(e) = self
            .coords
            .purge()
            .filter(self.coord_subject(&self.me.coordinator))
            .await
        {
            tracing::debug!(error = %e, "could not give the lease up; it expires in 3 s");
        }
    }

    /// Whether this coordinator's own lease is current: it renewed within the lease
    /// period (less a margin). A process that was stopped (SIGSTOP, a long pause) finds
    /// its lease stale when it wakes, and must not dispatch, acknowledge or announce
    /// until it has renewed and checked which runs are still its own.
    pub fn valid(&self) -> bool {
        let renewed = self.renewed_ms.load(Relaxed);
        renewed > 0
            && !self.suspect.load(Relaxed)
            && self.now_ms().saturating_sub(renewed) < VALID_FOR.as_millis() as u64
    }

    /// Whether the lease is current, suspicion aside (renewed recently).
    pub fn valid_ignoring_suspicion(&self) -> bool {
        let renewed = self.renewed_ms.load(Relaxed);
        renewed > 0 && self.now_ms().saturating_sub(renewed) < VALID_FOR.as_millis() as u64
    }

    /// Whether the lease lapsed here and the hosted runs must be checked again.
    pub fn suspect(&self) -> bool {
        self.suspect.load(Relaxed)
    }

    /// The hosted runs were checked again after a lapse.
    pub fn cleared(&self) {
        self.suspect.store(false, Relaxed);
    }

    /// How long the last renewal is ago.
    pub fn since_renewal(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.renewed_ms.load(Relaxed)))
    }

    /// Whether renewals have succeeded for long enough that a peer's missing lease
    /// means the peer, not NATS, failed (after a NATS restart every lease is renewed
    /// within a second; none is judged before).
    pub fn healthy(&self) -> bool {
        self.valid()
            && self
                .now_ms()
                .saturating_sub(self.healthy_since_ms.load(Relaxed))
                >= LEASE_TTL.as_millis() as u64
    }

    /// The coordinators whose lease is alive now (this one included).
    pub async fn poll_live(&self) -> Result<HashSet<String>, String> {
        let live = lease_holders(&self.coords, &self.prefix).await?;
        if let Ok(mut l) = self.live.lock() {
            l.clone_from(&live);
        }
        Ok(live)
    }

    /// Whether a coordinator's lease exists now (asked of the server).
    async fn lease_exists(&self, coordinator: &str) -> bool {
        self.coords
            .get_last_raw_message_by_subject(&self.coord_subject(coordinator))
            .await
            .is_ok()
    }

    /// Whether a coordinator was alive at the last poll.
    pub fn is_live(&self, coordinator: &str) -> bool {
        coordinator == self.me.coordinator
            || self
                .live
                .lock()
                .map(|l| l.contains(coordinator))
                .unwrap_or(false)
    }

    /// The live coordinators (at the last poll).
    pub fn live(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .live
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The run's owner record and its sequence (0: none).
    pub async fn owner(&self, run: FlowRunId) -> Result<(Option<RunOwner>, u64), String> {
        match self
            .owners
            .get_last_raw_message_by_subject(&self.run_subject(run))
            .await
        {
            Ok(msg) => Ok((decode_envelope::<RunOwner>(&msg.payload).ok(), msg.sequence)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok((None, 0)),
            Err(e) => Err(err("cannot read the run's owner", e)),
        }
    }

    /// The live coordinator other than this one that owns the run (at the last poll).
    pub async fn live_owner_elsewhere(&self, run: FlowRunId) -> Option<String> {
        match self.owner(run).await {
            Ok((Some(o), _))
                if !o.coordinator.is_empty()
                    && o.coordinator != self.me()
                    && self.is_live(&o.coordinator) =>
            {
                Some(o.coordinator)
            }
            _ => None,
        }
    }

    /// Writes the run's owner record if its last sequence is still `expected`.
    async fn write_owner(
        &self,
        run: FlowRunId,
        owner: &RunOwner,
        expected: u64,
    ) -> Result<Option<u64>, String> {
        let body = encode_envelope(owner).map_err(|e| e.to_string())?;
        let m = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(body))
            .expected_last_subject_sequence(expected);
        let ack = self
            .js
            .send_publish(self.run_subject(run), m)
            .await
            .map_err(|e| err("cannot write the run's owner", e))?
            .await;
        match ack {
            Ok(a) => Ok(Some(a.sequence)),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(None)
            }
            Err(e) => Err(err("cannot write the run's owner", e)),
        }
    }

    /// Claims a run for this coordinator: it is free (no owner, released, or its owner
    /// is dead) or already this coordinator's. Compare-and-set: of several claiming at
    /// once, one wins and the others learn who.
    pub async fn claim(&self, run: FlowRunId) -> Result<Owned, String> {
        for _ in 0..5 {
            let (owner, seq) = self.owner(run).await?;
            match owner {
                Some(o) if o.coordinator == self.me.coordinator => {
                    self.remember(run, seq);
                    return Ok(Owned::Mine);
                }
                Some(o) if !o.coordinator.is_empty() && self.is_live(&o.coordinator) => {
                    return Ok(Owned::By(o.coordinator));
                }
                // not alive at the last poll: but it may have started since
                Some(o) if !o.coordinator.is_empty() && self.lease_exists(&o.coordinator).await => {
                    return Ok(Owned::By(o.coordinator));
                }
                _ => {}
            }
            let me = RunOwner {
                coordinator: self.me.coordinator.clone(),
            };
            if let Some(seq) = self.write_owner(run, &me, seq).await? {
                self.remember(run, seq);
                return Ok(Owned::Mine);
            }
            // another claim won meanwhile: see whose
        }
        Err(format!(
            "could not claim flow run {run}: its owner record keeps changing"
        ))
    }

    fn remember(&self, run: FlowRunId, seq: u64) {
        if let Ok(mut m) = self.mine.lock() {
            m.insert(run, seq);
        }
    }

    /// This coordinator no longer hosts the run (it let it go).
    pub fn forget(&self, run: FlowRunId) {
        if let Ok(mut m) = self.mine.lock() {
            m.remove(&run);
        }
    }

    /// The run ended here: its owner record says so (only if still this coordinator's).
    pub async fn release(&self, run: FlowRunId) {
        let Some(seq) = self.mine.lock().ok().and_then(|mut m| m.remove(&run)) else {
            return;
        };
        let free = RunOwner {
            coordinator: String::new(),
        };
        match self.write_owner(run, &free, seq).await {
            Ok(Some(released)) => {
                // gone from the stream (a later claim, above it, is kept): the scan for
                // orphans reads only the runs that are owned
                let _ = self
                    .owners
                    .purge()
                    .filter(self.run_subject(run))
                    .sequence(released + 1)
                    .await;
            }
            Ok(None) => {
                tracing::debug!(flow_run_id = %run, "the run's owner record changed; not released")
            }
            Err(e) => tracing::warn!(flow_run_id = %run, error = %e, "could not release the run"),
        }
    }

    /// Runs whose owner is not alive (and that were not released): to be taken over.
    pub async fn orphans(&self) -> Result<Vec<FlowRunId>, String> {
        let msgs = crate::journal_js::read_all(
            &self.owners,
            format!("{}.lease.run.*", self.prefix),
            jetstream::consumer::DeliverPolicy::LastPerSubject,
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for crate::journal_js::Read {
            subject, payload, ..
        } in msgs
        {
            let Some(run) = subject
                .rsplit('.')
                .next()
                .and_then(|id| FlowRunId::parse(id, "owner subject").ok())
            else {
                continue;
            };
            if let Ok(o) = decode_envelope::<RunOwner>(&payload) {
                if !o.coordinator.is_empty() && !self.is_live(&o.coordinator) {
                    out.push(run);
                }
            }
        }
        Ok(out)
    }

    /// The runs this coordinator owns (as it knows).
    pub fn owned(&self) -> Vec<FlowRunId> {
        self.mine
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// The coordinators with a live lease on this prefix, read without creating anything
/// (empty when there is no lease stream, or no JetStream).
pub async fn live_coordinators(client: async_nats::Client, prefix: &str) -> Vec<String> {
    let js = jetstream::new(client);
    let name = crate::journal_js::stream_name(prefix, "COORDS");
    let Ok(stream) = js.get_stream(&name).await else {
        return Vec::new();
    };
    let mut live: Vec<String> = lease_holders(&stream, prefix)
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
    live.sort();
    live
}

/// The coordinators whose lease message is in the leases stream now.
async fn lease_holders(coords: &stream::Stream, prefix: &str) -> Result<HashSet<String>, String> {
    let mut info = coords
        .info_with_subjects(format!("{prefix}.lease.coord.*"))
        .await
        .map_err(|e| err("cannot list the coordinators' leases", e))?;
    let mut live = HashSet::new();
    while let Some((subject, _)) = info
        .try_next()
        .await
        .map_err(|e| err("cannot list the coordinators' leases", e))?
    {
        if let Some(id) = subject.rsplit('.').next() {
            live.insert(id.to_string());
        }
    }
    Ok(live)
}

/// A claim made by a start that may not get as far as a runner: given back (released,
/// in the background) when dropped, unless kept.
pub struct Claimed {
    leases: Option<std::sync::Arc<Leases>>,
    run: FlowRunId,
}

impl Claimed {
    /// Guards the claim of `run`.
    pub fn new(leases: std::sync::Arc<Leases>, run: FlowRunId) -> Claimed {
        Claimed {
            leases: Some(leases),
            run,
        }
    }

    /// The run is hosted here: the claim stays.
    pub fn keep(mut self) {
        self.leases = None;
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let Some(leases) = self.leases.take() {
            let run = self.run;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { leases.release(run).await });
            }
        }
    }
}
