//! Issue 9: logs an operator can read under floods, and bounded resources against hostile
//! but authenticated peers. Real agents, real QUIC on loopback.

use imezzo_tests::replica::wire;
use imezzo_tests::replica::*;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// Lines both agents may write over the whole flood test (start-up lines included).
const LINE_BOUND: usize = 60;

/// Garbage datagrams, bogus QUIC Initials, handshakes from a node not allowed and
/// handshakes abandoned half-way, for `how_long`, at the server's port.
fn hostile_traffic(addr: std::net::SocketAddr, how_long: Duration) {
    let stranger = Node::init("limits-stranger").identity();
    let server_id = {
        // Any id: the stranger is refused by the server before it checks the server's.
        let id = imezzo_agent::identity::Identity::generate().unwrap().id;
        id.to_string()
    };
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let rt = wire::runtime();
    let end = Instant::now() + how_long;
    let mut n = 0u64;
    while Instant::now() < end {
        n += 1;
        // Plain garbage, then something shaped like a QUIC v1 Initial with a random body.
        let mut garbage = vec![0u8; 1200];
        for (i, b) in garbage.iter_mut().enumerate() {
            *b = (n as u8).wrapping_mul(31).wrapping_add(i as u8);
        }
        let _ = udp.send_to(&garbage[..100], addr);
        garbage[0] = 0xc0;
        garbage[1..5].copy_from_slice(&1u32.to_be_bytes());
        garbage[5] = 8;
        let _ = udp.send_to(&garbage, addr);
        // A real handshake from a node not in --allow, and one dropped mid-way.
        rt.block_on(async {
            let ep = imezzo_agent::transport::client_endpoint(&stranger).unwrap();
            let attempt = imezzo_agent::transport::connect(&ep, addr, wire::node_id(&server_id));
            let _ = tokio::time::timeout(Duration::from_millis(20), attempt).await;
        });
    }
}

#[test]
fn floods_of_problems_make_tens_of_lines_with_counts() {
    let mut r = Replication::started("limits-flood");
    let addr = r.server().addr;
    let export = r.export.root.clone();
    // Many small files written then renamed over each other from several processes: the
    // client's reads keep finding another file under the name.
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let export = export.clone();
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(5);
                let mut i = 0u64;
                while Instant::now() < end {
                    let tmp = export.join(format!("tmp-{w}-{i}"));
                    std::fs::write(&tmp, format!("{w} {i}\n").repeat(1 + (i % 7) as usize)).unwrap();
                    std::fs::rename(&tmp, export.join(format!("target-{}", i % 5))).unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    hostile_traffic(addr, Duration::from_secs(3));
    for w in workers {
        w.join().unwrap();
    }
    r.export.put("after-flood", b"settled\n");
    r.assert_identical(CONVERGE_TIMEOUT, "after the flood");
    // The hostile traffic's counts come at the end of the interval.
    let summary = r
        .server()
        .agent
        .wait_stderr(|l| l.contains("more like it in the last"), Duration::from_secs(15));
    let server = r.server().agent.stderr();
    let client = r.client().agent.stderr();
    let total = server.len() + client.len();
    eprintln!(
        "server wrote {} lines, client {} lines:\n{}\n---\n{}",
        server.len(),
        client.len(),
        head(&server.join("\n"), 40),
        head(&client.join("\n"), 40)
    );
    assert!(
        total <= LINE_BOUND,
        "the agents wrote {total} lines under the flood (at most {LINE_BOUND} wanted)\n{}",
        r.context()
    );
    assert!(
        summary.is_some(),
        "the server wrote no `... more like it in the last 10 s` line\n{}",
        r.context()
    );
}

#[test]
fn a_node_opening_many_connections_is_refused_beyond_the_limit_and_its_first_keeps_working() {
    let mut r = Replication::started("limits-conns");
    let (addr, sid) = (r.server().addr, r.server().id.clone());
    let identity = r.client_node.identity();
    let rt = wire::runtime();
    // The real client holds one; open 7 more as the same node. A refusal comes either as the
    // handshake's error or as a close right after it.
    let refused: Vec<String> = rt.block_on(async {
        let ep = imezzo_agent::transport::client_endpoint(&identity).unwrap();
        let mut held = Vec::new();
        let mut refused = Vec::new();
        for _ in 0..7 {
            let attempt = imezzo_agent::transport::connect(&ep, addr, wire::node_id(&sid));
            match tokio::time::timeout(Duration::from_secs(15), attempt).await {
                Ok(Ok(conn)) => held.push(conn),
                Ok(Err(e)) => refused.push(e.to_string()),
                Err(_) => refused.push("no handshake within 15 s".to_string()),
            }
        }
        for conn in &held {
            if let Ok(e) = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
                refused.push(match e {
                    quinn::ConnectionError::ApplicationClosed(c) => {
                        format!("{} (code {})", String::from_utf8_lossy(&c.reason), c.error_code)
                    }
                    other => other.to_string(),
                });
            }
        }
        refused
    });
    assert_eq!(
        refused.len(),
        4,
        "want 3 extra connections kept (4 per node with the client's) and 4 refused, got {refused:?}\n{}",
        r.context()
    );
    for reason in &refused {
        assert!(
            reason.contains("(code 3)") && reason.contains("at most 4 per node"),
            "a refused connection should close with Refused (3) saying why: {reason:?}"
        );
    }
    // The first connection, the real client's, keeps replicating.
    r.export.put("after-many-connections", b"still replicating\n");
    r.assert_identical(CONVERGE_TIMEOUT, "with extra connections of the same node refused");
}
