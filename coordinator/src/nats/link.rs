//! Coordinator -> agents: the `AgentLink` that publishes attempts and cancels to each
//! agent's subjects (large arguments through the store), and the `EventSink` that
//! publishes Pinazu Core status events.

use bytes::Bytes;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::{AgentId, AttemptId, FlowRunId};
use pinazu_shared::nats::Publisher;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::Subjects;
use pinazu_shared::transport::{AgentLink, ResultSink};
use pinazu_shared::wire::{payload_key, AttemptFinished, SpawnTask, StealRequest};
use pinazu_shared::BoxFuture;

use crate::status::EventSink;

/// Publishes attempts and cancellations to agents' subjects. Arguments larger than the
/// payload threshold go to the object store first and travel by reference.
pub struct NatsAgentLink {
    publisher: Publisher,
    /// For steals (request/reply).
    client: async_nats::Client,
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
        client: async_nats::Client,
        subjects: Subjects,
        max_payload: usize,
        payloads: Payloads,
    ) -> Self {
        NatsAgentLink {
            publisher,
            client,
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
                            logs: None,
                        });
                    }
                }
            }
        });
    }

    /// Hands attempts to the NATS client at once when it has room (the common case),
    /// else through the ordered publisher: no task hop on an idle system's dispatch.
    fn send_now(&self, subject: &str, bytes: Bytes) {
        use futures_util::FutureExt;
        match self
            .client
            .publish(subject.to_string(), bytes.clone())
            .now_or_never()
        {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::warn!(subject, error = %e, "NATS publish failed"),
            // the client's queue is full: wait in the publisher's
            None => self.publisher.publish(subject.to_string(), bytes),
        }
    }

    fn publish_batch(&self, subject: &str, tasks: &[SpawnTask]) {
        match encode_envelope(&tasks) {
            Ok(bytes) if bytes.len() <= self.max_payload || tasks.len() == 1 => {
                if bytes.len() > self.max_payload {
                    tracing::error!(subject, bytes = bytes.len(), max = self.max_payload, task = %tasks[0].task, "attempt arguments exceed the NATS max payload; the attempt will be reported lost and retried");
                }
                self.send_now(subject, Bytes::from(bytes));
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

    fn steal(
        &self,
        agent: &AgentId,
        epochs: Vec<u32>,
        max: u32,
    ) -> BoxFuture<'static, Vec<SpawnTask>> {
        let (client, subject) = (self.client.clone(), self.subjects.agent_steal(agent));
        Box::pin(async move {
            let (epoch, also) = (epochs.first().copied().unwrap_or(0), epochs[1..].to_vec());
            let Ok(body) = encode_envelope(&StealRequest { epoch, max, also }) else {
                return Vec::new();
            };
            let asked = tokio::time::timeout(
                STEAL_WAIT,
                client.request(subject.clone(), Bytes::from(body)),
            )
            .await;
            match asked {
                Ok(Ok(msg)) => match decode_envelope::<Vec<SpawnTask>>(&msg.payload) {
                    Ok(tasks) => tasks,
                    Err(e) => {
                        tracing::warn!(subject, error = %e, "undecodable answer to a steal");
                        Vec::new()
                    }
                },
                // (an older agent does not answer; one that gave attempts back in a
                // reply lost here no longer lists them: they are taken for lost)
                Ok(Err(e)) => {
                    tracing::debug!(subject, error = %e, "steal not answered");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            }
        })
    }
}

/// How long a steal waits for the agent's answer.
const STEAL_WAIT: Duration = Duration::from_secs(2);

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
