//! A cluster for the limits tests (`examples/limits_flow.rs`): nats-server, a coordinator
//! and agents, and the attempts' records (start and end, taken on the agents).

use super::*;
use serde_json::Value;
use std::process::{Command, Output};
use std::time::Duration;

pub const APP: &str = "limits_flow";

/// One attempt as the agent recorded it.
#[derive(Clone, Debug)]
pub struct Rec {
    pub run: String,
    pub task: String,
    pub key: String,
    pub start: u128,
    pub end: u128,
    pub agent: String,
}

pub fn records(path: &std::path::Path) -> Vec<Rec> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 6, "a torn record line: {l:?}");
            Rec {
                run: f[0].into(),
                task: f[1].into(),
                key: f[2].into(),
                start: f[3].parse().unwrap(),
                end: f[4].parse().unwrap(),
                agent: f[5].into(),
            }
        })
        .collect()
}

/// The most attempts running at once (an end and a start at the same instant: the end
/// first).
pub fn max_running<'a>(recs: impl IntoIterator<Item = &'a Rec>) -> usize {
    let mut ev: Vec<(u128, i32)> = Vec::new();
    for r in recs {
        ev.push((r.start, 1));
        ev.push((r.end, -1));
    }
    ev.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in ev {
        now += d;
        max = max.max(now);
    }
    max as usize
}

pub struct Cluster {
    pub nats: NatsServer,
    pub coordinator: Proc,
    pub agents: Vec<Proc>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start(agents: usize, slots: u32, coord_args: &[&str]) -> Cluster {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            coordinator: Proc::spawn("coordinator", {
                let mut cmd = base(&nats.url(), dir.path());
                cmd.arg("coordinator").args(coord_args);
                cmd
            }),
            nats,
            agents: Vec::new(),
            dir,
        };
        for i in 0..agents {
            let mut cmd = c.cmd();
            cmd.args(["agent", "--agent-id", &format!("agent-{i}")])
                .args(["--slots", &slots.to_string()]);
            c.agents.push(Proc::spawn(&format!("agent-{i}"), cmd));
        }
        c.wait_agents(agents);
        c
    }

    pub fn record(&self) -> std::path::PathBuf {
        self.dir.path().join("record.txt")
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = base(&self.nats.url(), self.dir.path());
        cmd.env("PINAZU_RECORD", self.record());
        cmd
    }

    pub fn output(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("command runs")
    }

    pub fn logs(&self) -> String {
        let mut s = format!("--- coordinator\n{}", self.coordinator.logs());
        for a in &self.agents {
            let l = a.logs();
            if l.contains("WARN") || l.contains("ERROR") {
                s += &format!("--- {}\n{l}", a.name);
            }
        }
        s
    }

    pub fn wait_agents(&self, n: usize) {
        wait_until(Duration::from_secs(60), &format!("{n} live agents"), || {
            let out = self.output(&["agents", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (v.as_array()?.len() == n).then_some(())
        });
    }

    /// `run FLOW args...` to its end: the result line, or a panic with the logs.
    pub fn run(&self, flow: &str, args: &[&str]) -> Value {
        let mut cmd = self.cmd();
        cmd.args(["run", flow, "--no-progress"]).args(args);
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = finish_within(child, Duration::from_secs(120), || self.logs());
        succeeded(&out, || self.logs())
    }

    /// `run FLOW args... --detach`: the run id.
    pub fn detach(&self, flow: &str, args: &[&str]) -> String {
        let out = self.output(&[&["run", flow, "--detach"], args].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn status(&self, id: &str) -> Value {
        let out = self.output(&["status", id, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    pub fn wait_completed(&self, id: &str, n: u64) {
        wait_until(
            Duration::from_secs(60),
            &format!("run {id} to complete {n}"),
            || (self.status(id)["completed"].as_u64()? >= n).then_some(()),
        );
    }

    pub fn limits(&self) -> Value {
        let out = self.output(&["limits", "list", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

pub fn base(url: &str, dir: &std::path::Path) -> Command {
    let mut cmd = super::app(APP);
    cmd.env("NATS_URL", url)
        .env("PINAZU_CACHE_DIR", dir.join("cache"))
        .env("PINAZU_JOURNAL_DIR", dir.join("journal"));
    cmd
}

pub fn named_size(limits: &Value, name: &str) -> Value {
    limits["named"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[0] == name)
        .map(|e| e[1].clone())
        .unwrap_or(Value::Null)
}
