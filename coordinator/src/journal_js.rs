//! The journal in NATS JetStream (file storage), for distributed mode: the coordinator's
//! disk is not where a run's progress lives, so a coordinator started anywhere on the
//! same NATS resumes its runs.
//!
//! Two streams: `<P>_JOURNAL` holds every entry on `<prefix>.journal.<run>`;
//! `<P>_RUNS` keeps only each run's latest state (`max_messages_per_subject = 1`) on
//! `<prefix>.runs.<run>`, so finding unfinished runs reads one message per run.
//! Appends are batched: what queued while the writer was busy goes out as one message
//! per run (length-prefixed entries, up to the server's max payload), pipelined:
//! published without waiting, acks collected in the background;
//! `flush` waits for every ack. What JetStream did not store (server unreachable, no
//! ack) is kept in order and published again until it is: nothing is dropped, and
//! `flush` reports an error while anything is outstanding.

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::ids::FlowRunId;
use pinazu_shared::BoxFuture;

use crate::journal::{parse_frames, Journal, JournalEntry, JournalError, Replay};

enum Cmd {
    Append(String, Option<String>, Bytes),
    Flush(oneshot::Sender<Result<(), JournalError>>),
}

/// The JetStream journal.
pub struct JetStreamJournal {
    prefix: String,
    journal: stream::Stream,
    runs: stream::Stream,
    tx: mpsc::UnboundedSender<Cmd>,
}

fn err(what: &str, e: impl std::fmt::Display) -> JournalError {
    JournalError(format!("{what}: {e}"))
}

/// Stream names allow letters, digits, `-` and `_` only.
fn stream_name(prefix: &str, suffix: &str) -> String {
    let base: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{base}_{suffix}")
}

impl JetStreamJournal {
    /// Creates (or finds) the streams and starts the writer.
    pub async fn open(client: async_nats::Client, prefix: &str) -> Result<Self, JournalError> {
        let client_max_payload = client.server_info().max_payload;
        let js = jetstream::new(client);
        let journal = js
            .get_or_create_stream(stream::Config {
                name: stream_name(prefix, "JOURNAL"),
                subjects: vec![format!("{prefix}.journal.>")],
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(7 * 24 * 3600),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                err(
                    "cannot create the journal stream (is JetStream enabled: nats-server -js?)",
                    e,
                )
            })?;
        let runs = js
            .get_or_create_stream(stream::Config {
                name: stream_name(prefix, "RUNS"),
                subjects: vec![format!("{prefix}.runs.>")],
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                max_age: Duration::from_secs(7 * 24 * 3600),
                ..Default::default()
            })
            .await
            .map_err(|e| err("cannot create the runs stream", e))?;
        Ok(Self::start(js, client_max_payload, prefix, journal, runs))
    }

    /// Finds the streams a coordinator created, creating nothing (for the operator
    /// commands): `None` when there are none (no coordinator journaled under this
    /// prefix, or JetStream is off).
    pub async fn open_existing(
        client: async_nats::Client,
        prefix: &str,
    ) -> Result<Option<Self>, JournalError> {
        let client_max_payload = client.server_info().max_payload;
        let js = jetstream::new(client);
        let find = |suffix: &'static str| {
            let js = js.clone();
            let name = stream_name(prefix, suffix);
            async move {
                match js.get_stream(&name).await {
                    Ok(s) => Ok(Some(s)),
                    Err(e) => {
                        use jetstream::context::GetStreamErrorKind as K;
                        use jetstream::ErrorCode as C;
                        match e.kind() {
                            // not there, or no JetStream on this server: nothing
                            // journaled there
                            K::JetStream(j)
                                if [
                                    C::STREAM_NOT_FOUND,
                                    C::JETSTREAM_NOT_ENABLED,
                                    C::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
                                ]
                                .contains(&j.error_code()) =>
                            {
                                Ok(None)
                            }
                            _ => Err(err(&format!("cannot read the stream {name}"), e)),
                        }
                    }
                }
            }
        };
        let (Some(journal), Some(runs)) = (find("JOURNAL").await?, find("RUNS").await?) else {
            return Ok(None);
        };
        Ok(Some(Self::start(
            js,
            client_max_payload,
            prefix,
            journal,
            runs,
        )))
    }

    fn start(
        js: jetstream::Context,
        client_max_payload: usize,
        prefix: &str,
        journal: stream::Stream,
        runs: stream::Stream,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        // a message must stay under the server's limit (with room for headers)
        let limit = (client_max_payload.saturating_sub(4096)).max(64 * 1024);
        tokio::spawn(writer(js, rx, limit));
        JetStreamJournal {
            prefix: prefix.to_string(),
            journal,
            runs,
            tx,
        }
    }

    fn journal_subject(&self, run: FlowRunId) -> String {
        format!("{}.journal.{run}", self.prefix)
    }
}

type Pending = (String, Bytes, jetstream::context::PublishAckFuture);

