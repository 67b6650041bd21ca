//! Schedules on NATS: stored in JetStream (`<P>_SCHEDULES`, subject
//! `<prefix>.schedule.<name>`, one message per schedule: definition and state; an empty
//! message is a deleted schedule), fired by every coordinator's loop. Each pass over a
//! schedule reads its message, decides (`schedules::plan`) and writes the new state
//! compare-and-set on the subject's last sequence: of coordinators deciding at once, one
//! write wins and the others read again. A decided run is written (`pending`) before it
//! is started, and started (idempotently: the run id is the schedule's and the fire's)
//! by whoever passes next until confirmed, so a fire is never lost when a coordinator
//! dies between the two, and never doubled.

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pinazu_shared::api::{ApiReply, ApiRequest};
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::ids::FlowRunId;
use pinazu_shared::nats::Publisher;
use pinazu_shared::registry::Registry;
use pinazu_shared::schedule::{ScheduleOp, ScheduleRecord, ScheduleState, ScheduleView};
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::Subjects;

use crate::coordinator::{Coordinator, RunOptions, StartError};
use crate::schedules::{next_due, now_ms, plan, plan_backfill, validate};

/// The schedules' stream.
pub struct ScheduleStore {
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl ScheduleStore {
    /// Creates (or finds) the stream.
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        replicas: usize,
    ) -> Result<Arc<ScheduleStore>, String> {
        let js = jetstream::new(client);
        let stream = crate::journal_js::ensure_stream(
            &js,
            stream::Config {
                name: crate::journal_js::stream_name(prefix, "SCHEDULES"),
                subjects: vec![format!("{prefix}.schedule.*")],
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                ..Default::default()
            },
            replicas,
        )
        .await
        .map_err(|e| err("cannot open the schedules stream", e))?;
        Ok(Arc::new(ScheduleStore {
            js,
            stream,
            prefix: prefix.to_string(),
        }))
    }

    fn subject(&self, name: &str) -> String {
        format!("{}.schedule.{name}", self.prefix)
    }

