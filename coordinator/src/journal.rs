//! The journal: each run's progress, appended durably, so a run can be resumed after the
//! coordinator dies. Entries are MessagePack envelopes. A run's journal is replayed when a
//! run with its id starts again: calls whose outcome is journaled are answered at once,
//! by call id, without running anything.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use tokio::sync::oneshot;

use pinazu_shared::api::RunInfo;
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::error::ErrorInfo;
use pinazu_shared::events::{EventContext, FlowStatus};
use pinazu_shared::ids::{CallId, FlowRunId};
use pinazu_shared::store::ObjectStore;
use pinazu_shared::BoxFuture;

/// One journal entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum JournalEntry {
    /// A run started (or started again under its id).
    RunStarted {
        /// The flow.
        flow: String,
        /// Its parameters.
        params: Map<String, Value>,
        /// The idempotency key it was submitted with.
        idempotency_key: Option<String>,
        /// Header and trace id of its status events (kept for a resume).
        #[serde(default)]
        events: Option<EventContext>,
        /// When the run started (ms since the Unix epoch): a resume keeps the first
        /// start's, so its wall time does not start again.
        #[serde(default)]
        started_at_ms: Option<u64>,
        /// Its priority and parent run (default: 0, none).
        #[serde(default, skip_serializing_if = "RunMeta::is_plain")]
        meta: RunMeta,
    },
    /// A call's final outcome.
    CallEnded {
        /// Position of the call among the run's calls, in the order the flow made them.
        ordinal: u64,
        /// The call.
        call_id: CallId,
        /// Its task.
        task: String,
        /// MessagePack result, or the final error.
        outcome: Result<Bytes, ErrorInfo>,
        /// Attempts that executed.
        executions: u32,
        /// Object-store key of a large result (then `outcome` is empty): the payload the
        /// agent stored, kept until the run ends.
        #[serde(default)]
        outcome_ref: Option<String>,
    },
    /// The run ended.
    RunEnded {
        /// SUCCESS or FAILED.
        status: FlowStatus,
        /// What `status` answers for the run once no coordinator hosts it any more
        /// (a restarted one); the result is left out when large.
        #[serde(default)]
        summary: Option<RunInfo>,
        /// The parameters it ran with, so this entry alone says which run the id names
        /// (a successful run's local journal keeps only this entry).
        #[serde(default)]
        params: Option<Map<String, Value>>,
        /// Object-store key of a result too large to keep in `summary`.
        #[serde(default)]
        result_ref: Option<String>,
        /// A large result could not be kept: the id given again runs the flow again
        /// (its calls answer from the journal) instead of answering without it.
        #[serde(default)]
        result_lost: bool,
    },
}

/// Errors of a journal.
#[derive(Clone, Debug, thiserror::Error)]
#[error("journal: {0}")]
pub struct JournalError(pub String);

