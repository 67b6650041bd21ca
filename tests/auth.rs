//! Least privilege on NATS (issue 10): every party runs on its own user of the shipped
//! `scripts/nats-auth.conf`, and what each user may not do is tried against a real
//! nats-server: an agent cannot call the API, acknowledge reports or report as another
//! agent; a client cannot publish on agent subjects; the observer reads the status
//! subjects only. The coordinator also refuses reports for attempts it dispatched to
//! another agent.

mod common;

use common::*;
use futures_util::StreamExt;
use pinazu_shared::api::{ApiReply, ApiRequest};
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::ids::AgentId;
use pinazu_shared::wire::{AttemptFinished, Report, ReportBatch, SpawnTask};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::Duration;

const APP: &str = "parallel_flow";

struct Secured {
    nats: NatsServer,
    coordinator: Proc,
    agents: Vec<Proc>,
    cache: tempfile::TempDir,
}

impl Secured {
    /// A coordinator and the given agents (`agent-1`, ...), each on its own user.
    fn start(agents: usize) -> Secured {
        let nats = NatsServer::start_with_auth();
        let cache = tempfile::tempdir().unwrap();
        let mut s = Secured {
            coordinator: {
                let mut cmd = cmd(&nats, &cache, "coordinator");
                cmd.args(["coordinator", "--dead-after", "2s"]);
                Proc::spawn("coordinator", cmd)
            },
            nats,
            agents: Vec::new(),
            cache,
        };
        for i in 1..=agents {
            let id = format!("agent-{i}");
            let mut cmd = s.cmd(&id);
            cmd.args(["agent", "--agent-id", &id, "--slots", "4"]);
            s.agents.push(Proc::spawn(&id, cmd));
        }
        wait_until(Duration::from_secs(30), "agents", || {
            let out = s.cmd("client").args(["agents", "--json"]).output().ok()?;
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (v.as_array()?.len() == agents).then_some(())
        });
        s
    }

    fn cmd(&self, user: &str) -> Command {
        cmd(&self.nats, &self.cache, user)
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for p in std::iter::once(&self.coordinator).chain(&self.agents) {
            s.push_str(&format!("\n--- {} ---\n{}", p.name, p.logs()));
        }
        s
    }
}

fn cmd(nats: &NatsServer, cache: &tempfile::TempDir, user: &str) -> Command {
    let mut cmd = common::app(APP);
    cmd.env("NATS_URL", nats.url_as(user))
        .env("PINAZU_CACHE_DIR", cache.path());
    cmd
}