/// Entries published and awaiting their acks, and entries not yet stored (the server
/// was unreachable or did not acknowledge): the backlog is kept, in order, and
/// published again until JetStream stores it; nothing appended is dropped.
#[derive(Default)]
struct Outstanding {
    pending: Vec<Pending>,
    backlog: std::collections::VecDeque<(String, Bytes)>,
    warned: bool,
}

/// Retry period of the backlog while JetStream is unreachable.
const RETRY: Duration = Duration::from_millis(250);

impl Outstanding {
    async fn publish(&mut self, js: &jetstream::Context, subject: String, payload: Bytes) {
        if !self.backlog.is_empty() {
            // keep the order: behind what waits already
            self.backlog.push_back((subject, payload));
            return;
        }
        match js.publish(subject.clone(), payload.clone()).await {
            Ok(ack) => self.pending.push((subject, payload, ack)),
            Err(e) => {
                self.warn(&e);
                self.backlog.push_back((subject, payload));
            }
        }
    }

    fn warn(&mut self, e: &dyn std::fmt::Display) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(error = %e, "journal entries cannot be stored in JetStream now; keeping them and retrying");
        }
    }

    /// Waits for every ack, then publishes the backlog again; Ok once nothing is
    /// outstanding.
    async fn settle(&mut self, js: &jetstream::Context) -> Result<(), JournalError> {
        let mut failed = Vec::new();
        for (subject, payload, ack) in std::mem::take(&mut self.pending) {
            if let Err(e) = ack.await {
                self.warn(&e);
                failed.push((subject, payload));
            }
        }
        // unacknowledged entries go before the backlog (they were appended earlier)
        for entry in failed.into_iter().rev() {
            self.backlog.push_front(entry);
        }
        while let Some((subject, payload)) = self.backlog.pop_front() {
            let stored = match js.publish(subject.clone(), payload.clone()).await {
                Ok(ack) => ack.await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = stored {
                self.warn(&e);
                self.backlog.push_front((subject, payload));
                return Err(JournalError(format!(
                    "{} journal entries are not stored yet (JetStream: {e}); they are kept and retried",
                    self.backlog.len()
                )));
            }
        }
        if self.warned {
            self.warned = false;
            tracing::info!("journal entries stored in JetStream again");
        }
        Ok(())
    }
}

/// Commands taken per batch, at most.
const MAX_CMDS: usize = 4096;

/// Journal messages of one writer batch: each run's entries go as few messages as fit
/// (length-prefixed frames, as in the local journal), the runs stream one per entry.
struct Batch {
    limit: usize,
    messages: Vec<(String, Vec<u8>)>,
    /// Index in `messages` of the open journal message of each subject.
    open: std::collections::HashMap<String, usize>,
}

impl Batch {
    fn new(limit: usize) -> Self {
        Batch {
            limit,
            messages: Vec::new(),
            open: std::collections::HashMap::new(),
        }
    }

    fn too_large(&self, subject: &str, len: usize) -> bool {
        if len + 4 > self.limit {
            tracing::error!(subject, bytes = len, limit = self.limit, "journal entry larger than the NATS max payload; not journaled (the call runs again on resume)");
            return true;
        }
        false
    }

    /// Appends an entry to the subject's open message, or opens a new one.
    fn framed(&mut self, subject: String, envelope: &[u8]) {
        if self.too_large(&subject, envelope.len()) {
            return;
        }
        let fits = self
            .open
            .get(&subject)
            .is_some_and(|&i| self.messages[i].1.len() + 4 + envelope.len() <= self.limit);
        let i = match self.open.get(&subject) {
            Some(&i) if fits => i,
            _ => {
                self.messages.push((subject.clone(), Vec::new()));
                let i = self.messages.len() - 1;
                self.open.insert(subject, i);
                i
            }
        };
        let body = &mut self.messages[i].1;
        body.extend_from_slice(&(envelope.len() as u32).to_le_bytes());
        body.extend_from_slice(envelope);
    }

    /// A message of its own, holding one envelope.
    fn single(&mut self, subject: String, envelope: &[u8]) {
        if !self.too_large(&subject, envelope.len()) {
            self.messages.push((subject, envelope.to_vec()));
        }
    }
}

async fn writer(js: jetstream::Context, mut rx: mpsc::UnboundedReceiver<Cmd>, limit: usize) {
    let mut out = Outstanding::default();
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => cmd,
                None => break,
            },
            _ = retry.tick(), if !out.backlog.is_empty() => {
                let _ = out.settle(&js).await;
                continue;
            }
        };
        // everything queued meanwhile goes in this batch
        let mut batch = Batch::new(limit);
        let mut flushes = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Append(subject, also, envelope) => {
                    batch.framed(subject, &envelope);
                    if let Some(runs) = also {
                        batch.single(runs, &envelope);
                    }
                }
                Cmd::Flush(done) => flushes.push(done),
            }
            taken += 1;
            if taken < MAX_CMDS {
                next = rx.try_recv().ok();
            }
        }
        for (subject, body) in batch.messages {
            out.publish(&js, subject, Bytes::from(body)).await;
        }
        // keep the window of unacknowledged messages bounded
        if !flushes.is_empty() || out.pending.len() >= 1024 {
            let r = out.settle(&js).await;
            for done in flushes {
                let _ = done.send(r.clone());
            }
        }
    }
}