/// Where runs' progress is kept.
pub trait Journal: Send + Sync + 'static {
    /// Whether entries are kept at all.
    fn enabled(&self) -> bool {
        true
    }
    /// Queues an entry; it becomes durable within a batch (see `flush`).
    fn append(&self, run: FlowRunId, entry: JournalEntry);
    /// Resolves once every entry queued before it is durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), JournalError>>;
    /// A run's entries, oldest first (a torn last entry is ignored).
    fn read(&self, run: FlowRunId) -> BoxFuture<'_, Result<Vec<JournalEntry>, JournalError>>;
    /// Runs that started and have not ended.
    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<FlowRunId>, JournalError>>;
    /// Removes a run's journal (operators: `app journal rm RUN`); whether there was one.
    fn remove(&self, _run: FlowRunId) -> BoxFuture<'_, Result<bool, JournalError>> {
        Box::pin(async { Ok(false) })
    }
    /// Every run the journal keeps (its latest state) and when that state was written
    /// (ms since the Unix epoch): `runs` lists them after every coordinator restarted.
    fn history(&self) -> BoxFuture<'_, Result<Vec<(RunInfo, u64)>, JournalError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    /// Journal messages queued and not yet durable (0 when it cannot tell).
    fn backlog(&self) -> u64 {
        0
    }
    /// Whether another writer appended to the run after this one (it took the run
    /// over): this journal no longer appends to it.
    fn fenced(&self, _run: FlowRunId) -> bool {
        false
    }
    /// This process claimed the run (again): whatever an earlier host of it here left
    /// behind (a fence, a known sequence) is forgotten; the read that follows says
    /// where the run's journal stands.
    fn unfence(&self, _run: FlowRunId) {}
    /// The runs this journal is fenced from, as that happens (taken once).
    fn lost(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<FlowRunId>> {
        None
    }
    /// Claims the run for this process while the returned guard lives: a second process
    /// sharing the journal cannot run it at the same time ([`Claim::Taken`]). Journals
    /// that only one process writes need no claim.
    fn claim(&self, _run: FlowRunId) -> Result<Claim, JournalError> {
        Ok(Claim::Held(None))
    }
    /// The run's latest `RunStarted` or `RunEnded`, if the journal has the run.
    fn latest(&self, run: FlowRunId) -> BoxFuture<'_, Result<Option<JournalEntry>, JournalError>> {
        Box::pin(async move {
            let entries = self.read(run).await?;
            Ok(entries.into_iter().rev().find(|e| {
                matches!(
                    e,
                    JournalEntry::RunStarted { .. } | JournalEntry::RunEnded { .. }
                )
            }))
        })
    }
    /// The summary of an ended run, if the journal still has it.
    fn ended(&self, run: FlowRunId) -> BoxFuture<'_, Result<Option<RunInfo>, JournalError>> {
        Box::pin(async move {
            Ok(match self.latest(run).await? {
                Some(JournalEntry::RunEnded { summary, .. }) => summary,
                _ => None,
            })
        })
    }
}

/// The outcome of [`Journal::claim`].
pub enum Claim {
    /// This process holds the run until the guard is dropped.
    Held(Option<Box<dyn std::any::Any + Send + Sync>>),
    /// Another process holds it (what is known of it).
    Taken(String),
}

/// No journal: nothing survives the process.
#[derive(Debug, Default)]
pub struct NoJournal;

impl Journal for NoJournal {
    fn enabled(&self) -> bool {
        false
    }
    fn append(&self, _run: FlowRunId, _entry: JournalEntry) {}
    fn flush(&self) -> BoxFuture<'_, Result<(), JournalError>> {
        Box::pin(async { Ok(()) })
    }
    fn read(&self, _run: FlowRunId) -> BoxFuture<'_, Result<Vec<JournalEntry>, JournalError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<FlowRunId>, JournalError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn ended(&self, _run: FlowRunId) -> BoxFuture<'_, Result<Option<RunInfo>, JournalError>> {
        Box::pin(async { Ok(None) })
    }
}

enum WriterCmd {
    Append(FlowRunId, Vec<u8>),
    /// The run succeeded: nothing in its journal will be needed again but this frame
    /// (its `RunEnded`, which says which run the id names and how it ended).
    Compact(FlowRunId, Vec<u8>),
    Flush(oneshot::Sender<Result<(), JournalError>>),
}

/// How long the journal of an ended run is kept (as the JetStream journal's max age).
pub const RETENTION: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// One append-only file per run under a directory (`<run>.journal`), written by one
/// thread in batches: every batch is one `write` per run and one `fdatasync` per file,
/// so journaling a large fan-out costs a few syscalls per batch, not per call.
///
/// A run that ends SUCCESS has its file replaced by its `RunEnded` entry alone (written
/// aside, synced, renamed over): its id keeps answering its outcome. Files of ended
/// runs older than [`RETENTION`] are removed when the journal is opened.
pub struct LocalJournal {
    dir: PathBuf,
    tx: std::sync::Mutex<std_mpsc::Sender<WriterCmd>>,
}

