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
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use pinazu_shared::api::RunInfo;
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::ids::FlowRunId;
use pinazu_shared::BoxFuture;

use crate::journal::{parse_frames, Journal, JournalEntry, JournalError, Replay};

enum Cmd {
    /// An entry for the run's journal subject and, for starts and ends, its runs
    /// subject; whether it ends the run.
    Append(String, Option<String>, Bytes, bool),
    /// The last stream sequence of a subject, as a read found it (0: none).
    Known(String, u64),
    /// Forget what is known of a run (claimed again by this process).
    Forget(FlowRunId),
    Flush(oneshot::Sender<Result<(), JournalError>>),
}

/// The JetStream journal.
pub struct JetStreamJournal {
    prefix: String,
    journal: stream::Stream,
    runs: stream::Stream,
    tx: mpsc::UnboundedSender<Cmd>,
    /// Runs another writer appended to after this one: this journal no longer appends
    /// to them (see `Writer::store`).
    fenced: Arc<Mutex<HashSet<FlowRunId>>>,
    /// The runs fenced, as they are (taken once, by the coordinator).
    lost: Mutex<Option<mpsc::UnboundedReceiver<FlowRunId>>>,
    /// Journal messages queued and not yet stored.
    backlog: Arc<std::sync::atomic::AtomicU64>,
}

fn err(what: &str, e: impl std::fmt::Display) -> JournalError {
    JournalError(format!("{what}: {e}"))
}