/// Every message on `filter` (from the start, or the last per subject), in order.
async fn read_all(
    stream: &stream::Stream,
    filter: String,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<Vec<(String, Bytes)>, JournalError> {
    let mut c: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: filter,
            deliver_policy,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| err("cannot read the journal", e))?;
    let mut pending = c
        .info()
        .await
        .map_err(|e| err("cannot read the journal", e))?
        .num_pending;
    let mut out = Vec::new();
    while pending > 0 {
        let mut batch = c
            .fetch()
            .max_messages(pending.min(2000) as usize)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| err("cannot read the journal", e))?;
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| err("cannot read the journal", e))?;
            got += 1;
            pending = m.info().map(|i| i.pending).unwrap_or(0);
            out.push((m.subject.to_string(), m.payload.clone()));
        }
        if got == 0 {
            break;
        }
    }
    Ok(out)
}

impl Journal for JetStreamJournal {
    fn append(&self, run: FlowRunId, entry: JournalEntry) {
        let also = matches!(
            entry,
            JournalEntry::RunStarted { .. } | JournalEntry::RunEnded { .. }
        )
        .then(|| format!("{}.runs.{run}", self.prefix));
        match encode_envelope(&entry) {
            Ok(b) => {
                let _ = self
                    .tx
                    .send(Cmd::Append(self.journal_subject(run), also, Bytes::from(b)));
            }
            Err(e) => tracing::error!(error = %e, "journal entry could not be encoded"),
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), JournalError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            self.tx
                .send(Cmd::Flush(tx))
                .map_err(|_| JournalError("the journal writer is gone".into()))?;
            rx.await
                .map_err(|_| JournalError("the journal writer stopped".into()))?
        })
    }

    fn read(&self, run: FlowRunId) -> BoxFuture<'_, Result<Vec<JournalEntry>, JournalError>> {
        Box::pin(async move {
            let msgs = read_all(
                &self.journal,
                self.journal_subject(run),
                consumer::DeliverPolicy::All,
            )
            .await?;
            // each message holds one or more length-prefixed entries
            let mut entries = Vec::with_capacity(msgs.len());
            for (_, payload) in msgs {
                let before = entries.len();
                entries.extend(parse_frames(&payload));
                if entries.len() == before && !payload.is_empty() {
                    tracing::warn!(flow_run_id = %run, bytes = payload.len(), "skipping an undecodable journal message");
                }
            }
            Ok(entries)
        })
    }

    fn remove(&self, run: FlowRunId) -> BoxFuture<'_, Result<bool, JournalError>> {
        Box::pin(async move {
            let journal = self
                .journal
                .purge()
                .filter(self.journal_subject(run))
                .await
                .map_err(|e| err("cannot purge the run's journal", e))?;
            let runs = self
                .runs
                .purge()
                .filter(format!("{}.runs.{run}", self.prefix))
                .await
                .map_err(|e| err("cannot purge the run's state", e))?;
            Ok(journal.purged + runs.purged > 0)
        })
    }

    /// The run's latest state from the runs stream (one message), not its whole journal.
    fn latest(&self, run: FlowRunId) -> BoxFuture<'_, Result<Option<JournalEntry>, JournalError>> {
        Box::pin(async move {
            let subject = format!("{}.runs.{run}", self.prefix);
            match self.runs.get_last_raw_message_by_subject(&subject).await {
                Ok(msg) => match decode_envelope::<JournalEntry>(&msg.payload) {
                    Ok(entry) => Ok(Some(entry)),
                    Err(e) => {
                        tracing::warn!(flow_run_id = %run, error = %e, "the run's latest state does not decode; ignored");
                        Ok(None)
                    }
                },
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(err("cannot read the runs stream", e)),
            }
        })
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<FlowRunId>, JournalError>> {
        Box::pin(async move {
            let msgs = read_all(
                &self.runs,
                format!("{}.runs.>", self.prefix),
                consumer::DeliverPolicy::LastPerSubject,
            )
            .await?;
            let mut runs = Vec::new();
            for (subject, payload) in msgs {
                let Some(id) = subject.rsplit('.').next() else {
                    continue;
                };
                let Ok(run) = FlowRunId::parse(id, "journal subject") else {
                    continue;
                };
                if let Ok(entry) = decode_envelope::<JournalEntry>(&payload) {
                    if Replay::from_entries(std::slice::from_ref(&entry))
                        .is_some_and(|r| r.unfinished)
                    {
                        runs.push(run);
                    }
                }
            }
            Ok(runs)
        })
    }
}
