//! The API (`P.api.<verb>`, a queue group of every coordinator): requests answered
//! here, or passed on to the coordinator hosting their run; the store probe agents ask
//! for.

use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pinazu_shared::api::{ApiReply, ApiRequest, LimitsOp, RunInfo};
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::ids::FlowRunId;
use pinazu_shared::nats::Publisher;
use pinazu_shared::registry::Registry;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::Subjects;

use crate::coordinator::{Coordinator, RunOptions, StartError};
use crate::flow_runner::Seeds;

use super::link::Payloads;
use super::watch::watch_run;
use super::ServiceCounters;

/// The object agents read to show they share the coordinator's store.
pub(super) struct StoreProbe {
    /// Set once the object is written.
    written: Arc<std::sync::OnceLock<String>>,
    token: String,
}

impl StoreProbe {
    /// Writes the probe in the background, again and again while the store is down
    /// (agents asking meanwhile are not checked, and check again on the next hello).
    pub(super) fn start(store: Arc<dyn ObjectStore>) -> StoreProbe {
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

/// The API's requests: the queue group's and those passed on to this coordinator
/// (`true`).
pub(super) type ApiStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = (async_nats::Message, bool)> + Send>>;

/// Answers the API: starts one at a time, in order, everything else concurrently.
pub(super) fn serve_api(
    api_ctx: Arc<ApiCtx>,
    mut api: ApiStream,
    probe: StoreProbe,
    k: Arc<ServiceCounters>,
) {
    // starts (and rejections, which ask whether an id names a run) are taken one at a
    // time, in order: two starts of one id must not race. Everything else is answered
    // concurrently (a `cancel` waiting for its run to end holds up nothing), at most
    // `API_CONCURRENCY` at once; beyond, the subscription waits (backpressure).
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
            if msg.subject.rsplit('.').next() != Some(req.verb()) {
                let why = format!(
                    "a {:?} request on {}: refused (send it on {})",
                    req.verb(),
                    msg.subject,
                    api_ctx.subjects.api(req.verb())
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
}

/// API requests answered at once, at most (`status`, `cancel`, `runs`, `agents`).
const API_CONCURRENCY: usize = 64;

/// The queue group of the coordinators' API subscriptions.
pub(super) const API_QUEUE: &str = "pinazu-coordinators";

/// How long a request passed on to another coordinator may take (a `cancel` is given
/// longer: it waits up to 10 s for its run to end).
const PASS_ON_WAIT: Duration = Duration::from_secs(4);

/// What the API handlers share.
pub(super) struct ApiCtx {
    pub(super) c: Coordinator,
    pub(super) registry: &'static Registry,
    pub(super) subjects: Subjects,
    pub(super) publisher: Publisher,
    pub(super) payloads: Payloads,
    pub(super) client: async_nats::Client,
    /// Where named limits are kept (JetStream); `None`: in this process only.
    pub(super) limits: Option<Arc<super::limits::LimitStore>>,
    /// Schedules (JetStream); `None`: this coordinator has none.
    pub(super) schedules: Option<Arc<super::schedules::ScheduleCtx>>,
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
            req.verb()
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

    /// The limits with every live coordinator's gates summed (each counts what it
    /// dispatched).
    async fn all_limits(&self) -> pinazu_shared::api::LimitsView {
        let mut view = self.c.limits().await;
        let Some(leases) = self.c.leases() else {
            return view;
        };
        for other in leases.live() {
            if other == leases.me() {
                continue;
            }
            match self
                .pass_on(&other, &ApiRequest::Limits(LimitsOp::List))
                .await
            {
                ApiReply::Limits(theirs) => {
                    for g in theirs.gates {
                        match view
                            .gates
                            .iter_mut()
                            .find(|m| (&m.kind, &m.name, &m.key) == (&g.kind, &g.name, &g.key))
                        {
                            Some(m) => {
                                m.running += g.running;
                                m.waiting += g.waiting;
                            }
                            None => view.gates.push(g),
                        }
                    }
                }
                ApiReply::Error(e) => {
                    tracing::warn!(coordinator = %other, error = %e, "limits: a coordinator did not answer")
                }
                _ => {}
            }
        }
        view.gates
            .sort_by(|a, b| (&a.kind, &a.name, &a.key).cmp(&(&b.kind, &b.name, &b.key)));
        view
    }

    /// `runs`: the journal's history, with the live coordinators' runs over it (their
    /// counters are current), filtered, most recent first.
    async fn history(&self, q: &pinazu_shared::api::RunsQuery) -> ApiReply {
        let now_ms = pinazu_shared::events::now_ms();
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
            .filter(|(r, at)| q.admits(r, *at))
            .collect();
        runs.sort_by_key(|r| std::cmp::Reverse(r.1));
        runs.truncate(q.limit.max(1) as usize);
        ApiReply::Runs(
            runs.into_iter()
                .map(|(r, at)| RunInfo {
                    at_ms: Some(at),
                    ..r
                })
                .collect(),
        )
    }

    /// `passed`: the request was passed on by another coordinator (answered here, never
    /// passed on again).
    async fn handle(&self, req: ApiRequest, passed: bool) -> ApiReply {
        if !passed {
            let run = match &req {
                ApiRequest::Status { flow_run_id }
                | ApiRequest::Cancel { flow_run_id }
                | ApiRequest::Calls { flow_run_id, .. } => Some(*flow_run_id),
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
                        ApiRequest::Calls { .. } => reply,
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
                priority,
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
                    meta: crate::journal::RunMeta {
                        priority,
                        parent: None,
                    },
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
            ApiRequest::Limits(LimitsOp::List) if passed => ApiReply::Limits(c.limits().await),
            ApiRequest::Limits(LimitsOp::List) => ApiReply::Limits(self.all_limits().await),
            ApiRequest::Schedule(op) => match &self.schedules {
                Some(s) => s.handle(op).await,
                None => ApiReply::Error(
                    "schedules are kept in JetStream: this coordinator runs with --journal local and has none"
                        .into(),
                ),
            },
            ApiRequest::Limits(LimitsOp::Set { name, size }) => {
                if !super::limits::valid_name(&name) {
                    return ApiReply::Error(format!(
                        "invalid limit name {name:?}: use letters, digits, '_' and '-'"
                    ));
                }
                if let Some(Err(e)) = size.map(|s| s.check()) {
                    return ApiReply::Error(format!("invalid size for limit {name}: {e}"));
                }
                if size.is_none() && !c.limits().await.named.iter().any(|(n, _)| *n == name) {
                    return ApiReply::Error(format!("no limit named {name:?}"));
                }
                match &self.limits {
                    // stored: every coordinator (this one too) applies it from the stream
                    Some(store) => match store.set(&name, size).await {
                        Ok(()) => {
                            c.set_limit(name, size);
                            ApiReply::Done
                        }
                        Err(e) => ApiReply::Error(e),
                    },
                    None => {
                        c.set_limit(name, size);
                        ApiReply::Done
                    }
                }
            }
            ApiRequest::Calls { flow_run_id, query } => match c.calls(flow_run_id, &query).await {
                Ok(Some(page)) => ApiReply::Calls(Box::new(page)),
                Err(e) => ApiReply::Error(e),
                Ok(None) if c.run_info(flow_run_id).is_some()
                    || c.journaled_run(flow_run_id).await.is_some() =>
                {
                    ApiReply::Error(format!(
                        "flow run {flow_run_id} kept no task table (it ended on a coordinator that did not keep one, or the store could not be read)"
                    ))
                }
                Ok(None) => ApiReply::Unknown(format!(
                    "flow run {flow_run_id} is not known to this coordinator"
                )),
            },
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