impl LocalJournal {
    /// A journal in `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, JournalError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| JournalError(format!("cannot create {}: {e}", dir.display())))?;
        let (tx, rx) = std_mpsc::channel();
        let d = dir.clone();
        std::thread::Builder::new()
            .name("pinazu-journal".into())
            .spawn(move || {
                prune(&d, RETENTION);
                writer(d, rx)
            })
            .map_err(|e| JournalError(format!("cannot start the journal writer: {e}")))?;
        Ok(LocalJournal {
            dir,
            tx: std::sync::Mutex::new(tx),
        })
    }

    fn path(dir: &Path, run: FlowRunId) -> PathBuf {
        dir.join(format!("{run}.journal"))
    }

    fn send(&self, cmd: WriterCmd) -> bool {
        self.tx.lock().map(|t| t.send(cmd).is_ok()).unwrap_or(false)
    }

    fn lock_path(dir: &Path, run: FlowRunId) -> PathBuf {
        dir.join(format!("{run}.lock"))
    }
}

/// Removes the journals of runs that ended longer than `age` ago.
fn prune(dir: &Path, age: std::time::Duration) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let now = std::time::SystemTime::now();
    for entry in rd.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) == Some("tmp") {
            // a compaction that did not finish (the process died): its journal is intact
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("journal") {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > age);
        if !old {
            continue;
        }
        let ended = std::fs::read(&path).is_ok_and(|bytes| {
            matches!(
                parse_frames(&bytes).last(),
                Some(JournalEntry::RunEnded { .. })
            )
        });
        if ended {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(path.with_extension("lock"));
        }
    }
}

/// Replaces a run's journal with `frame`: written aside, synced, renamed over.
fn compact(dir: &Path, run: FlowRunId, frame: &[u8]) -> std::io::Result<()> {
    let path = LocalJournal::path(dir, run);
    let tmp = path.with_extension("journal.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(frame)?;
    f.sync_data()?;
    std::fs::rename(&tmp, &path)?;
    // the rename itself is durable once the directory is
    std::fs::File::open(dir)?.sync_all()
}

fn writer(dir: PathBuf, rx: std_mpsc::Receiver<WriterCmd>) {
    let mut files: HashMap<FlowRunId, std::fs::File> = HashMap::new();
    // runs whose file was checked for a torn tail by this process
    let mut checked: std::collections::HashSet<FlowRunId> = Default::default();
    while let Ok(first) = rx.recv() {
        if checked.len() > 100_000 {
            checked.clear(); // bounded; a check again costs one read
        }
        let mut batch: HashMap<FlowRunId, Vec<u8>> = HashMap::new();
        let mut compacts: HashMap<FlowRunId, Vec<u8>> = HashMap::new();
        let mut waiters = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(cmd) = next.take() {
            match cmd {
                WriterCmd::Append(run, frame) => {
                    batch.entry(run).or_default().extend_from_slice(&frame);
                }
                WriterCmd::Compact(run, frame) => {
                    // what was appended before it is superseded; what comes after it
                    // is written after it
                    batch.remove(&run);
                    compacts.insert(run, frame);
                }
                WriterCmd::Flush(w) => waiters.push(w),
            }
            taken += 1;
            if taken < 8192 {
                next = rx.try_recv().ok();
            }
        }
        let mut error = None;
        for (run, frame) in compacts {
            files.remove(&run);
            if let Err(e) = compact(&dir, run, &frame) {
                error = Some(format!("compact {run}: {e}"));
            }
        }
        for (run, bytes) in batch {
            let file = match files.get_mut(&run) {
                Some(f) => f,
                None => {
                    let path = LocalJournal::path(&dir, run);
                    let opened = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .and_then(|f| {
                            // once per run and process: only a dead writer leaves a tear
                            if checked.insert(run) {
                                cut_torn_tail(&f, &path)?;
                            }
                            Ok(f)
                        });
                    match opened {
                        Ok(f) => files.entry(run).or_insert(f),
                        Err(e) => {
                            error = Some(format!("open {run}: {e}"));
                            continue;
                        }
                    }
                }
            };
            if let Err(e) = file.write_all(&bytes).and_then(|_| file.sync_data()) {
                error = Some(format!("write {run}: {e}"));
            }
        }
        if files.len() > 256 {
            files.clear(); // reopened on demand; keeps descriptors bounded
        }
        if let Some(e) = &error {
            tracing::error!(error = %e, "journal write failed");
        }
        for w in waiters {
            let _ = w.send(match &error {
                None => Ok(()),
                Some(e) => Err(JournalError(e.clone())),
            });
        }
    }
}

/// Splits a journal file into entries; stops at a torn frame (its length runs past the
/// end: a writer died mid-write). A whole frame that does not decode (written by a newer
/// version, or damaged) is skipped with a warning: the entries after it still count.
pub fn parse_frames(bytes: &[u8]) -> Vec<JournalEntry> {
    parse_prefix(bytes).0
}

/// The entries of the whole frames of a journal file, and the length they span.
fn parse_prefix(bytes: &[u8]) -> (Vec<JournalEntry>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(head) = bytes.get(at..at + 4) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let Some(frame) = bytes.get(at + 4..at + 4 + len) else {
            break;
        };
        match decode_envelope::<JournalEntry>(frame) {
            Ok(e) => out.push(e),
            Err(e) => {
                tracing::warn!(offset = at, bytes = len, error = %e, "skipping a journal entry that does not decode")
            }
        }
        at += 4 + len;
    }
    if at < bytes.len() {
        tracing::warn!(
            entries = out.len(),
            offset = at,
            ignored_bytes = bytes.len() - at,
            "a journal has bytes after its last whole entry (a torn write, or a damaged length): ignored"
        );
    }
    (out, at)
}

