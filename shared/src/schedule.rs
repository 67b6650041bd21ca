//! Schedules: what `schedule add` defines and what the coordinators keep of each (one
//! JetStream message per schedule, `<prefix>.schedule.<name>`). The coordinators compute
//! fire times (`pinazu_coordinator::schedules`); these are the shared words.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::VecDeque;

use crate::ids::FlowRunId;

/// What happens when a fire comes while the schedule's previous run still runs
/// (Temporal's overlap policies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overlap {
    /// The fire is skipped (the default).
    #[default]
    Skip,
    /// One fire waits for the running one to end; later ones are skipped.
    BufferOne,
    /// Every fire waits, and they run one after the other.
    BufferAll,
    /// The running run is cancelled and the fire starts.
    CancelOther,
    /// The fire starts whatever runs.
    AllowAll,
}

impl Overlap {
    /// Parses `skip`, `buffer-one`, `buffer-all`, `cancel-other`, `allow-all`.
    pub fn parse(s: &str) -> Result<Overlap, String> {
        match s.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "skip" => Ok(Overlap::Skip),
            "buffer-one" => Ok(Overlap::BufferOne),
            "buffer-all" => Ok(Overlap::BufferAll),
            "cancel-other" => Ok(Overlap::CancelOther),
            "allow-all" => Ok(Overlap::AllowAll),
            other => Err(format!(
                "unknown overlap policy {other:?}: skip, buffer-one, buffer-all, cancel-other or allow-all"
            )),
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::BufferOne => "buffer-one",
            Overlap::BufferAll => "buffer-all",
            Overlap::CancelOther => "cancel-other",
            Overlap::AllowAll => "allow-all",
        }
    }
}

/// A schedule as defined.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// Its name (letters, digits, `_`, `-`).
    pub name: String,
    /// The flow it runs.
    pub flow: String,
    /// The flow's parameters.
    #[serde(default)]
    pub params: Map<String, Value>,
    /// A cron expression (5 fields, or 6 with seconds first; `@hourly`, ...).
    #[serde(default)]
    pub cron: Option<String>,
    /// Or a fixed interval (fires at multiples of it since the Unix epoch), ms.
    #[serde(default)]
    pub every_ms: Option<u64>,
    /// The cron's time zone (IANA name; default UTC).
    #[serde(default)]
    pub timezone: Option<String>,
    /// What a fire does while the previous run runs.
    #[serde(default)]
    pub overlap: Overlap,
    /// Fires missed (coordinators down) at most this long ago still start; older ones
    /// are skipped.
    pub catchup_ms: u64,
    /// Each fire starts up to this much later than its time (the same delay on every
    /// coordinator for a given fire).
    #[serde(default)]
    pub jitter_ms: u64,
}

/// A fire and what became of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fire {
    /// Its nominal time (ms since the Unix epoch).
    pub at_ms: u64,
    /// `started`, `skipped`, `buffered`, `missed` (older than the catch-up window),
    /// `backfill`.
    pub action: String,
    /// Its run, when it started one.
    #[serde(default)]
    pub run: Option<FlowRunId>,
    /// When it was acted on (ms since the Unix epoch): `acted_ms - at_ms` is how late.
    pub acted_ms: u64,
}

/// What the coordinators keep of a schedule between fires.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// Paused: no fire is taken; fires due meanwhile are not caught up.
    #[serde(default)]
    pub paused: bool,
    /// Fires at or before this time are handled.
    pub last_ms: u64,
    /// The last run a fire started (what overlap policies look at).
    #[serde(default)]
    pub current: Option<FlowRunId>,
    /// Fires waiting for the current run to end (buffer-one, buffer-all), oldest first.
    #[serde(default)]
    pub buffered: VecDeque<u64>,
    /// Runs decided and not yet confirmed started: whoever acts next starts them (a
    /// start is idempotent: the run id is the schedule's and the fire's).
    #[serde(default)]
    pub pending: Vec<(u64, FlowRunId)>,
    /// The latest fires, newest last (at most `RECENT_FIRES`).
    #[serde(default)]
    pub recent: VecDeque<Fire>,
    /// Runs started, fires skipped, fires missed, in all.
    #[serde(default)]
    pub started: u64,
    /// Fires skipped by the overlap policy.
    #[serde(default)]
    pub skipped: u64,
    /// Fires older than the catch-up window when the coordinators came back.
    #[serde(default)]
    pub missed: u64,
    /// Why the last fire could not start, if it could not.
    #[serde(default)]
    pub error: Option<String>,
}

/// Fires kept in `ScheduleState::recent`.
pub const RECENT_FIRES: usize = 50;

/// A schedule: its definition and state (the stored message).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRecord {
    /// As defined.
    pub spec: ScheduleSpec,
    /// As it stands.
    pub state: ScheduleState,
}

/// A schedule as `schedule list` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleView {
    /// Definition and state.
    #[serde(flatten)]
    pub record: ScheduleRecord,
    /// Its next fire (ms since the Unix epoch), unless paused.
    pub next_ms: Option<u64>,
}

/// What `schedule` does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ScheduleOp {
    /// Defines a schedule (refused if the name is taken, unless `replace`).
    Add {
        /// The definition.
        spec: ScheduleSpec,
        /// Replace one of that name.
        replace: bool,
    },
    /// Every schedule.
    List,
    /// Pauses one.
    Pause {
        /// Its name.
        name: String,
    },
    /// Resumes one (fires due while paused are not caught up).
    Resume {
        /// Its name.
        name: String,
    },
    /// Deletes one (its runs go on).
    Delete {
        /// Its name.
        name: String,
    },
    /// Starts the runs of every fire time in `[from_ms, to_ms]`, as if the schedule
    /// had fired then (one run per fire time, the same run id as that fire's: a
    /// backfill made twice starts nothing more).
    Backfill {
        /// Its name.
        name: String,
        /// From (ms since the Unix epoch).
        from_ms: u64,
        /// To (inclusive).
        to_ms: u64,
    },
}

/// The run id of a schedule's fire: a UUID (version 3) of the schedule's name and the
/// fire's nominal time, the same on every coordinator, so a fire started twice (two
/// coordinators, a failover) is one run.
pub fn fire_run_id(schedule: &str, at_ms: u64) -> FlowRunId {
    let mut bytes = md5::compute(format!("pinazu-flows schedule\0{schedule}\0{at_ms}")).0;
    bytes[6] = (bytes[6] & 0x0f) | 0x30; // version 3
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    FlowRunId(uuid::Uuid::from_bytes(bytes))
}

pub use crate::subjects::valid_name;
