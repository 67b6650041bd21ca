//! A run's progress and end, published for the `run` clients that follow it.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

use pinazu_shared::api::RunInfo;
use pinazu_shared::codec::encode_envelope;
use pinazu_shared::ids::FlowRunId;
use pinazu_shared::nats::Publisher;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::Subjects;
use pinazu_shared::wire::payload_prefix;

use crate::coordinator::Coordinator;

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
        let info = c.run_info(id).unwrap_or_else(|| outcome.info());
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

pub(super) fn publish_info(publisher: &Publisher, subject: String, info: &RunInfo) {
    match encode_envelope(info) {
        Ok(b) => publisher.publish(subject, Bytes::from(b)),
        Err(e) => tracing::error!(error = %e, "could not encode run progress"),
    }
}
