//! Named limits kept in JetStream: stream `<P>_LIMITS`, subject `<prefix>.limits.<name>`,
//! one message per name (the last one wins; an empty body removes the limit). Every
//! coordinator loads the stream at start and follows the subject (a message stored in a
//! stream is also delivered to core subscribers), so a `limits set` reaches all of them
//! and outlives restarts.

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use std::sync::Arc;

use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::options::NamedLimit;

use crate::coordinator::Coordinator;

pub use pinazu_shared::subjects::valid_name;

/// The named limits' stream.
pub struct LimitStore {
    js: jetstream::Context,
    prefix: String,
}

impl LimitStore {
    /// Creates (or finds) the stream, writes the limits given at start, then loads
    /// every limit into the coordinator's scheduler and follows changes.
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        replicas: usize,
        coordinator: Coordinator,
        initial: &[(String, NamedLimit)],
    ) -> Result<Arc<LimitStore>, String> {
        let js = jetstream::new(client.clone());
        let limits = crate::journal_js::ensure_stream(
            &js,
            stream::Config {
                name: crate::journal_js::stream_name(prefix, "LIMITS"),
                subjects: vec![format!("{prefix}.limits.*")],
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                ..Default::default()
            },
            replicas,
        )
        .await
        .map_err(|e| format!("cannot open the limits stream: {e}"))?;
        let store = Arc::new(LimitStore {
            js,
            prefix: prefix.to_string(),
        });
        // `--limit` sizes a limit not stored yet; one stored (set at run time, or by an
        // earlier start) keeps its size: a restart must not undo an operator's change
        for (name, size) in initial {
            if !valid_name(name) {
                return Err(format!(
                    "invalid limit name {name:?}: use letters, digits, '_' and '-'"
                ));
            }
            let subject = format!("{prefix}.limits.{name}");
            let stored = match limits.get_last_raw_message_by_subject(&subject).await {
                Ok(m) if !m.payload.is_empty() => decode_envelope::<NamedLimit>(&m.payload).ok(),
                _ => None,
            };
            match stored {
                Some(s) if s != *size => {
                    tracing::warn!(limit = %name, stored = %s, flag = %size, "--limit: this limit is stored with another size (set at run time); it keeps it. Change it with `limits set`")
                }
                Some(_) => {}
                None => store.set(name, Some(*size)).await?,
            }
        }
        // follow first, then load: a change stored meanwhile is seen by one or both
        let mut changes = client
            .subscribe(format!("{prefix}.limits.*"))
            .await
            .map_err(|e| format!("cannot follow the limits: {e}"))?;
        store.reload(&limits, &coordinator).await?;
        let s = store.clone();
        tokio::spawn(async move {
            // the stream read again now and then: a change published while this
            // coordinator was cut off from NATS is not delivered to it
            let mut reload = tokio::time::interval(std::time::Duration::from_secs(30));
            reload.tick().await;
            loop {
                tokio::select! {
                    msg = changes.next() => match msg {
                        Some(msg) => s.apply(&coordinator, &msg.subject, &msg.payload),
                        None => break,
                    },
                    _ = reload.tick() => {
                        if let Err(e) = s.reload(&limits, &coordinator).await {
                            tracing::warn!(error = %e, "could not read the limits again");
                        }
                    }
                }
            }
        });
        Ok(store)
    }

    /// Reads every stored limit into the coordinator's scheduler.
    async fn reload(
        &self,
        limits: &stream::Stream,
        coordinator: &Coordinator,
    ) -> Result<(), String> {
        let mut info = limits
            .info_with_subjects(format!("{}.limits.*", self.prefix))
            .await
            .map_err(|e| format!("cannot list the limits: {e}"))?;
        let mut subjects = Vec::new();
        while let Some((subject, _)) = info
            .try_next()
            .await
            .map_err(|e| format!("cannot list the limits: {e}"))?
        {
            subjects.push(subject);
        }
        for subject in subjects {
            let msg = limits
                .get_last_raw_message_by_subject(&subject)
                .await
                .map_err(|e| format!("cannot read limit {subject}: {e}"))?;
            self.apply(coordinator, &subject, &msg.payload);
        }
        Ok(())
    }

    fn apply(&self, coordinator: &Coordinator, subject: &str, body: &[u8]) {
        let Some(name) = subject
            .strip_prefix(&self.prefix)
            .and_then(|s| s.strip_prefix(".limits."))
        else {
            return;
        };
        if body.is_empty() {
            coordinator.set_limit(name.to_string(), None);
            return;
        }
        match decode_envelope::<NamedLimit>(body) {
            Ok(size) if size.check().is_ok() => coordinator.set_limit(name.to_string(), Some(size)),
            Ok(size) => {
                tracing::warn!(
                    limit = name,
                    ?size,
                    "ignoring an invalid limit size on the limits subject"
                )
            }
            Err(e) => {
                tracing::warn!(limit = name, error = %e, "ignoring an undecodable limit message")
            }
        }
    }

    /// Stores a limit's size (`None`: removes it), acknowledged by JetStream.
    pub async fn set(&self, name: &str, size: Option<NamedLimit>) -> Result<(), String> {
        let body = match size {
            Some(l) => Bytes::from(encode_envelope(&l).map_err(|e| e.to_string())?),
            None => Bytes::new(),
        };
        let what = || format!("cannot store limit `{name}`");
        self.js
            .publish(format!("{}.limits.{name}", self.prefix), body)
            .await
            .map_err(|e| format!("{}: {e}", what()))?
            .await
            .map_err(|e| format!("{}: {e}", what()))?;
        Ok(())
    }
}
