//! The coordinator against a scripted agent link: the transport seam lets the test play
//! the agent and produce what a real agent cannot on demand (a late result from a
//! superseded attempt), and observe dispatch exactly.

use bytes::Bytes;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use pinazu_coordinator::{call_task, CollectingSink, Coordinator, CoordinatorConfig};
use pinazu_shared::error::{ErrorInfo, FailureKind, ParamError};
use pinazu_shared::ids::{AgentId, AttemptId, CallId, FlowRunId};
use pinazu_shared::options::{RetryPolicy, TaskOptions};
use pinazu_shared::registry::{FlowDef, FlowStart, Source, TaskDef};
use pinazu_shared::store::LocalDirStore;
use pinazu_shared::transport::AgentLink;
use pinazu_shared::wire::{AgentInfo, AttemptFinished, AttemptStarted, RunningAttempt, SpawnTask};
use pinazu_shared::BoxFuture;

const SOURCE: Source = Source {
    module: "runner_protocol",
    file: file!(),
    line: 0,
    package: "runner_protocol",
    version: "0",
};

fn start(body: BoxFuture<'static, Result<Value, ErrorInfo>>) -> Result<FlowStart, ParamError> {
    Ok(FlowStart {
        params: Map::new(),
        body,
    })
}

fn no_text(_: &str, _: &str) -> Option<Result<Value, ParamError>> {
    None
}

fn same(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    a == b
}

fn never_invoked(_: Bytes, _: bool) -> BoxFuture<'static, pinazu_shared::registry::Invoked> {
    Box::pin(async { unreachable!("the scripted agent never runs task bodies") })
}

/// The scripted agent's task, retried `retries` times `delay` apart.
const fn probe(retries: u32, delay: Duration) -> TaskDef {
    TaskDef {
        name: "probe",
        version: "",
        options: TaskOptions {
            retry: RetryPolicy {
                retries,
                delay,
                backoff: 1.0,
                max_delay: delay,
                jitter: 0.0,
            },
            ..TaskOptions::DEFAULT
        },
        invoke: never_invoked,
        check: pinazu_shared::registry::check_result::<u64>,
        source: SOURCE,
    }
}

static PROBE: TaskDef = probe(1, Duration::from_millis(1));

fn one_probe(_: Map<String, Value>) -> Result<FlowStart, ParamError> {
    start(Box::pin(async {
        let v: u64 = call_task(&PROBE, (1u64,))
            .await
            .map_err(|e| ErrorInfo::new(FailureKind::Error, e.to_string()))?;
        Ok(json!(v))
    }))
}

static ONE_PROBE: FlowDef = FlowDef {
    name: "one_probe",
    params: &[],
    doc: "",
    parse_text: no_text,
    same_params: same,
    invoke: one_probe,
    source: SOURCE,
};

fn five_probes(_: Map<String, Value>) -> Result<FlowStart, ParamError> {
    start(Box::pin(async {
        let calls = (0..5u64).map(|i| call_task::<u64, _>(&PROBE, (i,)));
        let all = futures_util::future::join_all(calls).await;
        let sum: u64 = all.into_iter().map(|r| r.unwrap_or(0)).sum();
        Ok(json!(sum))
    }))
}

static FIVE_PROBES: FlowDef = FlowDef {
    name: "five_probes",
    params: &[],
    doc: "",
    parse_text: no_text,
    same_params: same,
    invoke: five_probes,
    source: SOURCE,
};

/// Hands every dispatched batch to the test.
struct ScriptedLink(mpsc::UnboundedSender<SpawnTask>);

impl AgentLink for ScriptedLink {
    fn spawn(&self, _agent: &AgentId, tasks: Vec<SpawnTask>) {
        for t in tasks {
            let _ = self.0.send(t);
        }
    }
    fn cancel(&self, _agent: &AgentId, _attempts: Vec<(FlowRunId, AttemptId)>) {}
}

async fn coordinator(
    slots: u32,
) -> (
    Coordinator,
    mpsc::UnboundedReceiver<SpawnTask>,
    tempfile::TempDir,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(ScriptedLink(tx)),
        Arc::new(LocalDirStore::new(dir.path())),
        CollectingSink::new(),
    )
    .await
    .unwrap();
    c.register_agent(AgentInfo {
        agent_id: AgentId("scripted".into()),
        slots,
        tasks: vec!["probe".into()],
        labels: vec![],
        queues: false,
    });
    (c, rx, dir)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<SpawnTask>) -> SpawnTask {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a dispatch within 10 s")
        .expect("link open")
}