/// Stream names allow letters, digits, `-` and `_` only.
pub(crate) fn stream_name(prefix: &str, suffix: &str) -> String {
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

/// Finds or creates a stream with `replicas` copies (one per server of a NATS cluster,
/// up to 5): an existing stream with fewer is raised to `replicas`, so a coordinator
/// started with `--js-replicas 3` on a cluster makes what it finds survive a lost node.
pub async fn ensure_stream(
    js: &jetstream::Context,
    mut config: stream::Config,
    replicas: usize,
) -> Result<stream::Stream, String> {
    config.num_replicas = replicas.max(1);
    let mut stream = match js.get_or_create_stream(config.clone()).await {
        Ok(s) => s,
        // created meanwhile by another coordinator with other settings (replicas):
        // take it as it is, raised below
        Err(e) => js
            .get_stream(&config.name)
            .await
            .map_err(|_| e.to_string())?,
    };
    let have = stream.cached_info().config.num_replicas;
    if have < config.num_replicas {
        let mut raised = stream.cached_info().config.clone();
        raised.num_replicas = config.num_replicas;
        js.update_stream(raised).await.map_err(|e| {
            format!(
                "stream {} has {have} replica(s) and could not be given {}: {e}",
                config.name, config.num_replicas
            )
        })?;
        tracing::info!(stream = %config.name, from = have, to = config.num_replicas, "stream replicas raised");
        stream = js
            .get_stream(&config.name)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(stream)
}

impl JetStreamJournal {
    /// Creates (or finds) the streams, each with `replicas` copies, and starts the
    /// writer.
    pub async fn open(
        client: async_nats::Client,
        prefix: &str,
        replicas: usize,
    ) -> Result<Self, JournalError> {
        let client_max_payload = client.server_info().max_payload;
        let js = jetstream::new(client);
        let journal = ensure_stream(
            &js,
            stream::Config {
                name: stream_name(prefix, "JOURNAL"),
                subjects: vec![format!("{prefix}.journal.>")],
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(7 * 24 * 3600),
                ..Default::default()
            },
            replicas,
        )
        .await
        .map_err(|e| {
            err(
                "cannot create the journal stream (is JetStream enabled: nats-server -js?)",
                e,
            )
        })?;
        let runs = ensure_stream(
            &js,
            stream::Config {
                name: stream_name(prefix, "RUNS"),
                subjects: vec![format!("{prefix}.runs.>")],
                storage: stream::StorageType::File,
                max_messages_per_subject: 1,
                max_age: Duration::from_secs(7 * 24 * 3600),
                ..Default::default()
            },
            replicas,
        )
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
        let fenced = Arc::new(Mutex::new(HashSet::new()));
        let (lost_tx, lost) = mpsc::unbounded_channel();
        let backlog = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let w = Writer {
            backlog: backlog.clone(),
            js,
            queues: HashMap::new(),
            last: HashMap::new(),
            fenced: fenced.clone(),
            lost: lost_tx,
            ids: (fastrand::u64(..), 0),
            warned: false,
        };
        tokio::spawn(writer(w, rx, limit));
        JetStreamJournal {
            prefix: prefix.to_string(),
            journal,
            runs,
            tx,
            fenced,
            lost: Mutex::new(Some(lost)),
            backlog,
        }
    }

    fn journal_subject(&self, run: FlowRunId) -> String {
        format!("{}.journal.{run}", self.prefix)
    }
}

/// A message not yet stored: its body, its `Nats-Msg-Id` (a retry of a message the
/// server stored but whose ack was lost is then a duplicate, not a fence), and whether
/// it ends the run.
struct Queued {
    body: Bytes,
    id: String,
    ends: bool,
}

/// The journal's writer: messages not yet stored, per subject and in order, and the
/// last stream sequence of each subject it writes.
///
/// Fencing: every message carries `Nats-Expected-Last-Subject-Sequence` with the
/// subject's last sequence this writer knows (from its own acks, or from the read that
/// preceded a resume). A coordinator that takes a run over reads its journal and
/// appends; from then on an append by the run's previous host expects a sequence that
/// is no longer the last, JetStream refuses it (wrong last sequence), and the writer
/// marks the run fenced: nothing more of it is appended, and the coordinator lets the
/// run go. Two hosts can never both extend a run's journal.
struct Writer {
    js: jetstream::Context,
    queues: HashMap<String, VecDeque<Queued>>,
    last: HashMap<String, u64>,
    fenced: Arc<Mutex<HashSet<FlowRunId>>>,
    lost: mpsc::UnboundedSender<FlowRunId>,
    /// This writer's message id prefix (random) and counter.
    ids: (u64, u64),
    warned: bool,
    backlog: Arc<std::sync::atomic::AtomicU64>,
}

/// Retry period of what is queued while JetStream is unreachable.
const RETRY: Duration = Duration::from_millis(250);

/// The run a journal or runs subject is about (its last token).
fn run_of(subject: &str) -> Option<FlowRunId> {
    subject
        .rsplit('.')
        .next()
        .and_then(|id| FlowRunId::parse(id, "journal subject").ok())
}

impl Writer {
    fn queue(&mut self, subject: String, body: Bytes, ends: bool) {
        if run_of(&subject).is_some_and(|r| self.is_fenced(r)) {
            return;
        }
        self.ids.1 += 1;
        let id = format!("{:016x}-{}", self.ids.0, self.ids.1);
        self.queues
            .entry(subject)
            .or_default()
            .push_back(Queued { body, id, ends });
        self.backlog
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The backlog as the queues are now (after messages left them).
    fn count_backlog(&self) {
        let n: usize = self.queues.values().map(|q| q.len()).sum();
        self.backlog
            .store(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn is_fenced(&self, run: FlowRunId) -> bool {
        self.fenced
            .lock()
            .map(|f| f.contains(&run))
            .unwrap_or(false)
    }

    fn warn(&mut self, e: &dyn std::fmt::Display) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(error = %e, "journal entries cannot be stored in JetStream now; keeping them and retrying");
        }
    }

    /// The subject's next queued message is stored at `seq`: off the queue, and `seq`
    /// is what the next one expects (forgotten once the run ended here).
    fn stored(&mut self, subject: String, seq: u64) {
        let ends = match self.queues.get_mut(&subject) {
            Some(q) => {
                let ends = q.pop_front().is_some_and(|m| m.ends);
                if q.is_empty() {
                    self.queues.remove(&subject);
                }
                ends
            }
            None => false,
        };
        if ends {
            // the run is over: nothing more is appended to it here
            self.last.remove(&subject);
        } else {
            self.last.insert(subject, seq);
        }
    }

    /// The sequence of the subject's last message when it is the next queued one of
    /// this writer (same `Nats-Msg-Id`).
    async fn stored_as(&self, subject: &str) -> Option<u64> {
        let ours = self.queues.get(subject)?.front()?.id.clone();
        let name = self.js.stream_by_subject(subject).await.ok()?;
        let stream = self.js.get_stream(name).await.ok()?;
        let last = stream.get_last_raw_message_by_subject(subject).await.ok()?;
        let id = last.headers.get(async_nats::header::NATS_MESSAGE_ID)?;
        (id.as_str() == ours).then_some(last.sequence)
    }

    /// Another writer appended to the run: drop what is queued for it, stop writing it.
    fn fence(&mut self, subject: &str) {
        let Some(run) = run_of(subject) else {
            self.queues.remove(subject);
            return;
        };
        tracing::error!(flow_run_id = %run, "another coordinator has written this run's journal since (it took the run over): this coordinator no longer journals it and lets it go");
        let tail = format!(".{run}");
        self.queues.retain(|s, _| !s.ends_with(&tail));
        self.last.retain(|s, _| !s.ends_with(&tail));
        if let Ok(mut f) = self.fenced.lock() {
            f.insert(run);
        }
        let _ = self.lost.send(run);
    }

    /// Stores everything queued: rounds of one message per subject, published side by
    /// side, each expecting the subject's last sequence (when known); Ok once nothing
    /// is queued. What JetStream did not store stays queued, in order.
    async fn store(&mut self) -> Result<(), JournalError> {
        loop {
            let subjects: Vec<String> = self.queues.keys().cloned().collect();
            if subjects.is_empty() {
                if self.warned {
                    self.warned = false;
                    tracing::info!("journal entries stored in JetStream again");
                }
                return Ok(());
            }
            let mut acks = Vec::with_capacity(subjects.len());
            let mut failure: Option<String> = None;
            for subject in subjects {
                let Some(q) = self.queues.get(&subject).and_then(|q| q.front()) else {
                    self.queues.remove(&subject);
                    continue;
                };
                let mut m = jetstream::message::PublishMessage::build()
                    .payload(q.body.clone())
                    .message_id(&q.id);
                if let Some(seq) = self.last.get(&subject) {
                    m = m.expected_last_subject_sequence(*seq);
                }
                match self.js.send_publish(subject.clone(), m).await {
                    Ok(ack) => acks.push((subject, ack)),
                    Err(e) => {
                        failure = Some(e.to_string());
                        break;
                    }
                }
            }
            for (subject, ack) in acks {
                match ack.await {
                    Ok(a) => self.stored(subject, a.sequence),
                    Err(e)
                        if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence =>
                    {
                        // ours after all? (stored, its ack lost, and retried after the
                        // server's duplicate window): then it is not a fence
                        match self.stored_as(&subject).await {
                            Some(seq) => self.stored(subject, seq),
                            None => self.fence(&subject),
                        }
                    }
                    Err(e) => failure = Some(e.to_string()),
                }
            }
            if let Some(e) = failure {
                self.warn(&e);
                let n: usize = self.queues.values().map(VecDeque::len).sum();
                return Err(JournalError(format!(
                    "{n} journal messages are not stored yet (JetStream: {e}); they are kept and retried"
                )));
            }
        }
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

async fn writer(mut w: Writer, mut rx: mpsc::UnboundedReceiver<Cmd>, limit: usize) {
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => cmd,
                None => break,
            },
            _ = retry.tick(), if !w.queues.is_empty() => {
                let _ = w.store().await;
                w.count_backlog();
                continue;
            }
        };
        // everything queued meanwhile goes in this batch
        let mut batch = Batch::new(limit);
        let mut flushes = Vec::new();
        let mut ending = HashSet::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Append(subject, also, envelope, ends) => {
                    if ends {
                        ending.insert(subject.clone());
                    }
                    batch.framed(subject, &envelope);
                    if let Some(runs) = also {
                        if ends {
                            ending.insert(runs.clone());
                        }
                        batch.single(runs, &envelope);
                    }
                }
                Cmd::Forget(run) => {
                    let tail = format!(".{run}");
                    w.last.retain(|s, _| !s.ends_with(&tail));
                }
                Cmd::Known(subject, seq) => {
                    // (what was batched before it is queued first, in order)
                    for (subject, body) in std::mem::take(&mut batch.messages) {
                        let ends = ending.remove(&subject);
                        w.queue(subject, Bytes::from(body), ends);
                    }
                    batch.open.clear();
                    // a read made while this writer has appends of the subject on the
                    // way knows less than the writer will; nor does a read older than
                    // the writer's last ack (never backwards: `Forget` resets a run)
                    if !w.queues.contains_key(&subject) {
                        let last = w.last.entry(subject).or_insert(seq);
                        *last = (*last).max(seq);
                    }
                }
                Cmd::Flush(done) => flushes.push(done),
            }
            taken += 1;
            if taken < MAX_CMDS {
                next = rx.try_recv().ok();
            }
        }
        // the end goes with the subject's last message of the batch
        let last: HashMap<&str, usize> = batch
            .messages
            .iter()
            .enumerate()
            .map(|(i, (subject, _))| (subject.as_str(), i))
            .collect();
        let ends: Vec<bool> = (0..batch.messages.len())
            .map(|i| {
                let subject = batch.messages[i].0.as_str();
                ending.contains(subject) && last.get(subject) == Some(&i)
            })
            .collect();
        for ((subject, body), ends) in batch.messages.into_iter().zip(ends) {
            w.queue(subject, Bytes::from(body), ends);
        }
        let r = w.store().await;
        w.count_backlog();
        for done in flushes {
            let _ = done.send(r.clone());
        }
    }
}