/// Cuts a journal file back to its last whole frame (a process died mid-write): what
/// is appended next must follow it, or the reader, which stops at the tear, would never
/// see it.
fn cut_torn_tail(file: &std::fs::File, path: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read(path)?;
    let (_, whole) = parse_prefix(&bytes);
    if whole < bytes.len() {
        tracing::warn!(
            journal = %path.display(),
            kept = whole,
            cut = bytes.len() - whole,
            "journal ends with a torn entry (a process died while writing it): cut back to the last whole entry"
        );
        file.set_len(whole as u64)?;
        file.sync_data()?;
    }
    Ok(())
}

/// Encodes one entry as a length-prefixed frame.
pub fn frame(entry: &JournalEntry) -> Option<Vec<u8>> {
    let body = encode_envelope(entry).ok()?;
    let mut f = Vec::with_capacity(body.len() + 4);
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&body);
    Some(f)
}

impl Journal for LocalJournal {
    fn remove(&self, run: FlowRunId) -> BoxFuture<'_, Result<bool, JournalError>> {
        Box::pin(async move {
            if let Claim::Taken(holder) = self.claim(run)? {
                return Err(JournalError(format!(
                    "flow run {run} is running in {holder}; stop it first"
                )));
            }
            let path = Self::path(&self.dir, run);
            let existed = match std::fs::remove_file(&path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(JournalError(format!("remove {}: {e}", path.display()))),
            };
            let _ = std::fs::remove_file(Self::lock_path(&self.dir, run));
            Ok(existed)
        })
    }

    /// An exclusive lock (`flock`) on `<run>.lock`, which holds the pid of its holder;
    /// released when the guard is dropped or the process dies.
    fn claim(&self, run: FlowRunId) -> Result<Claim, JournalError> {
        let path = Self::lock_path(&self.dir, run);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| JournalError(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {
                let _ = file.set_len(0);
                let _ = write!(file, "{}", std::process::id());
                Ok(Claim::Held(Some(Box::new(file))))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                Ok(Claim::Taken(if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("process {holder}")
                }))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                Err(JournalError(format!("cannot lock {}: {e}", path.display())))
            }
        }
    }

    fn append(&self, run: FlowRunId, entry: JournalEntry) {
        // a successful run's journal shrinks to its end (a failed one is kept whole:
        // running its id again reuses its successful calls)
        let succeeded = matches!(
            entry,
            JournalEntry::RunEnded {
                status: FlowStatus::Success,
                ..
            }
        );
        match frame(&entry) {
            Some(f) => {
                let cmd = if succeeded {
                    WriterCmd::Compact(run, f)
                } else {
                    WriterCmd::Append(run, f)
                };
                if !self.send(cmd) {
                    tracing::error!(flow_run_id = %run, "journal writer is gone; entry lost");
                }
            }
            None => tracing::error!(flow_run_id = %run, "journal entry could not be encoded"),
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), JournalError>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            if !self.send(WriterCmd::Flush(tx)) {
                return Err(JournalError("the journal writer is gone".into()));
            }
            rx.await
                .map_err(|_| JournalError("the journal writer stopped".into()))?
        })
    }

    fn read(&self, run: FlowRunId) -> BoxFuture<'_, Result<Vec<JournalEntry>, JournalError>> {
        Box::pin(async move {
            let path = Self::path(&self.dir, run);
            let mut bytes = Vec::new();
            match std::fs::File::open(&path) {
                Ok(mut f) => f
                    .read_to_end(&mut bytes)
                    .map_err(|e| JournalError(format!("read {}: {e}", path.display())))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(JournalError(format!("open {}: {e}", path.display()))),
            };
            Ok(parse_frames(&bytes))
        })
    }

    fn unfinished(&self) -> BoxFuture<'_, Result<Vec<FlowRunId>, JournalError>> {
        Box::pin(async move {
            let rd = std::fs::read_dir(&self.dir)
                .map_err(|e| JournalError(format!("list {}: {e}", self.dir.display())))?;
            let mut runs = Vec::new();
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let Some(id) = name.strip_suffix(".journal") else {
                    continue;
                };
                let Ok(run) = FlowRunId::parse(id, "journal file") else {
                    continue;
                };
                let entries = self.read(run).await?;
                if Replay::from_entries(&entries).is_some_and(|r| r.unfinished) {
                    runs.push(run);
                }
            }
            Ok(runs)
        })
    }
}

