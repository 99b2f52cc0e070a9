//! The datapath outlives the agent: kill -9 and restart it while connections carry data.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use testbed::{
    demo::{sock, Demo},
    servers::LongConnection,
};

use crate::support::*;

/// Exchanges a line every 10 ms until told to stop; returns (exchanges, longest gap, backends).
fn keep_talking(mut conn: LongConnection, stop: Arc<AtomicBool>) -> JoinHandle<Result<(usize, Duration, Vec<String>)>> {
    std::thread::spawn(move || {
        let (mut n, mut longest, mut backends) = (0usize, Duration::ZERO, Vec::<String>::new());
        let mut last = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let answer = conn.exchange(&format!("msg {n}"))?;
            if !backends.contains(&answer.backend) {
                backends.push(answer.backend);
            }
            longest = longest.max(last.elapsed());
            last = Instant::now();
            n += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((n, longest, backends))
    })
}

#[test]
fn connections_survive_kill_9_and_restart_of_the_agent() -> Result<()> {
    let mut demo = Demo::build("e9")?;
    let manifests = example_manifests();
    let (agent, pins) = demo.start_agent(agent_bin(), &manifests, &[])?;
    let stop = Arc::new(AtomicBool::new(false));
    let cluster_ip = LongConnection::open(demo.client_pod(), sock([10, 96, 0, 10], 80), TIMEOUT)?;
    let node_port = LongConnection::open(&demo.cluster.client, sock([10, 99, 0, 1], 30080), TIMEOUT)?;
    let talkers = [keep_talking(cluster_ip, stop.clone()), keep_talking(node_port, stop.clone())];

    let mut agent = agent;
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        agent.kill9()?;
        std::thread::sleep(Duration::from_millis(300)); // no agent at all for a while
        let restarted = demo.start_agent_on(agent_bin(), &manifests, &pins, &[])?;
        let log = restarted.log_text();
        if !log.contains(&format!("adopted {EXAMPLE_FRONTENDS} frontends")) || !log.contains("XDP replaced in place") {
            bail!("round {round}: the restarted agent did not adopt the pinned state:\n{log}");
        }
        agent = restarted;
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for (what, t) in ["ClusterIP", "NodePort"].into_iter().zip(talkers) {
        let (n, longest, backends) = t.join().unwrap().map_err(|e| e.context(format!("{what} connection broke")))?;
        assert!(n > 100, "{what}: {n} exchanges");
        assert!(longest < Duration::from_secs(1), "{what}: stalled for {longest:?}");
        assert_eq!(backends.len(), 1, "{what}: stayed on one backend: {backends:?}");
    }
    Ok(())
}

#[test]
fn restarting_with_other_map_sizes_keeps_held_connections() -> Result<()> {
    let mut demo = Demo::build("ea")?;
    let manifests = example_manifests();
    let (mut agent, pins) = demo.start_agent(agent_bin(), &manifests, &["--max-flows", "65536"])?;
    let mut cluster_ip = LongConnection::open(demo.client_pod(), sock([10, 96, 0, 10], 80), TIMEOUT)?;
    let mut node_port = LongConnection::open(&demo.cluster.client, sock([10, 99, 0, 1], 30080), TIMEOUT)?;
    let backends = (cluster_ip.exchange("first")?.backend, node_port.exchange("first")?.backend);
    for (flows, slots) in [("16384", "8388608"), ("131072", "16777216")] {
        agent.kill9()?;
        agent = demo.start_agent_on(agent_bin(), &manifests, &pins, &["--max-flows", flows, "--maglev-slots", slots])?;
        assert!(agent.log_text().contains("resizing it"), "{}", agent.log_text());
        for i in 0..5 {
            let now = (cluster_ip.exchange(&format!("after {flows} {i}"))?.backend, node_port.exchange(&format!("after {flows} {i}"))?.backend);
            assert_eq!(now, backends, "held connections keep their backends across a resize to {flows} flows");
        }
    }
    Ok(())
}