/// A message read back: its subject, body, stream sequence and when it was stored (ms
/// since the Unix epoch).
pub(crate) struct Read {
    pub subject: String,
    pub payload: Bytes,
    pub seq: u64,
    pub at_ms: u64,
}

/// Every message on `filter` (from the start, or the last per subject), in order.
pub(crate) async fn read_all(
    stream: &stream::Stream,
    filter: String,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<Vec<Read>, JournalError> {
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
            let (seq, at_ms) = m.info().map_or((0, 0), |i| {
                (
                    i.stream_sequence,
                    (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
                )
            });
            out.push(Read {
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
                seq,
                at_ms,
            });
        }
        if got == 0 {
            break;
        }
    }
    Ok(out)
}

impl JetStreamJournal {
    /// The last message of every run in the runs stream (its start, or its end).
    async fn runs_latest(&self) -> Result<Vec<Read>, JournalError> {
        read_all(
            &self.runs,
            format!("{}.runs.>", self.prefix),
            consumer::DeliverPolicy::LastPerSubject,
        )
        .await
    }
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
                let ends = matches!(entry, JournalEntry::RunEnded { .. });
                let _ = self.tx.send(Cmd::Append(
                    self.journal_subject(run),
                    also,
                    Bytes::from(b),
                    ends,
                ));
            }
            Err(e) => tracing::error!(error = %e, "journal entry could not be encoded"),
        }
    }

    fn fenced(&self, run: FlowRunId) -> bool {
        self.fenced
            .lock()
            .map(|f| f.contains(&run))
            .unwrap_or(false)
    }

    fn backlog(&self) -> u64 {
        self.backlog.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn unfence(&self, run: FlowRunId) {
        if let Ok(mut f) = self.fenced.lock() {
            f.remove(&run);
        }
        let _ = self.tx.send(Cmd::Forget(run));
    }

    fn lost(&self) -> Option<mpsc::UnboundedReceiver<FlowRunId>> {
        self.lost.lock().ok().and_then(|mut l| l.take())
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
            let subject = self.journal_subject(run);
            // a run never journaled (every new run) is known by one message get (from the
            // stream's leader), without a consumer: creating one per start cost the server a consumer per run
            // (scripts/runs_soak.sh) and the start most of its time
            match self.journal.get_last_raw_message_by_subject(&subject).await {
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    let _ = self.tx.send(Cmd::Known(subject, 0));
                    return Ok(Vec::new());
                }
                _ => {}
            }
            let msgs =
                read_all(&self.journal, subject.clone(), consumer::DeliverPolicy::All).await?;
            // appends that follow this read (a resume) expect what it found last
            let last = msgs.last().map_or(0, |m| m.seq);
            let _ = self.tx.send(Cmd::Known(subject, last));
            // each message holds one or more length-prefixed entries
            let mut entries = Vec::with_capacity(msgs.len());
            for Read { payload, .. } in msgs {
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
                    Ok(entry) => {
                        let _ = self.tx.send(Cmd::Known(subject, msg.sequence));
                        Ok(Some(entry))
                    }
                    Err(e) => {
                        tracing::warn!(flow_run_id = %run, error = %e, "the run's latest state does not decode; ignored");
                        Ok(None)
                    }
                },
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    let _ = self.tx.send(Cmd::Known(subject, 0));
                    Ok(None)
                }
                Err(e) => Err(err("cannot read the runs stream", e)),
            }
        })
    }

    fn history(&self) -> BoxFuture<'_, Result<Vec<(RunInfo, u64)>, JournalError>> {
        Box::pin(async move {
            let msgs = self.runs_latest().await?;
            let now_ms = pinazu_shared::events::now_ms();
            let mut out = Vec::with_capacity(msgs.len());
            for m in msgs {
                let Some(run) = m
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|id| FlowRunId::parse(id, "runs subject").ok())
                else {
                    continue;
                };
                match decode_envelope::<JournalEntry>(&m.payload) {
                    Ok(JournalEntry::RunEnded {
                        summary: Some(info),
                        ..
                    }) => out.push((info, m.at_ms)),
                    Ok(JournalEntry::RunStarted {
                        flow,
                        started_at_ms,
                        meta,
                        ..
                    }) => {
                        let started = started_at_ms.unwrap_or(m.at_ms);
                        out.push((
                            RunInfo {
                                flow_run_id: run,
                                flow,
                                status: pinazu_shared::events::FlowStatus::Running,
                                tasks: 0,
                                completed: 0,
                                executions: 0,
                                cache_hits: 0,
                                retries: 0,
                                replayed: 0,
                                cancelled: 0,
                                wall_ms: now_ms.saturating_sub(started),
                                result: None,
                                error: None,
                                note: Some("no coordinator hosts it now".into()),
                                owner: None,
                                at_ms: None,
                                parent_run_id: meta.parent,
                            },
                            started,
                        ))
                    }
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<FlowRunId>, JournalError>> {
        Box::pin(async move {
            let msgs = self.runs_latest().await?;
            let mut runs = Vec::new();
            for Read {
                subject, payload, ..
            } in msgs
            {
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