/// A call's journaled outcome.
#[derive(Clone, Debug)]
pub struct Ended {
    /// Position among the run's calls.
    pub ordinal: u64,
    /// The task.
    pub task: String,
    /// The outcome.
    pub outcome: Result<Bytes, ErrorInfo>,
    /// Where a large result is stored (`outcome` is empty until `load_refs`).
    pub outcome_ref: Option<String>,
}

/// What a run's journal says, ready to answer calls during a replay.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// The flow.
    pub flow: String,
    /// Its parameters.
    pub params: Map<String, Value>,
    /// Its idempotency key.
    pub idempotency_key: Option<String>,
    /// Outcomes by call.
    pub calls: HashMap<CallId, Ended>,
    /// Which call had which position.
    pub by_ordinal: HashMap<u64, CallId>,
    /// Attempts executed before this replay.
    pub executions: u64,
    /// Started and not ended (a resume), as opposed to a re-run of an ended run.
    pub unfinished: bool,
    /// How it ended, when it did.
    pub ended: Option<FlowStatus>,
    /// What `status` shows of the ended run.
    pub summary: Option<RunInfo>,
    /// Object-store key of its result, when too large for `summary`.
    pub result_ref: Option<String>,
    /// Its result could not be kept (see `JournalEntry::RunEnded`).
    pub result_lost: bool,
    /// Header and trace id of its status events.
    pub events: Option<EventContext>,
    /// When it (its latest start) started, ms since the Unix epoch.
    pub started_at_ms: Option<u64>,
    /// Its priority and parent.
    pub meta: RunMeta,
}