async fn connect(nats: &NatsServer, user: &str) -> async_nats::Client {
    nats_connect(&nats.url_as(user))
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

/// Whether a message `user` publishes on `subject` reaches a subscriber with every
/// right (the coordinator's user, which reads everything under the prefix; the
/// status subjects through the observer). The publish is flushed, then the witness's
/// own marker follows: if the marker comes first, the user's message was dropped.
async fn delivered(nats: &NatsServer, user: &str, subject: &str) -> bool {
    let reader = if subject.starts_with("v1.") {
        "observer"
    } else {
        "coordinator"
    };
    let witness = connect(nats, reader).await;
    let mut sub = witness.subscribe(subject.to_string()).await.unwrap();
    witness.flush().await.unwrap();
    let sender = connect(nats, user).await;
    let _ = sender.publish(subject.to_string(), "probe".into()).await;
    sender.flush().await.unwrap();
    let marker = connect(nats, "coordinator").await;
    marker
        .publish(subject.to_string(), "marker".into())
        .await
        .unwrap();
    marker.flush().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("the marker arrives")
        .expect("a message");
    first.payload.as_ref() == b"probe"
}

/// Whether `user` subscribing to `filter` receives a message the coordinator's user
/// publishes on `subject`.
async fn readable(nats: &NatsServer, user: &str, filter: &str, subject: &str) -> bool {
    let reader = connect(nats, user).await;
    let mut sub = reader.subscribe(filter.to_string()).await.unwrap();
    reader.flush().await.unwrap();
    let publisher = connect(nats, "coordinator").await;
    publisher
        .publish(subject.to_string(), "secret".into())
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    tokio::time::timeout(Duration::from_millis(500), sub.next())
        .await
        .is_ok()
}

/// One API request as `user`: the reply, or why there is none.
async fn ask(
    nats: &NatsServer,
    user: &str,
    subject: &str,
    req: &ApiRequest,
) -> Result<ApiReply, String> {
    let client = connect(nats, user).await;
    let body = encode_envelope(req).unwrap();
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        client.request(subject.to_string(), body.into()),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map_err(|e| e.to_string())?;
    decode_envelope(&reply.payload).map_err(|e| e.to_string())
}

#[test]
fn a_run_works_with_every_party_on_its_own_least_privilege_user() {
    let s = Secured::start(2);
    let recorder = EventRecorder::start(&s.nats.url_as("observer"));
    let id = "c3c3c3c3-1111-4222-8333-444455556666";
    let out = s
        .cmd("client")
        .args(["run", "--n=300", "--work-ms=1", "--flow-run-id", id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let line = succeeded(&out, || s.logs());
    assert_eq!(line["result"], (0..300u64).map(|i| i * i).sum::<u64>());
    // both agents served (their own subjects), the observer saw the run end
    for a in &s.agents {
        assert!(
            a.logs().contains("attempt started") || a.logs().contains("serving"),
            "{}",
            s.logs()
        );
    }
    recorder.wait_flow(id, "SUCCESS", Duration::from_secs(10));
    // PENDING, RUNNING, SUCCESS per call
    assert_eq!(recorder.task_events(id).len(), 900);
    // the client's other verbs work on its user
    for args in [
        vec!["status", id, "--json"],
        vec!["runs", "--json"],
        vec!["agents", "--json"],
    ] {
        let out = s.cmd("client").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // no permission was refused to anyone along the way
    assert!(!s.logs().contains("Permissions Violation"), "{}", s.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_is_refused_what_is_not_its_part() {
    let s = tokio::task::spawn_blocking(|| Secured::start(1))
        .await
        .unwrap();
    let n = &s.nats;

    // an agent cannot call the API, not even through the one verb it may send
    let runs = ApiRequest::Runs;
    assert!(matches!(
        ask(n, "client", "pinazu.api.runs", &runs).await,
        Ok(ApiReply::Runs(_))
    ));
    assert!(ask(n, "agent-1", "pinazu.api.runs", &runs).await.is_err());
    let start = ApiRequest::Start {
        flow: APP.into(),
        params: serde_json::Map::new(),
        flow_run_id: None,
        idempotency_key: None,
        success_task_results: None,
        events: None,
        priority: 0,
    };
    match ask(n, "agent-1", "pinazu.api.store_probe", &start).await {
        Ok(ApiReply::Error(e)) => assert!(e.contains("refused"), "{e}"),
        other => panic!("a start sent on the store probe's subject: {other:?}"),
    }
    assert!(matches!(
        ask(
            n,
            "agent-1",
            "pinazu.api.store_probe",
            &ApiRequest::StoreProbe
        )
        .await,
        Ok(ApiReply::StoreProbe { .. })
    ));

    // an agent speaks for itself only; it cannot acknowledge reports
    assert!(delivered(n, "agent-1", "pinazu.coord.reports.agent-1").await);
    for subject in [
        "pinazu.coord.reports.agent-2",
        "pinazu.agent.agent-2.hb",
        "pinazu.agent.agent-1.ack",
        "pinazu.agent.agent-2.ack",
        "pinazu.agent.agent-2.spawn",
        "pinazu.coord.hello",
        "pinazu.api.start",
        "v1.svc.worker.flow.status",
    ] {
        assert!(
            !delivered(n, "agent-1", subject).await,
            "agent-1 published on {subject}"
        );
    }
    // and reads only its own subjects
    assert!(
        readable(
            n,
            "agent-1",
            "pinazu.agent.agent-1.spawn",
            "pinazu.agent.agent-1.spawn"
        )
        .await
    );
    for (filter, subject) in [
        ("pinazu.agent.agent-2.spawn", "pinazu.agent.agent-2.spawn"),
        ("pinazu.coord.reports.*", "pinazu.coord.reports.agent-2"),
        ("pinazu.api.*", "pinazu.api.start"),
        ("_INBOX.>", "_INBOX.client.x"),
    ] {
        assert!(
            !readable(n, "agent-1", filter, subject).await,
            "agent-1 read {subject}"
        );
    }

    // a client cannot publish on agent subjects, nor read them
    assert!(delivered(n, "client", "pinazu.api.status").await);
    for subject in [
        "pinazu.agent.agent-1.spawn",
        "pinazu.agent.agent-1.ack",
        "pinazu.agent.agent-1.hb",
        "pinazu.coord.reports.agent-1",
        "pinazu.coord.hello",
        "v1.svc.worker.task.status",
    ] {
        assert!(
            !delivered(n, "client", subject).await,
            "the client published on {subject}"
        );
    }
    assert!(!readable(n, "client", "pinazu.agent.>", "pinazu.agent.agent-1.spawn").await);

    // the observer reads the status subjects and nothing else, and publishes nothing
    assert!(
        readable(
            n,
            "observer",
            "v1.svc.worker.>",
            "v1.svc.worker.flow.status"
        )
        .await
    );
    for (filter, subject) in [
        ("pinazu.>", "pinazu.agent.agent-1.spawn"),
        (">", "pinazu.api.start"),
        ("_INBOX.>", "_INBOX.client.x"),
    ] {
        assert!(
            !readable(n, "observer", filter, subject).await,
            "the observer read {subject}"
        );
    }
    for subject in ["v1.svc.worker.flow.status", "pinazu.api.status"] {
        assert!(
            !delivered(n, "observer", subject).await,
            "the observer published on {subject}"
        );
    }

    // the journal commands need the coordinator's user: the client's is told so at once
    let started = std::time::Instant::now();
    let out = s
        .cmd("client")
        .args(["journal", "show", "c3c3c3c3-1111-4222-8333-444455556666"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the journal commands need the coordinator's user"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // an agent started under an id its user may not use is refused at once, saying why
    let out = s
        .cmd("agent-1")
        .args(["agent", "--agent-id", "agent-9"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("NATS does not let this agent's user use agent id agent-9's subjects")
            && err.contains("--agent-id agent-1"),
        "{err}"
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_for_an_attempt_dispatched_to_another_agent_is_refused() {
    let s = tokio::task::spawn_blocking(|| Secured::start(1))
        .await
        .unwrap();
    let n = &s.nats;
    // see what is dispatched to agent-1 (the coordinator's user reads everything)
    let snoop = connect(n, "coordinator").await;
    let mut spawns = snoop.subscribe("pinazu.agent.agent-1.spawn").await.unwrap();
    snoop.flush().await.unwrap();
    let run = s
        .cmd("client")
        .args(["run", "--n=2", "--work-ms=3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sent: Vec<SpawnTask> = Vec::new();
    while sent.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(20), spawns.next())
            .await
            .expect("attempts dispatched to agent-1")
            .unwrap();
        sent.extend(decode_envelope::<Vec<SpawnTask>>(&msg.payload).unwrap());
    }
    // agent-2 (a user of its own) claims both attempts finished with a made-up result
    let forged = |agent: &str| ReportBatch {
        agent_id: AgentId(agent.into()),
        incarnation: 7,
        seq: 1,
        acked: 0,
        reports: sent
            .iter()
            .map(|t| {
                Report::Finished(AttemptFinished {
                    flow_run_id: t.flow_run_id,
                    call_id: t.call_id,
                    attempt_id: t.attempt_id,
                    agent_id: AgentId(agent.into()),
                    outcome: Ok(rmp_serde::to_vec(&1000u64).unwrap().into()),
                    result_ref: None,
                    elapsed_us: 1,
                    result_cache_key: None,
                    logs: None,
                })
            })
            .collect(),
    };
    let agent2 = connect(n, "agent-2").await;
    for (subject, batch) in [
        // on its own subject: delivered, and refused by the coordinator
        ("pinazu.coord.reports.agent-2", forged("agent-2")),
        // as agent-1: refused by NATS
        ("pinazu.coord.reports.agent-1", forged("agent-1")),
    ] {
        agent2
            .publish(subject, encode_envelope(&batch).unwrap().into())
            .await
            .unwrap();
    }
    agent2.flush().await.unwrap();
    let out = tokio::task::spawn_blocking(move || run.wait_with_output().unwrap())
        .await
        .unwrap();
    // the result is the one agent-1 computed: 0 + 1
    let line = succeeded(&out, || s.logs());
    assert_eq!(line["result"], 1, "{line}\n{}", s.logs());
    let logs = s.coordinator.logs();
    assert!(
        logs.contains("report(s) of agent \"agent-2\" for attempts dispatched to another agent"),
        "{logs}"
    );
}