fn finished(s: &SpawnTask, outcome: Result<Bytes, ErrorInfo>) -> AttemptFinished {
    AttemptFinished {
        flow_run_id: s.flow_run_id,
        call_id: s.call_id,
        attempt_id: s.attempt_id,
        agent_id: AgentId("scripted".into()),
        outcome,
        result_ref: None,
        elapsed_us: 1,
        result_cache_key: None,
        logs: None,
    }
}

fn started(s: &SpawnTask) -> AttemptStarted {
    AttemptStarted {
        flow_run_id: s.flow_run_id,
        call_id: s.call_id,
        attempt_id: s.attempt_id,
        agent_id: AgentId("scripted".into()),
    }
}

fn ok(v: u64) -> Result<Bytes, ErrorInfo> {
    Ok(Bytes::from(rmp_serde::to_vec_named(&v).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_from_a_superseded_attempt_is_ignored() {
    let (c, mut rx, _dir) = coordinator(4).await;
    let sink = c.result_sink();
    let run = c
        .start_run(&ONE_PROBE, Map::new(), FlowRunId::new())
        .await
        .unwrap();
    let stats = run.stats.clone();

    let first = next(&mut rx).await;
    assert_eq!(first.attempt, 1);
    sink.started(started(&first));
    sink.finished(finished(
        &first,
        Err(ErrorInfo::new(FailureKind::Error, "flaky")),
    ));

    let second = next(&mut rx).await;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.call_id, first.call_id, "same call, new attempt");
    assert_ne!(second.attempt_id, first.attempt_id);

    // the first attempt "comes back to life" and reports a success: superseded, ignored
    sink.finished(finished(&first, ok(111)));
    sink.started(started(&second));
    sink.finished(finished(&second, ok(222)));
    // and a duplicate of the accepted result changes nothing either
    sink.finished(finished(&second, ok(333)));

    let out = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .unwrap();
    assert_eq!(out.result, Some(json!(222)));
    // both late results are ignored: as stale by the runner, or (the duplicate, when
    // the run ended before it arrived) as a report for a run no longer hosted
    let ignored = || {
        stats
            .stale_results
            .load(std::sync::atomic::Ordering::Relaxed)
            + c.unknown_run_reports()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ignored() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ignored(), 2);
    assert_eq!(out.stats.executions, 2);
    assert_eq!(out.stats.retries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_never_gets_more_attempts_than_its_slots() {
    let (c, mut rx, _dir) = coordinator(2).await;
    let sink = c.result_sink();
    let run = c
        .start_run(&FIVE_PROBES, Map::new(), FlowRunId::new())
        .await
        .unwrap();

    let mut in_flight = vec![next(&mut rx).await, next(&mut rx).await];
    // with both slots taken nothing more is dispatched
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err(),
        "a third attempt was dispatched to a 2-slot agent"
    );
    let mut done = 0;
    while let Some(t) = in_flight.pop() {
        let arg: (u64,) = rmp_serde::from_slice(&t.args).unwrap();
        sink.finished(finished(&t, ok(arg.0 * 10)));
        done += 1;
        if done <= 3 {
            in_flight.push(next(&mut rx).await);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .unwrap();
    assert_eq!(out.result, Some(json!((0..5).map(|i| i * 10).sum::<u64>())));
}

static GPU_PROBE: TaskDef = TaskDef {
    name: "probe",
    version: "",
    options: TaskOptions {
        labels: &[("gpu", "true")],
        ..TaskOptions::DEFAULT
    },
    invoke: never_invoked,
    check: pinazu_shared::registry::check_result::<u64>,
    source: SOURCE,
};

fn gpu_probe(_: Map<String, Value>) -> Result<FlowStart, ParamError> {
    start(Box::pin(async {
        let v: u64 = call_task(&GPU_PROBE, (7u64,))
            .await
            .map_err(|e| ErrorInfo::new(FailureKind::Error, e.to_string()))?;
        Ok(json!(v))
    }))
}

static GPU_FLOW: FlowDef = FlowDef {
    name: "gpu_flow",
    params: &[],
    doc: "",
    parse_text: no_text,
    same_params: same,
    invoke: gpu_probe,
    source: SOURCE,
};

/// Hands every dispatched batch to the test with the agent it was meant for.
struct RecordingLink(mpsc::UnboundedSender<(AgentId, SpawnTask)>);

impl AgentLink for RecordingLink {
    fn spawn(&self, agent: &AgentId, tasks: Vec<SpawnTask>) {
        for t in tasks {
            let _ = self.0.send((agent.clone(), t));
        }
    }
    fn cancel(&self, _agent: &AgentId, _attempts: Vec<(FlowRunId, AttemptId)>) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_requires_labels_goes_only_to_an_agent_that_has_them() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(RecordingLink(tx)),
        Arc::new(LocalDirStore::new(dir.path())),
        CollectingSink::new(),
    )
    .await
    .unwrap();
    for (id, labels) in [
        ("cpu-1", vec![]),
        ("cpu-2", vec![("gpu".to_string(), "false".to_string())]),
        ("gpu-1", vec![("gpu".to_string(), "true".to_string())]),
    ] {
        c.register_agent(AgentInfo {
            agent_id: AgentId(id.into()),
            slots: 4,
            tasks: vec!["probe".into()],
            labels,
            queues: false,
        });
    }
    let run = c
        .start_run(&GPU_FLOW, Map::new(), FlowRunId::new())
        .await
        .unwrap();
    let (agent, task) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(agent, AgentId("gpu-1".into()));
    assert_eq!(task.requires, vec![("gpu".to_string(), "true".to_string())]);
    c.result_sink().finished(AttemptFinished {
        flow_run_id: task.flow_run_id,
        call_id: task.call_id,
        attempt_id: task.attempt_id,
        agent_id: agent,
        outcome: ok(49),
        result_ref: None,
        elapsed_us: 1,
        result_cache_key: None,
        logs: None,
    });
    assert_eq!(run.wait().await.result, Some(json!(49)));
}

fn heartbeat(running: Vec<RunningAttempt>) -> pinazu_shared::wire::Heartbeat {
    pinazu_shared::wire::Heartbeat {
        info: AgentInfo {
            agent_id: AgentId("remote".into()),
            slots: 4,
            tasks: vec!["probe".into()],
            labels: vec![],
            queues: false,
        },
        running,
        draining: false,
        leaving: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_missing_from_two_heartbeats_is_lost_and_dispatched_again_but_not_from_one() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        CoordinatorConfig {
            timing: pinazu_coordinator::SchedulerTiming {
                lost_grace: Duration::ZERO,
                dead_after: Duration::from_secs(60),
                ..Default::default()
            },
            ..CoordinatorConfig::default()
        },
        Arc::new(ScriptedLink(tx)),
        Arc::new(LocalDirStore::new(dir.path())),
        CollectingSink::new(),
    )
    .await
    .unwrap();
    c.heartbeat(heartbeat(vec![]));
    let run = c
        .start_run(&ONE_PROBE, Map::new(), FlowRunId::new())
        .await
        .unwrap();
    let first = next(&mut rx).await;
    let key = RunningAttempt {
        flow_run_id: first.flow_run_id,
        call_id: first.call_id,
        attempt_id: first.attempt_id,
        queued: false,
    };
    // listed, then missing once (its report may be in flight): not lost
    c.heartbeat(heartbeat(vec![key]));
    c.heartbeat(heartbeat(vec![]));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "one missing heartbeat must not re-dispatch"
    );
    // missing twice in a row: lost, dispatched again as a new attempt
    c.heartbeat(heartbeat(vec![]));
    let second = next(&mut rx).await;
    assert_eq!(second.call_id, first.call_id);
    assert_ne!(second.attempt_id, first.attempt_id);
    c.result_sink().finished(finished(&second, ok(5)));
    let out = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .unwrap();
    assert_eq!(out.result, Some(json!(5)));
    assert_eq!(out.stats.retries, 0, "a lost attempt is not a failure");
}

/// The call id `call_task(&PROBE, (x,))` gets as the first such call of a run.
fn probe_call(x: u64) -> CallId {
    let args = rmp_serde::to_vec_named(&(x,)).unwrap();
    CallId {
        key: CallId::content_key("probe", &args),
        seq: 0,
    }
}

async fn delayed_probe_run(c: &Coordinator, run: FlowRunId) -> pinazu_coordinator::RunHandle {
    let options = pinazu_coordinator::RunOptions {
        start_delay: Duration::from_millis(300),
        ..Default::default()
    };
    c.start_run_with(&ONE_PROBE, Map::new(), run, options)
        .await
        .unwrap()
}

async fn scripted_coordinator(
    tx: mpsc::UnboundedSender<SpawnTask>,
    dir: &std::path::Path,
) -> Coordinator {
    Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(ScriptedLink(tx)),
        Arc::new(LocalDirStore::new(dir)),
        CollectingSink::new(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_an_earlier_coordinator_dispatched_answers_the_call_without_running_it() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let c = scripted_coordinator(tx, dir.path()).await;
    c.heartbeat(heartbeat(vec![]));
    let id = FlowRunId::new();
    let run = delayed_probe_run(&c, id).await;
    // an agent hands back a result of the previous coordinator process (another epoch)
    // before the resumed body makes the call again
    c.result_sink().finished(AttemptFinished {
        flow_run_id: id,
        call_id: probe_call(1),
        attempt_id: AttemptId::new(7, 1),
        agent_id: AgentId("remote".into()),
        outcome: ok(11),
        result_ref: None,
        elapsed_us: 1,
        result_cache_key: None,
        logs: None,
    });
    let out = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .unwrap();
    assert_eq!(out.result, Some(json!(11)));
    assert_eq!(out.stats.executions, 1);
    assert!(rx.try_recv().is_err(), "nothing was dispatched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_an_earlier_coordinator_dispatched_is_re_attached_and_its_result_used() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let c = scripted_coordinator(tx, dir.path()).await;
    c.heartbeat(heartbeat(vec![]));
    let id = FlowRunId::new();
    let run = delayed_probe_run(&c, id).await;
    // the agent still runs the previous process's attempt of the call
    let earlier = RunningAttempt {
        flow_run_id: id,
        call_id: probe_call(1),
        attempt_id: AttemptId::new(7, 3),
        queued: false,
    };
    c.heartbeat(heartbeat(vec![earlier]));
    // the body makes the call after its start delay: it waits for that attempt
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        rx.try_recv().is_err(),
        "the call must not be dispatched again"
    );
    c.result_sink().finished(AttemptFinished {
        flow_run_id: id,
        call_id: earlier.call_id,
        attempt_id: earlier.attempt_id,
        agent_id: AgentId("remote".into()),
        outcome: ok(13),
        result_ref: None,
        elapsed_us: 1,
        result_cache_key: None,
        logs: None,
    });
    let out = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .unwrap();
    assert_eq!(out.result, Some(json!(13)));
    assert!(rx.try_recv().is_err(), "nothing was dispatched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_failure_of_an_earlier_process_attempt_does_not_fail_the_call() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let c = scripted_coordinator(tx, dir.path()).await;
    c.heartbeat(heartbeat(vec![]));
    let run = c
        .start_run(&ONE_PROBE, Map::new(), FlowRunId::new())
        .await
        .unwrap();
    let first = next(&mut rx).await;
    c.result_sink().finished(AttemptFinished {
        attempt_id: AttemptId::new(7, 1),
        outcome: Err(ErrorInfo::new(FailureKind::Error, "old failure")),
        ..finished(&first, ok(0))
    });
    c.result_sink().finished(finished(&first, ok(17)));
    let out = tokio::time::timeout(Duration::from_secs(10), run.wait())
        .await
        .unwrap();
    assert_eq!(out.result, Some(json!(17)));
    assert_eq!(out.stats.retries, 0);
}

fn two_gpu_probes_ten_seconds_apart(_: Map<String, Value>) -> Result<FlowStart, ParamError> {
    start(Box::pin(async {
        let started = tokio::time::Instant::now();
        let first = pinazu_coordinator::spawn_in_flow(async move {
            let r = call_task::<u64, _>(&GPU_PROBE, (1u64,)).await;
            (r.is_err(), started.elapsed().as_secs())
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        let second = call_task::<u64, _>(&GPU_PROBE, (2u64,)).await;
        let second = (second.is_err(), started.elapsed().as_secs());
        let first = first.await.unwrap_or((false, 0));
        Ok(json!([first, second]))
    }))
}

static TWO_GPU_PROBES: FlowDef = FlowDef {
    name: "two_gpu_probes",
    params: &[],
    doc: "",
    parse_text: no_text,
    same_params: same,
    invoke: two_gpu_probes_ten_seconds_apart,
    source: SOURCE,
};

/// The schedule timeout is per call: each waiting call gives up its own timeout after
/// it was queued, and the operator note says how long the oldest has waited (in paused
/// tokio time: no real waiting).
#[tokio::test(start_paused = true)]
async fn each_call_waits_its_own_schedule_timeout_and_the_note_keeps_counting() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let config = CoordinatorConfig {
        timing: pinazu_coordinator::SchedulerTiming {
            schedule_timeout: Duration::from_secs(60),
            ..Default::default()
        },
        ..CoordinatorConfig::default()
    };
    let c = Coordinator::start(
        config,
        Arc::new(RecordingLink(tx)),
        Arc::new(LocalDirStore::new(dir.path())),
        CollectingSink::new(),
    )
    .await
    .unwrap();
    // an agent, but none with the label the task requires
    c.register_agent(AgentInfo {
        agent_id: AgentId("cpu-1".into()),
        slots: 4,
        tasks: vec!["probe".into()],
        labels: vec![],
        queues: false,
    });
    let id = FlowRunId::new();
    let run = c.start_run(&TWO_GPU_PROBES, Map::new(), id).await.unwrap();
    tokio::time::sleep(Duration::from_secs(31)).await;
    let note = c.run_info(id).unwrap().note.unwrap_or_default();
    assert!(note.contains("waited 30 s"), "{note}");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let note = c.run_info(id).unwrap().note.unwrap_or_default();
    assert!(
        note.contains("waited 50 s"),
        "the note keeps counting: {note}"
    );
    let outcome = run.wait().await;
    // each call failed (no agent) 60 s after it was queued: the first at 60 s, the
    // second, queued 10 s later, at 70 s
    assert_eq!(
        outcome.result,
        Some(json!([[true, 60], [true, 70]])),
        "{outcome:?}"
    );
}

fn gpu_then_cpu(_: Map<String, Value>) -> Result<FlowStart, ParamError> {
    start(Box::pin(async {
        let (gpu, cpu) = futures_util::join!(
            call_task::<u64, _>(&GPU_PROBE, (1u64,)),
            call_task::<u64, _>(&PROBE, (2u64,))
        );
        Ok(json!([gpu.is_err(), cpu.ok()]))
    }))
}

static GPU_THEN_CPU: FlowDef = FlowDef {
    name: "gpu_then_cpu",
    params: &[],
    doc: "",
    parse_text: no_text,
    same_params: same,
    invoke: gpu_then_cpu,
    source: SOURCE,
};

/// An attempt no agent can run does not hold up the run's other attempts queued behind
/// it.
#[tokio::test(start_paused = true)]
async fn an_attempt_no_agent_can_run_does_not_block_the_ones_behind_it() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(RecordingLink(tx)),
        Arc::new(LocalDirStore::new(dir.path())),
        CollectingSink::new(),
    )
    .await
    .unwrap();
    c.register_agent(AgentInfo {
        agent_id: AgentId("cpu-1".into()),
        slots: 4,
        tasks: vec!["probe".into()],
        labels: vec![],
        queues: false,
    });
    let run = c
        .start_run(&GPU_THEN_CPU, Map::new(), FlowRunId::new())
        .await
        .unwrap();
    let queued = tokio::time::Instant::now();
    let (agent, task) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the servable call is dispatched")
        .unwrap();
    assert!(
        queued.elapsed() < Duration::from_secs(1),
        "dispatched after {:?}: it waited behind the call no agent can run",
        queued.elapsed()
    );
    assert!(task.requires.is_empty(), "{task:?}");
    c.result_sink().finished(AttemptFinished {
        flow_run_id: task.flow_run_id,
        call_id: task.call_id,
        attempt_id: task.attempt_id,
        agent_id: agent,
        outcome: ok(4),
        result_ref: None,
        elapsed_us: 1,
        result_cache_key: None,
        logs: None,
    });
    assert_eq!(run.wait().await.result, Some(json!([true, 4])));
}

fn no_task(_: Map<String, Value>) -> Result<FlowStart, ParamError> {
    start(Box::pin(async { Ok(json!(7)) }))
}

static NO_TASK: FlowDef = FlowDef {
    name: "no_task",
    params: &[],
    doc: "",
    parse_text: no_text,
    same_params: same,
    invoke: no_task,
    source: SOURCE,
};

#[tokio::test(start_paused = true)]
async fn ended_runs_leave_memory_and_are_answered_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let journal = pinazu_coordinator::journal::LocalJournal::open(dir.path().join("j")).unwrap();
    let c = Coordinator::start(
        CoordinatorConfig {
            journal: pinazu_coordinator::JournalHandle(Arc::new(journal)),
            ..CoordinatorConfig::default()
        },
        Arc::new(ScriptedLink(mpsc::unbounded_channel().0)),
        Arc::new(LocalDirStore::new(dir.path())),
        CollectingSink::new(),
    )
    .await
    .unwrap();
    let keep = pinazu_coordinator::coordinator::KEEP_ENDED;
    let mut ids = Vec::new();
    for _ in 0..keep + 50 {
        let id = FlowRunId::new();
        let run = c.start_run(&NO_TASK, Map::new(), id).await.unwrap();
        assert_eq!(run.wait().await.result, Some(json!(7)));
        ids.push(id);
    }
    // (paused time moves on while the journal's thread syncs: the runs are old already)
    tokio::time::advance(Duration::from_secs(61)).await;
    let last = c
        .start_run(&NO_TASK, Map::new(), FlowRunId::new())
        .await
        .unwrap();
    last.wait().await;
    assert_eq!(c.runs().len(), keep, "only the most recent ended runs stay");
    // the oldest, no longer in memory, is answered from its journal
    assert!(c.run_info(ids[0]).is_none());
    let info = c.journaled_run(ids[0]).await.expect("journaled");
    assert_eq!(info.status, pinazu_shared::events::FlowStatus::Success);
    assert!(c.run_info(ids[keep + 49]).is_some());
}

/// An event sink whose delivery breaks (a bug in the status publisher's path).
struct BrokenSink;

impl pinazu_coordinator::EventSink for BrokenSink {
    fn publish(&self, _subject: &'static str, _payload: Bytes) {
        panic!("the event sink broke");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_core_actor_fails_the_coordinator_loudly_and_no_run_waits_forever() {
    let (tx, _rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(ScriptedLink(tx)),
        Arc::new(LocalDirStore::new(dir.path())),
        Arc::new(BrokenSink),
    )
    .await
    .unwrap();
    assert!(c.failed().is_none());
    c.register_agent(AgentInfo {
        agent_id: AgentId("scripted".into()),
        slots: 4,
        tasks: vec!["probe".into()],
        labels: vec![],
        queues: false,
    });
    // the run's first event breaks the status publisher; the run's task is never
    // answered (the scripted agent is silent), so only the failure can end the wait
    let run = c
        .start_run(&ONE_PROBE, Map::new(), FlowRunId::new())
        .await
        .unwrap();
    let why = tokio::time::timeout(Duration::from_secs(10), c.outcome(run))
        .await
        .expect("the wait ends")
        .expect_err("the coordinator failed under the run");
    assert!(why.contains("status publisher"), "{why}");
    assert!(c.failed().is_some());
}

static PATIENT_PROBE: TaskDef = probe(2, Duration::from_secs(30));

fn patient_probe(_: Map<String, Value>) -> Result<FlowStart, ParamError> {
    start(Box::pin(async {
        let v: u64 = call_task(&PATIENT_PROBE, (7u64,))
            .await
            .map_err(|e| ErrorInfo::new(FailureKind::Error, e.to_string()))?;
        Ok(json!(v))
    }))
}

static PATIENT: FlowDef = FlowDef {
    name: "patient",
    params: &[],
    doc: "",
    parse_text: no_text,
    same_params: same,
    invoke: patient_probe,
    source: SOURCE,
};

/// The call table's one call, once it is in the given phase.
async fn phase_of(
    c: &Coordinator,
    run: FlowRunId,
) -> Option<pinazu_coordinator::flow_runner::CallPhase> {
    c.call_phases(run).await.first().map(|(_, p)| *p)
}

#[tokio::test(start_paused = true)]
async fn a_call_steps_through_its_phases_and_a_retry_waits_its_delay() {
    use pinazu_coordinator::flow_runner::CallPhase;
    let (c, mut rx, _dir) = coordinator(4).await;
    let sink = c.result_sink();
    let id = FlowRunId::new();
    let run = c.start_run(&PATIENT, Map::new(), id).await.unwrap();

    let first = next(&mut rx).await;
    assert_eq!(
        phase_of(&c, id).await,
        Some(CallPhase::Dispatched {
            attempt: first.attempt_id,
            started: false
        })
    );
    sink.started(started(&first));
    // a start reported twice counts once
    sink.started(started(&first));
    tokio::task::yield_now().await;
    assert_eq!(
        phase_of(&c, id).await,
        Some(CallPhase::Dispatched {
            attempt: first.attempt_id,
            started: true
        })
    );
    let failed_at = tokio::time::Instant::now();
    sink.finished(finished(
        &first,
        Err(ErrorInfo::new(FailureKind::Error, "flaky")),
    ));
    assert_eq!(phase_of(&c, id).await, Some(CallPhase::RetryDue));
    // nothing is dispatched before the retry's delay (paused time: the 29 s pass at once)
    assert!(
        tokio::time::timeout(Duration::from_secs(29), rx.recv())
            .await
            .is_err(),
        "dispatched again before its delay"
    );
    assert_eq!(phase_of(&c, id).await, Some(CallPhase::RetryDue));
    // a late result of the failed attempt changes nothing while the retry is due
    sink.finished(finished(&first, ok(111)));
    assert_eq!(phase_of(&c, id).await, Some(CallPhase::RetryDue));
    let second = next(&mut rx).await;
    let waited = failed_at.elapsed();
    assert!(
        (Duration::from_secs(30)..Duration::from_secs(31)).contains(&waited),
        "{waited:?}"
    );
    assert_eq!(second.attempt, 2);
    assert_eq!(
        phase_of(&c, id).await,
        Some(CallPhase::Dispatched {
            attempt: second.attempt_id,
            started: false
        })
    );
    sink.started(started(&second));
    sink.finished(finished(&second, ok(222)));
    let out = run.wait().await;
    assert_eq!(out.result, Some(json!(222)));
    assert_eq!(out.stats.executions, 2);
    assert_eq!(out.stats.retries, 1);
    // done: the call left the table (and the run this coordinator's runners)
    assert!(c.call_phases(id).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_lost_attempt_is_dispatched_again_at_once_without_using_a_retry() {
    use pinazu_coordinator::flow_runner::CallPhase;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(
        CoordinatorConfig::default(),
        Arc::new(ScriptedLink(tx)),
        Arc::new(LocalDirStore::new(dir.path())),
        CollectingSink::new(),
    )
    .await
    .unwrap();
    // a remote agent (heartbeats): one that stops listing an attempt loses it
    c.heartbeat(heartbeat(vec![]));
    let id = FlowRunId::new();
    let run = c.start_run(&PATIENT, Map::new(), id).await.unwrap();
    let first = next(&mut rx).await;
    let running = |s: &SpawnTask| RunningAttempt {
        flow_run_id: s.flow_run_id,
        call_id: s.call_id,
        attempt_id: s.attempt_id,
        queued: false,
    };
    c.heartbeat(heartbeat(vec![running(&first)]));
    // from now on its heartbeats no longer list it: after the loss grace (3 s) and two
    // heartbeats, it is lost, and the call goes out again at once (no retry delay)
    let lost_from = tokio::time::Instant::now();
    let second = loop {
        c.heartbeat(heartbeat(vec![]));
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some(s)) => break s,
            _ => assert!(
                lost_from.elapsed() < Duration::from_secs(10),
                "not lost within 10 s"
            ),
        }
    };
    assert!(lost_from.elapsed() < Duration::from_secs(6));
    assert_eq!(second.call_id, first.call_id);
    assert_eq!(
        phase_of(&c, id).await,
        Some(CallPhase::Dispatched {
            attempt: second.attempt_id,
            started: false
        })
    );
    c.heartbeat(heartbeat(vec![running(&second)]));
    let sink = c.result_sink();
    sink.started(started(&second));
    sink.finished(finished(&second, ok(5)));
    let out = run.wait().await;
    assert_eq!(out.result, Some(json!(5)));
    assert_eq!(out.stats.retries, 0, "a loss is not a failure");
}