/// What a run carries besides its flow and parameters: its priority (higher runs first
/// when slots are scarce) and, for a child flow's run, its parent run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMeta {
    /// Higher first when slots are scarce (`run --priority N`).
    #[serde(default)]
    pub priority: i32,
    /// The run whose flow started this one (a child flow).
    #[serde(default)]
    pub parent: Option<FlowRunId>,
}

impl RunMeta {
    /// Priority 0 and no parent.
    pub fn is_plain(&self) -> bool {
        *self == RunMeta::default()
    }
}

impl Replay {
    /// Builds the replay of a run from its entries (`None` if it never started). A re-run
    /// of an ended run replays successes only; a resume replays every outcome.
    pub fn from_entries(entries: &[JournalEntry]) -> Option<Replay> {
        let mut r: Option<Replay> = None;
        for e in entries {
            match e {
                JournalEntry::RunStarted {
                    flow,
                    params,
                    idempotency_key,
                    events,
                    started_at_ms,
                    meta,
                } => {
                    let r = r.get_or_insert_with(Replay::default);
                    r.started_at_ms = *started_at_ms;
                    r.meta = *meta;
                    if r.ended.is_some() {
                        // started again after it ended (a re-run of a failed run): of
                        // the earlier runs only successes are reusable answers, and
                        // positions and executions count from this start
                        r.calls.retain(|_, e| e.outcome.is_ok());
                        r.by_ordinal.clear();
                        r.executions = 0;
                    }
                    r.flow = flow.clone();
                    r.params = params.clone();
                    r.idempotency_key = idempotency_key.clone();
                    r.events = events.clone();
                    r.unfinished = true;
                    r.ended = None;
                }
                JournalEntry::CallEnded {
                    ordinal,
                    call_id,
                    task,
                    outcome,
                    executions,
                    outcome_ref,
                } => {
                    let r = r.get_or_insert_with(Replay::default);
                    r.executions += *executions as u64;
                    r.by_ordinal.insert(*ordinal, *call_id);
                    r.calls.insert(
                        *call_id,
                        Ended {
                            ordinal: *ordinal,
                            task: task.clone(),
                            outcome: outcome.clone(),
                            outcome_ref: outcome_ref.clone(),
                        },
                    );
                }
                JournalEntry::RunEnded {
                    status,
                    summary,
                    params,
                    result_ref,
                    result_lost,
                } => {
                    // alone, it is a successful run's whole (compacted) journal
                    let r = r.get_or_insert_with(Replay::default);
                    if let Some(s) = summary {
                        r.flow = s.flow.clone();
                    }
                    if let Some(p) = params {
                        r.params = p.clone();
                    }
                    r.unfinished = false;
                    r.ended = Some(*status);
                    r.summary = summary.clone();
                    r.result_ref = result_ref.clone();
                    r.result_lost = *result_lost;
                }
            }
        }
        let mut r = r?;
        if !r.unfinished {
            r.calls.retain(|_, e| e.outcome.is_ok());
            let kept: std::collections::HashSet<CallId> = r.calls.keys().copied().collect();
            r.by_ordinal.retain(|_, c| kept.contains(c));
        }
        Some(r)
    }

