//! The coordinator's side of the NATS transport: the `AgentLink` that publishes attempts
//! to agents, the `EventSink` that publishes Pinazu Core status events, and the service
//! loops that take agents' heartbeats and reports and answer the API.

mod api;
mod leases;
pub mod limits;
mod link;
mod reports;
pub mod schedules;
mod watch;

pub use link::{NatsAgentLink, NatsEventSink, Payloads};
pub use watch::watch_run;

use futures_util::StreamExt;
use std::sync::Arc;

use pinazu_shared::nats::{Drops, Publisher};
use pinazu_shared::registry::Registry;
use pinazu_shared::subjects::Subjects;

use crate::coordinator::Coordinator;

/// Counters of the coordinator service.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// Messages dropped (undecodable, wrong version, invalid).
    pub drops: Drops,
}

/// What the coordinators keep in JetStream besides the journal (none with a local
/// journal).
#[derive(Default)]
pub struct Kept {
    /// Named limits.
    pub limits: Option<Arc<limits::LimitStore>>,
    /// Schedules.
    pub schedules: Option<Arc<schedules::ScheduleStore>>,
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
    kept: Kept,
) -> Result<Arc<ServiceCounters>, async_nats::SubscribeError> {
    let Kept { limits, schedules } = kept;
    let counters = Arc::new(ServiceCounters::default());
    // before any heartbeat can register an agent: every dispatch is recorded
    let origins = coordinator.track_origins();
    // child runs are watched like runs started through the API (the closure holds
    // the coordinator for the process's life)
    {
        let (c, subjects, publisher, store) = (
            coordinator.clone(),
            subjects.clone(),
            publisher.clone(),
            payloads.store.clone(),
        );
        coordinator.watch_children_with(Arc::new(move |id| {
            watch_run(
                c.clone(),
                id,
                subjects.clone(),
                publisher.clone(),
                store.clone(),
            )
        }));
    }
    // an object every agent must be able to read: then it shares this store
    let probe = api::StoreProbe::start(payloads.store.clone());
    let heartbeats = client.subscribe(subjects.heartbeats()).await?;
    let reports = client.subscribe(subjects.reports()).await?;
    // one coordinator answers each request (a queue group: several coordinators share
    // the load); a request about a run another coordinator hosts is passed on to that
    // one's own subject (`<prefix>.coord.<id>.api.<verb>`), answered there
    let api = client
        .queue_subscribe(
            format!("{}.api.*", subjects.prefix()),
            api::API_QUEUE.to_string(),
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
    let api = futures_util::stream::select(
        api.map(|m| (m, false)),
        futures_util::stream::iter(own).flatten().map(|m| (m, true)),
    );

    reports::serve_heartbeats(
        coordinator.clone(),
        heartbeats,
        counters.clone(),
        subjects.clone(),
    );
    reports::serve_reports(
        coordinator.clone(),
        reports,
        origins,
        counters.clone(),
        subjects.clone(),
        publisher.clone(),
        payloads.store.clone(),
    );
    let schedules = schedules.map(|store| {
        let ctx = Arc::new(schedules::ScheduleCtx {
            store,
            c: coordinator.clone(),
            registry,
            subjects: subjects.clone(),
            publisher: publisher.clone(),
            objects: payloads.store.clone(),
            client: client.clone(),
            changed: tokio::sync::Notify::new(),
        });
        schedules::serve_schedules(ctx.clone());
        ctx
    });
    let api_ctx = Arc::new(api::ApiCtx {
        c: coordinator.clone(),
        registry,
        subjects: subjects.clone(),
        publisher: publisher.clone(),
        payloads: payloads.clone(),
        client,
        limits,
        schedules,
    });
    api::serve_api(api_ctx, Box::pin(api), probe, counters.clone());
    if let Some(leases) = coordinator.leases().cloned() {
        tokio::spawn(leases::keep_leases(
            coordinator.clone(),
            leases,
            registry,
            subjects.clone(),
            publisher,
            payloads.store.clone(),
        ));
    }
    Ok(counters)
}
