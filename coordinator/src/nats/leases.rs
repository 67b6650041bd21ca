//! Several coordinators: renewing this one's lease, noticing dead peers and taking
//! their runs over (design in docs/architecture.md, "Several coordinators").

use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pinazu_shared::nats::Publisher;
use pinazu_shared::registry::Registry;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::Subjects;

use crate::coordinator::Coordinator;

use super::watch::watch_run;

/// How long a run taken over waits before its body runs: agents send the results the
/// dead coordinator did not acknowledge and list their running attempts meanwhile.
const TAKEOVER_SETTLE: Duration = Duration::from_millis(1500);

/// Renews this coordinator's lease every second; looks for coordinators that stopped
/// renewing theirs every half second, and takes their runs over (each run resumed from
/// its journal, as after a restart). A lease that lapsed here (this process was stopped
/// or cut off) is renewed, then every hosted run is checked: those another coordinator
/// took meanwhile are let go.
pub(super) async fn keep_leases(
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
