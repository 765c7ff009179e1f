//! The child process of the crash test (`tests/crash.rs`): opens the engine on the
//! given folder, then reserves and pays under concurrent load, printing one line per
//! acknowledged change (`R <order>` reserved, `P <order>` paid) until it is killed.
//! A printed line is a promise the engine made; the parent checks it was kept.
//!
//! Bounded on its own too: at most 50,000 operations or 60 seconds.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keydrop_engine::{
    CardSecret, CardSerial, Engine, EngineConfig, EngineError, KeyRing, PaymentRef, Reservation,
    SkuDef, SkuId, UserId,
};

const OPERATIONS_MAX: usize = 50_000;
const RUN_TIME_MAX: Duration = Duration::from_secs(60);
const TASKS: usize = 32;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), EngineError> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: crash_writer <dir> <round>");
    let round = args.next().expect("usage: crash_writer <dir> <round>");
    let keys = KeyRing::new(vec![zeroize::Zeroizing::new([0x42; 32])])?;
    let engine = Engine::open(EngineConfig::new(dir, keys)).await?;
    let sku = SkuId::parse("crash").expect("valid id");
    if engine.sku(&sku).is_none() {
        let def = SkuDef {
            name: "Crash test card".into(),
            price_cents: 100,
            per_user_limit: 1,
            per_device_limit: None,
            reservation_ttl_ms: 3_600_000,
            starts_at: None,
            ends_at: None,
            low_stock_threshold: 0,
        };
        engine.define_sku(sku.clone(), def).await?;
    }
    let cards: Vec<(CardSerial, CardSecret)> = (0..2_000)
        .map(|i| {
            let serial = CardSerial::parse(format!("r{round}-{i:05}")).expect("valid serial");
            (
                serial,
                CardSecret::new(format!("s-{round}-{i}")).expect("valid secret"),
            )
        })
        .collect();
    engine.import_cards(&sku, cards).await?;
    println!("READY");
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (engine, sku, out, round) =
            (engine.clone(), sku.clone(), Arc::clone(&out), round.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..OPERATIONS_MAX / TASKS {
                if started.elapsed() > RUN_TIME_MAX {
                    break;
                }
                let user = UserId::parse(format!("{round}-{task}-{n}")).expect("valid user");
                let request = Reservation {
                    user,
                    device: None,
                    idempotency: None,
                };
                let Ok(order) = engine.reserve(&sku, request).await else {
                    continue;
                };
                print_line(&out, &format!("R {}", order.order_id));
                if n % 2 == 0 {
                    let payment =
                        PaymentRef::parse(format!("pay-{}", order.order_id)).expect("valid ref");
                    if engine
                        .confirm_payment(&order.order_id, payment, 100)
                        .await
                        .is_ok()
                    {
                        print_line(&out, &format!("P {}", order.order_id));
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    engine.shutdown().await;
    Ok(())
}

fn print_line(out: &std::sync::Mutex<std::io::Stdout>, line: &str) {
    let mut out = out.lock().expect("stdout lock");
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
