//! Pipelined dispatch, for real (a nats-server, a coordinator and agent processes): the
//! scheduler keeps attempts waiting in agents' own queues beyond their slots, agents
//! still run no more than their slots at once, and attempts waiting behind long tasks
//! are taken back for an idle agent instead of being held hostage.

mod common;

use common::limits::*;
use common::*;
use std::time::{Duration, Instant};

/// Attempts wait in the agents' queues, but each agent runs at most its slots at once
/// (1 here), and every call still runs once.
#[test]
fn agents_run_no_more_than_their_slots_while_attempts_wait_in_their_queues() {
    let c = Cluster::start(2, 1, &[]);
    let out = c.run("plain_fanout", &["--n=300", "--work-ms=3"]);
    assert_eq!(out["result"], (0..300u64).sum::<u64>());
    let recs = records(&c.record());
    assert_eq!(recs.len(), 300, "each call ran once: {}", c.logs());
    for agent in ["agent-0", "agent-1"] {
        let mine: Vec<&Rec> = recs.iter().filter(|r| r.agent == agent).collect();
        assert!(!mine.is_empty(), "{agent} took part");
        assert_eq!(max_running(mine), 1, "{agent} has 1 slot");
    }
}

/// Two agents; one is given 10 long tasks first (its 10 slots all taken, and short
/// attempts sent to wait in its queue behind them), then 1,000 short ones: they finish
/// in about the time the free agent alone needs, all on the free agent.
#[test]
fn short_attempts_waiting_behind_long_tasks_move_to_an_idle_agent() {
    // the busy agent (10 slots) first, alone, given the long tasks
    let mut c = Cluster::start(1, 10, &[]);
    let long_run = c.detach("plain_fanout", &["--n=10", "--work-ms=60000"]);
    wait_until(Duration::from_secs(30), "10 long attempts running", || {
        (c.status(&long_run)["executions"].as_u64()? == 10).then_some(())
    });
    // then the free agent (4 slots)
    let mut free = c.cmd();
    free.args(["agent", "--agent-id", "free", "--slots", "4"]);
    c.agents.push(Proc::spawn("free", free));
    c.wait_agents(2);

    let t = Instant::now();
    let out = c.run("plain_fanout", &["--n=1000", "--work-ms=1"]);
    let beside_long = t.elapsed();
    assert_eq!(out["result"], (0..1000u64).sum::<u64>());
    let short_run = out["flow_run_id"].as_str().unwrap().to_string();
    let recs = records(&c.record());
    let shorts: Vec<&Rec> = recs.iter().filter(|r| r.run == short_run).collect();
    assert_eq!(shorts.len(), 1000, "each short call ran once");
    assert!(
        shorts.iter().all(|r| r.agent == "free"),
        "the busy agent's slots were all taken: every short attempt ran on the free one"
    );

    // the time the free agent needs alone: the busy agent gone
    let cancel = c.output(&["cancel", &long_run]);
    assert!(cancel.status.success());
    c.agents[0].kill9();
    c.wait_agents(1);
    let t = Instant::now();
    c.run("plain_fanout", &["--n=1000", "--work-ms=1"]);
    let alone = t.elapsed();
    eprintln!(
        "1,000 short attempts beside 10 long ones: {:.2} s; on the free agent alone: {:.2} s",
        beside_long.as_secs_f64(),
        alone.as_secs_f64()
    );
    assert!(
        beside_long < alone * 2 + Duration::from_secs(2),
        "short attempts were held behind the long ones: {beside_long:?} against {alone:?} alone\n{}",
        c.logs()
    );
}