    /// Loads the large results the journal points at from the store. A call whose
    /// result cannot be read is dropped from the replay (it runs again).
    pub async fn load_refs(&mut self, store: &dyn ObjectStore) {
        let refs: Vec<(CallId, String)> = self
            .calls
            .iter()
            .filter_map(|(id, e)| e.outcome_ref.clone().map(|k| (*id, k)))
            .collect();
        for (id, key) in refs {
            match store.get(&key).await {
                Ok(Some(bytes)) => {
                    if let Some(e) = self.calls.get_mut(&id) {
                        e.outcome = Ok(bytes);
                    }
                }
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        _ => "missing".into(),
                    };
                    tracing::warn!(call_id = %id, key, error = %why, "a journaled result cannot be read; the call runs again");
                    if let Some(e) = self.calls.remove(&id) {
                        self.by_ordinal.remove(&e.ordinal);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started() -> JournalEntry {
        JournalEntry::RunStarted {
            flow: "f".into(),
            params: Map::new(),
            idempotency_key: None,
            events: None,
            started_at_ms: None,
            meta: RunMeta::default(),
        }
    }

    fn run_ended(status: FlowStatus) -> JournalEntry {
        JournalEntry::RunEnded {
            status,
            summary: None,
            params: Some(Map::new()),
            result_ref: None,
            result_lost: false,
        }
    }

    fn ended(ordinal: u64, key: u64, ok: bool) -> JournalEntry {
        JournalEntry::CallEnded {
            ordinal,
            call_id: CallId { key, seq: 0 },
            task: "t".into(),
            outcome: if ok {
                Ok(Bytes::from_static(&[1]))
            } else {
                Err(ErrorInfo::new(
                    pinazu_shared::error::FailureKind::Error,
                    "x",
                ))
            },
            executions: 2,
            outcome_ref: None,
        }
    }

    #[tokio::test]
    async fn large_results_are_loaded_from_the_store_and_missing_ones_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = pinazu_shared::store::LocalDirStore::new(dir.path());
        store
            .put("payloads/r/big", Bytes::from_static(b"big result"))
            .await
            .unwrap();
        let by_ref = |ordinal, key: u64, object: &str| JournalEntry::CallEnded {
            ordinal,
            call_id: CallId { key, seq: 0 },
            task: "t".into(),
            outcome: Ok(Bytes::new()),
            executions: 1,
            outcome_ref: Some(object.into()),
        };
        let entries = vec![
            started(),
            by_ref(0, 1, "payloads/r/big"),
            by_ref(1, 2, "payloads/r/gone"),
        ];
        let mut r = Replay::from_entries(&entries).unwrap();
        r.load_refs(&store).await;
        let found = &r.calls[&CallId { key: 1, seq: 0 }];
        assert_eq!(found.outcome.as_ref().unwrap().as_ref(), b"big result");
        assert!(!r.calls.contains_key(&CallId { key: 2, seq: 0 }));
        assert!(!r.by_ordinal.contains_key(&1));
    }

    #[test]
    fn a_whole_entry_that_does_not_decode_is_skipped_not_the_ones_after_it() {
        let mut bytes = frame(&ended(0, 1, true)).unwrap();
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(b"???");
        bytes.extend(frame(&ended(1, 2, true)).unwrap());
        assert_eq!(parse_frames(&bytes).len(), 2);
        assert_eq!(parse_prefix(&bytes).1, bytes.len(), "nothing to cut");
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let mut bytes = Vec::new();
        for e in [ended(0, 1, true), ended(1, 2, true)] {
            bytes.extend(frame(&e).unwrap());
        }
        let full = bytes.len();
        bytes.extend(frame(&ended(2, 3, true)).unwrap());
        bytes.truncate(full + 5);
        assert_eq!(parse_frames(&bytes).len(), 2);
    }

    #[test]
    fn resume_replays_everything_and_a_rerun_only_successes() {
        let entries = vec![started(), ended(0, 1, true), ended(1, 2, false)];
        let r = Replay::from_entries(&entries).unwrap();
        assert!(r.unfinished);
        assert_eq!(r.calls.len(), 2);
        assert_eq!(r.executions, 4);
        let mut ended_run = entries.clone();
        ended_run.push(run_ended(FlowStatus::Failed));
        let r = Replay::from_entries(&ended_run).unwrap();
        assert!(!r.unfinished);
        assert_eq!(r.calls.len(), 1);
        assert!(Replay::from_entries(&[]).is_none());
    }

    #[test]
    fn a_rerun_of_a_failed_run_keeps_only_earlier_successes_and_its_own_positions() {
        // run 1: call 1 ok at #0, call 2 failed at #1, call 3 (a fallback) ok at #2
        let mut entries = vec![
            started(),
            ended(0, 1, true),
            ended(1, 2, false),
            ended(2, 3, true),
            run_ended(FlowStatus::Failed),
        ];
        // run 2 (the same id again): call 2 succeeds now, call 4 at #2; then it is killed
        entries.push(started());
        entries.push(ended(1, 2, true));
        entries.push(ended(2, 4, true));
        let r = Replay::from_entries(&entries).unwrap();
        assert!(r.unfinished);
        // call 2's old failure is gone, its new success is there
        assert!(r.calls[&CallId { key: 2, seq: 0 }].outcome.is_ok());
        // run 1's successes are reusable; positions are run 2's only
        assert!(r.calls.contains_key(&CallId { key: 1, seq: 0 }));
        assert!(r.calls.contains_key(&CallId { key: 3, seq: 0 }));
        assert_eq!(r.by_ordinal.get(&2), Some(&CallId { key: 4, seq: 0 }));
        assert_eq!(r.by_ordinal.len(), 2);
        assert_eq!(r.executions, 4, "run 2's executions only");
    }

    #[tokio::test]
    async fn a_successful_run_keeps_only_its_end_and_a_failed_one_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let j = LocalJournal::open(dir.path()).unwrap();
        let (ok, failed) = (FlowRunId::new(), FlowRunId::new());
        for (run, status) in [(ok, FlowStatus::Success), (failed, FlowStatus::Failed)] {
            j.append(run, started());
            j.append(run, ended(0, 9, true));
            j.append(run, run_ended(status));
        }
        j.flush().await.unwrap();
        let kept = j.read(ok).await.unwrap();
        assert_eq!(kept.len(), 1);
        let r = Replay::from_entries(&kept).unwrap();
        assert_eq!(r.ended, Some(FlowStatus::Success));
        assert!(!r.unfinished && r.calls.is_empty());
        assert_eq!(j.read(failed).await.unwrap().len(), 3);
        // old ended journals go when the journal is opened again; unfinished ones stay
        let unfinished = FlowRunId::new();
        j.append(unfinished, started());
        j.flush().await.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        prune(dir.path(), std::time::Duration::from_millis(10));
        assert!(j.read(ok).await.unwrap().is_empty());
        assert!(j.read(failed).await.unwrap().is_empty());
        assert_eq!(j.read(unfinished).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn entries_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let run = FlowRunId::new();
        {
            let j = LocalJournal::open(dir.path()).unwrap();
            j.append(run, started());
            j.append(run, ended(0, 9, true));
            j.flush().await.unwrap();
        }
        let j = LocalJournal::open(dir.path()).unwrap();
        assert_eq!(j.read(run).await.unwrap().len(), 2);
        assert_eq!(j.unfinished().await.unwrap(), vec![run]);
    }

    #[tokio::test]
    async fn entries_appended_after_a_torn_tail_are_read_on_the_next_resume() {
        let dir = tempfile::tempdir().unwrap();
        let run = FlowRunId::new();
        // a process died in the middle of writing its third entry
        let mut bytes = Vec::new();
        for e in [started(), ended(0, 1, true)] {
            bytes.extend(frame(&e).unwrap());
        }
        let whole = bytes.len();
        bytes.extend(frame(&ended(1, 2, true)).unwrap());
        bytes.truncate(whole + 6);
        std::fs::write(LocalJournal::path(dir.path(), run), &bytes).unwrap();
        // the resumed run journals more
        let j = LocalJournal::open(dir.path()).unwrap();
        assert_eq!(j.read(run).await.unwrap().len(), 2);
        j.append(run, ended(1, 2, true));
        j.append(run, ended(2, 3, true));
        j.flush().await.unwrap();
        drop(j);
        let j = LocalJournal::open(dir.path()).unwrap();
        let entries = j.read(run).await.unwrap();
        assert_eq!(
            entries.len(),
            4,
            "every entry after the tear is read: {entries:?}"
        );
    }
}
