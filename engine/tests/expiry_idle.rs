//! An actor that cannot expire its due orders (it lost its disk) waits for the
//! ticker instead of re-sending itself the work in a loop.
//!
//! Its own test binary because it reads the process's CPU time, which tests running
//! beside it in one process would add to.
#![cfg(target_os = "linux")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use keydrop_engine::{EngineError, PaymentRef};

/// User plus system CPU time of this whole process, from `/proc/self/stat`.
fn process_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("reading /proc/self/stat");
    // Field 2, the command name, is in parentheses and may hold spaces: count from
    // the field after it (3, the state).
    let rest = &stat[stat.rfind(')').expect("a command name in parentheses") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| fields[field - 3].parse::<u64>().expect("a tick count");
    // utime and stime, in USER_HZ ticks: 100 per second in Linux's user ABI.
    Duration::from_millis((ticks(14) + ticks(15)) * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_that_lost_its_disk_does_not_spin_on_due_orders() {
    let dir = tempfile::tempdir().unwrap();
    let clock = manual_clock();
    let id = sku("stranded");
    let o = open(dir.path(), &clock, &[KEY_A]).await;
    o.stocked(&id, cards("S", 0..4)).await;
    let due = o.engine.reserve(&id, buyer("due")).await.unwrap();
    let paid = o.engine.reserve(&id, buyer("payer")).await.unwrap();

    // A payment whose write fails, then a reload that fails too: the actor refuses
    // everything from then on, expiry passes included.
    o.fault.fail_next_writes(1);
    o.fault.fail_next_loads(1);
    let failed = o
        .engine
        .confirm_payment(&paid.order_id, PaymentRef::parse("pay-1").unwrap(), 5_000)
        .await
        .unwrap_err();
    assert!(
        matches!(failed, EngineError::JournalUnavailable(_)),
        "{failed:?}"
    );
    assert!(
        matches!(
            order_after_reload(&o, &due.order_id).await,
            Err(EngineError::SkuUnavailable)
        ),
        "the actor did not give up after its reload failed"
    );

    // The unpaid reservation is now due, on every tick of the 20 ms ticker (the paid
    // one's payment is in the memory the disk refused, so the actor holds it as paid).
    clock.advance_millis(61_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (cpu_before, wall_before) = (process_cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu, wall) = (process_cpu_time() - cpu_before, wall_before.elapsed());
    // An actor re-sending itself each refused pass holds a core for the whole second;
    // one pass per tick costs a few milliseconds.
    assert!(
        cpu < wall / 4,
        "the process used {cpu:?} of CPU in {wall:?} with nothing to do but wait"
    );
    assert!(matches!(
        order_after_reload(&o, &due.order_id).await,
        Err(EngineError::SkuUnavailable)
    ));
    o.engine.shutdown().await;
}
