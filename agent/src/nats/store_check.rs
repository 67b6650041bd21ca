//! Whether this agent shares the coordinator's store (large payloads go through it):
//! it reads the probe object the coordinator wrote.

use bytes::Bytes;
use std::time::Duration;

use pinazu_shared::api::{ApiReply, ApiRequest};
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::Subjects;

/// Checks this agent reads the coordinator's store: it asks for the coordinator's probe
/// object and reads it. No coordinator yet, or a store that does not answer now: no
/// verdict (the check runs again when a coordinator says hello). A store without the
/// object is another store: an error saying what to set. A probe not written yet, or
/// not found, is asked for again for a few seconds before the verdict.
pub async fn check_store(
    client: &async_nats::Client,
    subjects: &Subjects,
    store: &dyn ObjectStore,
) -> Result<(), String> {
    let mut tries = 0;
    loop {
        tries += 1;
        match probe_once(client, subjects, store).await {
            Probe::Shared | Probe::Unknown | Probe::NoCoordinator => return Ok(()),
            Probe::NotYet if tries >= PROBE_TRIES => return Ok(()),
            Probe::Missing(theirs) if tries >= PROBE_TRIES => {
                return Err(format!(
                    "this agent's object store ({}) is not the coordinator's ({theirs}): arguments and results too large for a NATS message go through the store, and would be lost. Set --store / PINAZU_STORE (s3://bucket/prefix across machines) or PINAZU_CACHE_DIR (one machine) to the coordinator's store",
                    store.describe()
                ))
            }
            Probe::NotYet | Probe::Missing(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// How many times the store probe is asked for before a verdict (a second apart).
pub(super) const PROBE_TRIES: u32 = 5;

pub(super) enum Probe {
    /// No coordinator answered.
    NoCoordinator,
    /// The probe was read: the store is shared.
    Shared,
    /// No verdict possible (no coordinator, store unreadable now).
    Unknown,
    /// The coordinator has not written its probe yet.
    NotYet,
    /// The probe is not in this agent's store (the coordinator's store, described).
    Missing(String),
}

pub(super) async fn probe_once(
    client: &async_nats::Client,
    subjects: &Subjects,
    store: &dyn ObjectStore,
) -> Probe {
    let req = match encode_envelope(&ApiRequest::StoreProbe) {
        Ok(b) => Bytes::from(b),
        Err(_) => return Probe::Unknown,
    };
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        client.request(subjects.api("store_probe"), req),
    )
    .await;
    let Ok(Ok(msg)) = reply else {
        return Probe::NoCoordinator;
    };
    let Ok(ApiReply::StoreProbe {
        key,
        token,
        store: theirs,
    }) = decode_envelope::<ApiReply>(&msg.payload)
    else {
        return Probe::Unknown;
    };
    let Some(key) = key else {
        return Probe::NotYet;
    };
    match store.get(&key).await {
        Ok(Some(found)) if found.as_ref() == token.as_bytes() => Probe::Shared,
        Ok(_) => Probe::Missing(theirs),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the coordinator's store probe now; not checked");
            Probe::Unknown
        }
    }
}