    /// A schedule's message as stored and its sequence (`None`: no message; an empty
    /// one is a deleted schedule).
    async fn read_raw(&self, name: &str) -> Result<(Option<Bytes>, u64), String> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(name))
            .await
        {
            Ok(msg) => Ok((Some(msg.payload), msg.sequence)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok((None, 0)),
            Err(e) => Err(err(&format!("cannot read schedule {name}"), e)),
        }
    }

    /// A schedule and its message's sequence (`None` and the sequence of its deletion,
    /// or 0: no such schedule). A message that does not decode (garbage published on
    /// the subject, a newer version's) is an error naming it.
    pub async fn read(&self, name: &str) -> Result<(Option<ScheduleRecord>, u64), String> {
        match self.read_raw(name).await? {
            (Some(body), seq) if !body.is_empty() => match decode_envelope::<ScheduleRecord>(&body) {
                Ok(r) => Ok((Some(r), seq)),
                Err(e) => Err(format!(
                    "schedule {name}'s stored message does not decode ({e}); `schedule delete {name}` removes it"
                )),
            },
            (_, seq) => Ok((None, seq)),
        }
    }

    /// Writes a schedule (`None`: deletes it) if its last sequence is still `expected`;
    /// `false`: another writer came first.
    pub async fn write(
        &self,
        name: &str,
        record: Option<&ScheduleRecord>,
        expected: u64,
    ) -> Result<bool, String> {
        let body = match record {
            Some(r) => Bytes::from(encode_envelope(r).map_err(|e| e.to_string())?),
            None => Bytes::new(),
        };
        let m = jetstream::message::PublishMessage::build()
            .payload(body)
            .expected_last_subject_sequence(expected);
        let ack = self
            .js
            .send_publish(self.subject(name), m)
            .await
            .map_err(|e| err(&format!("cannot write schedule {name}"), e))?
            .await;
        match ack {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(false)
            }
            Err(e) => Err(err(&format!("cannot write schedule {name}"), e)),
        }
    }

    /// The names of the schedules (deleted ones included until read).
    pub async fn names(&self) -> Result<Vec<String>, String> {
        let mut info = self
            .stream
            .info_with_subjects(format!("{}.schedule.*", self.prefix))
            .await
            .map_err(|e| err("cannot list the schedules", e))?;
        let mut names = Vec::new();
        while let Some((subject, _)) = info
            .try_next()
            .await
            .map_err(|e| err("cannot list the schedules", e))?
        {
            if let Some(n) = subject.rsplit('.').next() {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads, changes and writes a schedule, again while another writer comes first.
    async fn update(
        &self,
        name: &str,
        mut change: impl FnMut(&mut ScheduleRecord) -> Result<(), String>,
    ) -> Result<ScheduleRecord, String> {
        for _ in 0..20 {
            let (Some(mut rec), seq) = self.read(name).await? else {
                return Err(format!("no schedule named {name:?}"));
            };
            change(&mut rec)?;
            if self.write(name, Some(&rec), seq).await? {
                return Ok(rec);
            }
        }
        Err(format!(
            "schedule {name} is being changed by others; try again"
        ))
    }
}

/// What the schedule loop and the API use.
pub(super) struct ScheduleCtx {
    pub(super) store: Arc<ScheduleStore>,
    pub(super) c: Coordinator,
    pub(super) registry: &'static Registry,
    pub(super) subjects: Subjects,
    pub(super) publisher: Publisher,
    pub(super) objects: Arc<dyn ObjectStore>,
    pub(super) client: async_nats::Client,
    /// Wakes the loop (a schedule changed).
    pub(super) changed: tokio::sync::Notify,
}

fn view(rec: ScheduleRecord) -> ScheduleView {
    let next_ms = match (rec.state.paused, validate(&rec.spec)) {
        (false, Ok(t)) => next_due(&rec.spec, &t, &rec.state).map(|(_, due)| due),
        _ => None,
    };
    ScheduleView {
        record: rec,
        next_ms,
    }
}

impl ScheduleCtx {
    /// Answers `schedule ...`.
    pub(super) async fn handle(&self, op: ScheduleOp) -> ApiReply {
        let reply = match op {
            ScheduleOp::Add { spec, replace } => self.add(spec, replace).await,
            ScheduleOp::List => self.list().await,
            ScheduleOp::Pause { name } => self
                .store
                .update(&name, |r| {
                    r.state.paused = true;
                    Ok(())
                })
                .await
                .map(|r| vec![view(r)]),
            ScheduleOp::Resume { name } => self
                .store
                .update(&name, |r| {
                    if r.state.paused {
                        // fires due while paused are not caught up
                        r.state.paused = false;
                        r.state.last_ms = r.state.last_ms.max(now_ms());
                    }
                    Ok(())
                })
                .await
                .map(|r| vec![view(r)]),
            ScheduleOp::Delete { name } => self.delete(&name).await.map(|()| Vec::new()),
            ScheduleOp::Backfill {
                name,
                from_ms,
                to_ms,
            } => {
                let mut started = 0;
                let r = self
                    .store
                    .update(&name, |r| {
                        let timing = crate::schedules::Timing::parse(&r.spec)?;
                        let plan = plan_backfill(
                            &r.spec,
                            &timing,
                            &mut r.state,
                            from_ms,
                            to_ms,
                            now_ms(),
                        )?;
                        started = plan.start.len();
                        Ok(())
                    })
                    .await;
                r.map(|r| {
                    tracing::info!(schedule = %name, runs = started, "backfill decided");
                    vec![view(r)]
                })
            }
        };
        self.changed.notify_one();
        match reply {
            Ok(v) => ApiReply::Schedules(v),
            Err(e) => ApiReply::Error(e),
        }
    }

    async fn add(
        &self,
        mut spec: pinazu_shared::schedule::ScheduleSpec,
        replace: bool,
    ) -> Result<Vec<ScheduleView>, String> {
        validate(&spec)?;
        let Some(def) = self.registry.flow(&spec.flow) else {
            return Err(format!(
                "flow `{}` is not defined on this coordinator; flows: {}",
                spec.flow,
                self.registry.flow_names().join(", ")
            ));
        };
        // the parameters as the flow takes them: a bad one is refused now, not at 2 am
        spec.params = (def.invoke)(spec.params.clone())
            .map_err(|e| format!("--input: {e}"))?
            .params;
        let (raw, seq) = self.store.read_raw(&spec.name).await?;
        let exists = raw.as_ref().is_some_and(|b| !b.is_empty());
        if exists && !replace {
            return Err(format!(
                "a schedule named {:?} exists; delete it first, or add it with --replace",
                spec.name
            ));
        }
        // replaced: what was decided, runs and waits carries over (a run decided is
        // started; under skip, the run that runs is still the one to wait for)
        let old = raw
            .filter(|b| !b.is_empty())
            .and_then(|b| decode_envelope::<ScheduleRecord>(&b).ok())
            .map(|r| r.state)
            .unwrap_or_default();
        let rec = ScheduleRecord {
            spec,
            state: ScheduleState {
                last_ms: now_ms(),
                current: old.current,
                buffered: old.buffered,
                pending: old.pending,
                paused: old.paused,
                ..Default::default()
            },
        };
        if !self.store.write(&rec.spec.name, Some(&rec), seq).await? {
            return Err(format!(
                "schedule {:?} was changed meanwhile; try again",
                rec.spec.name
            ));
        }
        tracing::info!(schedule = %rec.spec.name, flow = %rec.spec.flow, "schedule added");
        Ok(vec![view(rec)])
    }

    async fn list(&self) -> Result<Vec<ScheduleView>, String> {
        let mut out = Vec::new();
        for name in self.store.names().await? {
            match self.store.read(&name).await {
                Ok((Some(r), _)) => out.push(view(r)),
                Ok((None, _)) => {}
                // (one bad message must not hide the others)
                Err(e) => tracing::warn!(schedule = %name, error = %e, "a schedule cannot be read"),
            }
        }
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<(), String> {
        for _ in 0..20 {
            // (raw: a message that does not decode can be deleted too)
            let (raw, seq) = self.store.read_raw(name).await?;
            if raw.is_none_or(|b| b.is_empty()) {
                return Err(format!("no schedule named {name:?}"));
            }
            if self.store.write(name, None, seq).await? {
                tracing::info!(schedule = %name, "schedule deleted");
                return Ok(());
            }
        }
        Err(format!(
            "schedule {name} is being changed by others; try again"
        ))
    }

    /// Whether a run still runs (here, or per the journal every coordinator shares).
    async fn running(&self, run: FlowRunId) -> Result<bool, String> {
        self.c.run_running(run).await
    }

    /// Starts the decided runs; keeps those not started yet. A run the journal knows
    /// (started here or elsewhere, ended or not) counts as started and is not started
    /// again (a failed one would run again); one claimed by another coordinator but not
    /// journaled yet stays until it is (its claimer may die before journaling it).
    async fn start_pending(&self, rec: &ScheduleRecord, state: &mut ScheduleState) {
        let def = self.registry.flow(&rec.spec.flow);
        let mut keep = Vec::new();
        for (at, run) in std::mem::take(&mut state.pending) {
            match self.c.journaled(run).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(schedule = %rec.spec.name, flow_run_id = %run, error = %e, "cannot read a fire's journal yet; trying again");
                    keep.push((at, run));
                    continue;
                }
            }
            let Some(def) = def else {
                // (another coordinator may define it: kept, and said)
                state.error = Some(format!(
                    "flow `{}` is not defined on this coordinator",
                    rec.spec.flow
                ));
                keep.push((at, run));
                continue;
            };
            match self
                .c
                .start_run_with(def, rec.spec.params.clone(), run, RunOptions::default())
                .await
            {
                Ok(handle) => {
                    if !handle.ended() {
                        super::watch::watch_run(
                            self.c.clone(),
                            run,
                            self.subjects.clone(),
                            self.publisher.clone(),
                            self.objects.clone(),
                        );
                    }
                    tracing::info!(schedule = %rec.spec.name, flow_run_id = %run, fire_ms = at, late_ms = now_ms().saturating_sub(at), "schedule fired");
                    state.error = None;
                }
                // hosted here already
                Err(StartError::AlreadyRunning(_)) => {}
                // parameters that no longer fit the flow: said, not retried
                Err(e @ (StartError::Params(_) | StartError::OtherRun { .. })) => {
                    tracing::error!(schedule = %rec.spec.name, flow_run_id = %run, error = %e, "a fire could not start");
                    state.error = Some(e.to_string());
                }
                // claimed elsewhere and not journaled yet, a journal or spawn error:
                // the next pass looks again
                Err(e) => {
                    tracing::warn!(schedule = %rec.spec.name, flow_run_id = %run, error = %e, "a fire did not start yet; trying again");
                    keep.push((at, run));
                }
            }
        }
        state.pending = keep;
    }

    /// Cancels a run wherever it runs (the cancel-other policy).
    async fn cancel(&self, run: FlowRunId, schedule: &str) {
        let why = format!("schedule {schedule} fired again (overlap: cancel-other)");
        if self.c.cancel(run, &why).is_ok() {
            return;
        }
        let req = ApiRequest::Cancel { flow_run_id: run };
        let Ok(body) = encode_envelope(&req) else {
            return;
        };
        let subject = format!("{}.api.cancel", self.subjects.prefix());
        match tokio::time::timeout(
            Duration::from_secs(5),
            self.client.request(subject, Bytes::from(body)),
        )
        .await
        {
            Ok(Ok(_)) => {}
            _ => {
                tracing::warn!(schedule, flow_run_id = %run, "could not ask for the running run's cancel")
            }
        }
    }

    /// One pass over a schedule: start what was decided, decide what is due, write it
    /// (compare-and-set), start it. Returns when the state holds nothing undone.
    async fn act(&self, name: &str) -> Result<(), String> {
        for _ in 0..20 {
            let (Some(rec), seq) = self.store.read(name).await? else {
                return Ok(());
            };
            let mut state = rec.state.clone();
            if !state.pending.is_empty() {
                self.start_pending(&rec, &mut state).await;
            }
            let timing = crate::schedules::Timing::parse(&rec.spec)?;
            let running = match state.current {
                Some(r) if state.pending.iter().any(|p| p.1 == r) => true,
                Some(r) => self.running(r).await?,
                None => false,
            };
            let decided = plan(&rec.spec, &timing, &mut state, now_ms(), running);
            if state == rec.state {
                return Ok(());
            }
            let record = ScheduleRecord {
                spec: rec.spec.clone(),
                state,
            };
            if !self.store.write(name, Some(&record), seq).await? {
                continue; // another coordinator acted: read again
            }
            if let Some(run) = decided.cancel {
                self.cancel(run, name).await;
            }
            if record.state.pending.is_empty() {
                return Ok(());
            }
            // decided and durable: the next round starts them and clears them
        }
        Err(format!("schedule {name}: too many concurrent changes"))
    }
}

/// A schedule as read after a pass.
type Read = Result<(Option<ScheduleRecord>, u64), String>;

/// Runs the schedules: wakes when the next fire is due (or a schedule changed, or every
/// second to look at buffered fires and undone starts), and acts on the schedules due,
/// several at once. Changes (this coordinator's writes and others') arrive on
/// `<prefix>.schedule.*` with the schedule's message: applied to the cached copy as
/// they come; the whole list is read again every 30 s (a change missed while cut off).
pub(super) fn serve_schedules(ctx: Arc<ScheduleCtx>) {
    tokio::spawn(async move {
        let updates: Arc<std::sync::Mutex<HashMap<String, Option<ScheduleRecord>>>> =
            Arc::default();
        match ctx
            .client
            .subscribe(format!("{}.schedule.*", ctx.store.prefix))
            .await
        {
            Ok(mut changes) => {
                let (c, updates) = (ctx.clone(), updates.clone());
                tokio::spawn(async move {
                    while let Some(msg) = changes.next().await {
                        let Some(name) = msg.subject.rsplit('.').next() else {
                            continue;
                        };
                        let rec = if msg.payload.is_empty() {
                            None
                        } else {
                            match decode_envelope::<ScheduleRecord>(&msg.payload) {
                                Ok(r) => Some(r),
                                Err(e) => {
                                    tracing::warn!(schedule = name, error = %e, "ignoring an undecodable schedule message");
                                    continue;
                                }
                            }
                        };
                        if let Ok(mut u) = updates.lock() {
                            u.insert(name.to_string(), rec);
                        }
                        c.changed.notify_one();
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow schedule changes; looking every second")
            }
        }
        let mut known: HashMap<String, ScheduleRecord> = HashMap::new();
        let mut refreshed = 0u64;
        loop {
            let now = now_ms();
            if now.saturating_sub(refreshed) >= 30_000 {
                match ctx.store.names().await {
                    Ok(names) => {
                        let mut fresh = HashMap::new();
                        for n in names {
                            match ctx.store.read(&n).await {
                                Ok((Some(r), _)) => {
                                    fresh.insert(n, r);
                                }
                                Ok((None, _)) => {}
                                Err(e) => {
                                    tracing::warn!(schedule = %n, error = %e, "a schedule cannot be read; it does not fire")
                                }
                            }
                        }
                        known = fresh;
                        refreshed = now;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot list the schedules"),
                }
            }
            let changed: Vec<(String, Option<ScheduleRecord>)> = match updates.lock() {
                Ok(mut u) => u.drain().collect(),
                Err(_) => Vec::new(),
            };
            for (name, rec) in changed {
                match rec {
                    Some(r) => known.insert(name, r),
                    None => known.remove(&name),
                };
            }
            let mut wake = now + 1_000;
            let mut due = Vec::new();
            for (name, rec) in &known {
                let undone = !rec.state.pending.is_empty();
                if rec.state.paused && !undone {
                    continue;
                }
                let next = crate::schedules::Timing::parse(&rec.spec)
                    .ok()
                    .and_then(|t| next_due(&rec.spec, &t, &rec.state))
                    .filter(|_| !rec.state.paused);
                match next {
                    Some((_, at)) if at <= now => due.push(name.clone()),
                    _ if undone || !rec.state.buffered.is_empty() => due.push(name.clone()),
                    Some((_, at)) => wake = wake.min(at),
                    None => {}
                }
            }
            // several at once: one schedule's slow start does not make the others late
            let acted: Vec<(String, Read)> =
                futures_util::stream::iter(due)
                    .map(|name| {
                        let ctx = ctx.clone();
                        async move {
                            if let Err(e) = ctx.act(&name).await {
                                tracing::warn!(schedule = %name, error = %e, "schedule pass failed; trying again");
                            }
                            let r = ctx.store.read(&name).await;
                            (name, r)
                        }
                    })
                    .buffer_unordered(16)
                    .collect()
                    .await;
            for (name, r) in acted {
                match r {
                    Ok((Some(r), _)) => {
                        known.insert(name, r);
                    }
                    Ok((None, _)) => {
                        known.remove(&name);
                    }
                    Err(_) => {}
                }
            }
            let sleep = Duration::from_millis(wake.saturating_sub(now_ms()).clamp(1, 1_000));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = ctx.changed.notified() => {}
            }
        }
    });
}
