//! Several coordinators on one NATS (issue 10): what keeps two of them from extending one
//! run's journal.

mod common;

use bytes::Bytes;
use common::*;
use pinazu_coordinator::journal::{Journal, JournalEntry};
use pinazu_coordinator::journal_js::JetStreamJournal;
use pinazu_shared::ids::{CallId, FlowRunId};

fn started() -> JournalEntry {
    JournalEntry::RunStarted {
        flow: "f".into(),
        params: serde_json::Map::new(),
        idempotency_key: None,
        events: None,
        started_at_ms: None,
    }
}

fn call(ordinal: u64) -> JournalEntry {
    JournalEntry::CallEnded {
        ordinal,
        call_id: CallId {
            key: ordinal + 1,
            seq: 0,
        },
        task: "t".into(),
        outcome: Ok(Bytes::from(rmp_serde::to_vec(&ordinal).unwrap())),
        executions: 1,
        outcome_ref: None,
    }
}

fn ordinals(entries: &[JournalEntry]) -> Vec<u64> {
    entries
        .iter()
        .filter_map(|e| match e {
            JournalEntry::CallEnded { ordinal, .. } => Some(*ordinal),
            _ => None,
        })
        .collect()
}

async fn journal(nats: &NatsServer) -> JetStreamJournal {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    JetStreamJournal::open(client, "pinazu")
        .await
        .expect("journal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_lost_a_run_cannot_extend_its_journal() {
    let nats = NatsServer::start();
    let old = journal(&nats).await;
    let mut lost = old.lost().expect("the coordinator takes the lost runs");
    let run = FlowRunId::new();
    old.append(run, started());
    old.append(run, call(0));
    old.flush().await.unwrap();

    // another coordinator takes the run over: it reads the journal, then appends
    let new = journal(&nats).await;
    assert!(new.latest(run).await.unwrap().is_some());
    assert_eq!(ordinals(&new.read(run).await.unwrap()), vec![0]);
    new.append(run, call(1));
    new.flush().await.unwrap();
    assert!(!new.fenced(run));

    // the old host, unaware (e.g. it was stopped past its lease), appends: refused
    old.append(run, call(2));
    let _ = old.flush().await;
    assert!(old.fenced(run), "the old host learns it lost the run");
    let told = tokio::time::timeout(std::time::Duration::from_secs(5), lost.recv())
        .await
        .expect("told within 5 s");
    assert_eq!(told, Some(run));
    // and nothing it appends later lands, its end included
    old.append(run, call(3));
    old.append(
        run,
        JournalEntry::RunEnded {
            status: pinazu_shared::events::FlowStatus::Success,
            summary: None,
            params: None,
            result_ref: None,
            result_lost: false,
        },
    );
    old.flush().await.unwrap();

    // the new owner goes on; the journal holds its entries only
    new.append(run, call(4));
    new.flush().await.unwrap();
    let third = journal(&nats).await;
    assert_eq!(ordinals(&third.read(run).await.unwrap()), vec![0, 1, 4]);
    assert!(
        matches!(
            third.latest(run).await.unwrap(),
            Some(JournalEntry::RunStarted { .. })
        ),
        "the old host's end did not reach the runs stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_restarted_on_nats_keeps_appending_to_its_runs() {
    // fencing must not refuse a host its own runs: entries stored, then NATS restarted
    // (acks lost on the way are sent again as duplicates, not as a conflict)
    let mut nats = NatsServer::start();
    let j = journal(&nats).await;
    let run = FlowRunId::new();
    j.append(run, started());
    j.append(run, call(0));
    j.flush().await.unwrap();
    nats.restart();
    j.append(run, call(1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while j.flush().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "stored again within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!j.fenced(run));
    let other = journal(&nats).await;
    assert_eq!(ordinals(&other.read(run).await.unwrap()), vec![0, 1]);
}

fn lease(id: &str) -> pinazu_coordinator::ha::CoordLease {
    pinazu_coordinator::ha::CoordLease {
        coordinator: id.into(),
        epoch: 1,
        host: "test".into(),
        pid: 1,
        since: "now".into(),
    }
}

async fn leases(nats: &NatsServer, id: &str) -> pinazu_coordinator::ha::Leases {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    pinazu_coordinator::ha::Leases::open(client, "pinazu", lease(id))
        .await
        .expect("leases")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_has_one_owner_and_a_dead_owners_runs_are_taken_over() {
    use pinazu_coordinator::ha::Owned;
    let nats = NatsServer::start();
    let a = leases(&nats, "coord-a").await;
    let b = leases(&nats, "coord-b").await;
    a.poll_live().await.unwrap();
    b.poll_live().await.unwrap();
    assert_eq!(b.live(), vec!["coord-a".to_string(), "coord-b".to_string()]);
    let run = FlowRunId::new();
    assert_eq!(a.claim(run).await.unwrap(), Owned::Mine);
    assert_eq!(b.claim(run).await.unwrap(), Owned::By("coord-a".into()));
    assert!(b.orphans().await.unwrap().is_empty());

    // a stops renewing (killed): its lease expires within 3 s, then b takes the run
    let started = std::time::Instant::now();
    loop {
        b.renew().await.unwrap();
        if !b.poll_live().await.unwrap().contains("coord-a") {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(6),
            "a's lease expires"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "not before its time"
    );
    assert_eq!(b.orphans().await.unwrap(), vec![run]);
    assert_eq!(b.claim(run).await.unwrap(), Owned::Mine);
    assert!(b.orphans().await.unwrap().is_empty());

    // a comes back (it was only stopped): the run is not its own any more, and its
    // release does not free what b owns
    a.renew().await.unwrap();
    a.poll_live().await.unwrap();
    assert_eq!(a.claim(run).await.unwrap(), Owned::By("coord-b".into()));
    a.release(run).await;
    assert_eq!(
        b.owner(run).await.unwrap().0.map(|o| o.coordinator),
        Some("coord-b".into())
    );
    // b ends the run: released, nobody's orphan
    b.release(run).await;
    assert_eq!(
        b.owner(run).await.unwrap().0.map(|o| o.coordinator),
        Some(String::new())
    );
    assert!(a.orphans().await.unwrap().is_empty());
}
