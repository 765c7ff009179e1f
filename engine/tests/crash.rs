//! Crash test: a child process (`examples/crash_writer.rs`) reserves and pays under
//! concurrent load and is killed with SIGKILL at a random moment, over and over on
//! the same folder. After every kill the folder is reopened and audited: every
//! acknowledged reservation and payment is there, no card is sold twice, and stock
//! is conserved.
//!
//! `KEYDROP_CRASH_ROUNDS` sets the number of kills (default 20); `KEYDROP_SEED`
//! replays a run (the seed is printed).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keydrop_engine::{Engine, EngineConfig, KeyRing, OrderId, OrderStatus, SkuId};
use rand::{Rng, SeedableRng};

fn crash_writer() -> PathBuf {
    // Integration tests live in target/<profile>/deps; examples in .../examples.
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target layout");
    let path = profile_dir.join("examples").join("crash_writer");
    assert!(
        path.exists(),
        "{} missing: cargo test builds examples",
        path.display()
    );
    path
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_change() {
    let rounds: usize = std::env::var("KEYDROP_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("KEYDROP_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test seed {seed} (KEYDROP_SEED={seed} to replay), {rounds} rounds");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    let mut reserved: HashSet<OrderId> = HashSet::new();
    let mut paid: HashSet<OrderId> = HashSet::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for round in 0..rounds {
        let mut child = Command::new(crash_writer())
            .arg(&db)
            .arg(round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start crash_writer");
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Most kills land under load; one in five lands during start-up and recovery.
        let during_startup = rng.gen_bool(0.2);
        if !during_startup {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match lines_rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(line) if line == "READY" => break,
                    Ok(_) => {}
                    Err(_) if Instant::now() > deadline => {
                        panic!("round {round}: child never got ready")
                    }
                    Err(_) => {}
                }
            }
        }
        let delay = if during_startup {
            rng.gen_range(0..40)
        } else {
            rng.gen_range(10..300)
        };
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().expect("SIGKILL the child");
        child.wait().unwrap();
        reader.join().unwrap();
        let (mut new_reserved, mut new_paid) = (0, 0);
        for line in lines_rx.try_iter() {
            // A torn last line was never a complete promise; skip what does not parse.
            let mut parts = line.split(' ');
            let (Some(kind), Some(id)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(id) = id.parse::<OrderId>() else {
                continue;
            };
            match kind {
                "R" => {
                    new_reserved += 1;
                    reserved.insert(id);
                }
                "P" => {
                    new_paid += 1;
                    paid.insert(id);
                }
                _ => {}
            }
        }
        println!("round {round}: killed after {delay} ms (startup: {during_startup}), {new_reserved} reserved, {new_paid} paid acknowledged");
        runtime.block_on(audit(&db, &reserved, &paid));
    }
    assert!(
        !reserved.is_empty(),
        "the child acknowledged nothing: the test tested nothing"
    );
}

async fn audit(db: &std::path::Path, reserved: &HashSet<OrderId>, paid: &HashSet<OrderId>) {
    let keys = KeyRing::new(vec![zeroize::Zeroizing::new([0x42; 32])]).unwrap();
    let engine = Engine::open(EngineConfig::new(db, keys))
        .await
        .expect("recovery succeeds after SIGKILL");
    let Some(view) = engine.sku(&SkuId::parse("crash").unwrap()) else {
        assert!(
            reserved.is_empty(),
            "acknowledged orders but the SKU is gone"
        );
        engine.shutdown().await;
        return;
    };
    let counts = view.counts;
    assert_eq!(
        counts.available + counts.reserved + counts.sold,
        counts.imported,
        "stock conserved"
    );
    assert!(
        counts.reserved + counts.sold
            >= reserved.len() as u64 - paid.len() as u64 + paid.len() as u64
    );
    let mut serials = HashSet::new();
    for id in reserved {
        let details = engine
            .order(id)
            .await
            .unwrap_or_else(|e| panic!("acknowledged order {id} lost: {e}"));
        match details.view.status {
            OrderStatus::Reserved => {
                assert!(!paid.contains(id), "acknowledged payment of {id} lost")
            }
            OrderStatus::Paid { .. } => {
                let (serial, _) = details.card.expect("paid order has a card");
                assert!(
                    serials.insert(serial.clone()),
                    "card {serial} delivered twice"
                );
            }
            other => panic!("order {id} is {other:?}"),
        }
    }
    assert!(paid.is_subset(reserved));
    engine.shutdown().await;
}
